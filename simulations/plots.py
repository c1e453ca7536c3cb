"""PNG plots of a comparison: test loss over simulated time, store size, recovery times."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from simulations.compare import recovery_times_sim  # noqa: E402

logger = logging.getLogger(__name__)


def loss_curve(results: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """Return (simulated seconds, test MSE) after each round, starting with the initial model at 0 s."""
    times: list[float] = []
    losses: list[float] = []
    if results.get("initial_test_mse") is not None:
        times.append(0.0)
        losses.append(float(results["initial_test_mse"]))
    for record in results.get("rounds", []):
        if record.get("test_mse") is not None:
            times.append(float(record["simulated_time_s"]))
            losses.append(float(record["test_mse"]))
    return times, losses


def store_bytes_curve(events: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[int]]:
    """Return (device clock, total store bytes over all nodes) at each reply event, in clock order.

    Each node counts with the store size of its latest reply up to that clock.
    """
    replies = sorted(
        (event for event in events if event.get("event") == "reply" and "store-bytes" in event),
        key=lambda event: float(event["device-clock-s"]),
    )
    latest: dict[int, int] = {}
    times: list[float] = []
    totals: list[int] = []
    for event in replies:
        latest[int(event["node"])] = int(event["store-bytes"])
        times.append(float(event["device-clock-s"]))
        totals.append(sum(latest.values()))
    return times, totals


def plot_test_loss(results_by_label: Mapping[str, Mapping[str, Any] | None], path: Path) -> Path:
    """Plot each run's test MSE against simulated time and save it to ``path``."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, results in results_by_label.items():
        if not results:
            continue
        times, losses = loss_curve(results)
        axes.plot(times, losses, marker="o", label=label)
    axes.set_xlabel("simulated time (s)")
    axes.set_ylabel("test MSE (scaled target)")
    axes.set_title("Global model test loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_store_bytes(events_by_label: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Plot the summed on-device store size over device clocks for each run that stores."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, events in events_by_label.items():
        times, totals = store_bytes_curve(events)
        if totals and max(totals) > 0:
            axes.step(times, [total / 1e6 for total in totals], where="post", label=label)
    axes.set_xlabel("device clock (simulated s)")
    axes.set_ylabel("checkpoint storage on all nodes (MB)")
    axes.set_title("Checkpoint storage over time")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    return _save(figure, path)


def plot_recovery_times(events_by_label: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Plot the distribution of recovery time per failure (simulated seconds) for each run."""
    labels = [label for label, events in events_by_label.items() if recovery_times_sim(events)]
    data = [recovery_times_sim(events_by_label[label]) for label in labels]

    figure, axes = plt.subplots(figsize=(7, 4.5))
    if data:
        axes.boxplot(data, showfliers=True)
        axes.set_xticks(range(1, len(labels) + 1), labels)
        axes.set_yscale("log")
    else:
        axes.text(0.5, 0.5, "no recovered failures", ha="center", va="center", transform=axes.transAxes)
    axes.set_ylabel("recovery time per failure (simulated s)")
    axes.set_title("Recovery time: load, decode, merge and recompute")
    axes.grid(alpha=0.3, axis="y")
    return _save(figure, path)


def write_plots(
    results_by_label: Mapping[str, Mapping[str, Any] | None],
    events_by_label: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: Path,
) -> list[Path]:
    """Write the three comparison plots into ``out_dir`` and return their paths."""
    out_dir = Path(out_dir)
    return [
        plot_test_loss(results_by_label, out_dir / "test_loss_vs_time.png"),
        plot_store_bytes(events_by_label, out_dir / "store_bytes_vs_time.png"),
        plot_recovery_times(events_by_label, out_dir / "recovery_times.png"),
    ]


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    logger.info("Wrote plot %s", path)
    return path
