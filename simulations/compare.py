"""Compare CheckBullet with vanilla FedAvg and full torch.save checkpoints in one run.

The command runs the Flower app four times with the same seed, one after the other,
on one local SuperLink that it starts on free 127.0.0.1 ports and stops by its PID:

- ``checkbullet``, ``fedavg`` and ``full-checkpoint`` at the chosen failure scale;
- ``fedavg-no-failures`` at failure scale 0, the quality reference.

Every device's failures depend only on the seed, its node id and its own clock, so the
three failing runs see the same failure schedule. The schedules drift apart only where
checkpoint and recovery time has moved a device's clock: a checkpointing device reaches
a given step a little later than the FedAvg one, so a failure may fall on another step.

Each run writes the ServerApp's results JSON and the nodes' ``events.jsonl`` (one line
per failure, recovery and reply) under ``--out``. The command prints the runs side by
side, with ratios against FedAvg and full-checkpoint, and writes ``summary.json``.
Recovery time per failure is on the device clock: the simulated seconds of load,
decode and merge (measured seconds plus bytes over the device's read bandwidth) plus
the simulated seconds spent recomputing lost steps. Usage::

    python -m simulations.compare --data-dir ../shared/data/barcelona-lte --plot
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server_app.results import finite_or_none

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
# Failure rates of the default device models are per hours and days, while a
# simulated round trains for seconds, so the comparison scales them up by the
# app's default failure-scale (pyproject.toml), which makes about a fifth of the
# sampled devices fail or drop out per round.
DEFAULT_FAILURE_SCALE = 500.0
DEFAULT_SUPERNODES = 50
DEFAULT_ROUNDS = 5
RSS_POLL_S = 0.5
# Rounds averaged for the tail test MSE. The test MSE of a model that is still
# converging moves by several percent from one round to the next, so one round's
# value alone cannot tell runs apart at that scale.
TAIL_ROUNDS = 3


@dataclass(frozen=True)
class Scenario:
    """One run of the comparison.

    Attributes
    ----------
    label : str
        Name in the table, the file names and the plots.
    mode : str
        The app's ``mode`` run config value.
    failure_scale : float
        The app's ``failure-scale`` run config value.
    """

    label: str
    mode: str
    failure_scale: float


@dataclass(frozen=True)
class RunRecord:
    """Outcome and cost of one ``flwr run``.

    Attributes
    ----------
    label : str
        Scenario label.
    returncode : int
        Exit status of ``flwr run``.
    wall_s : float
        Wall-clock seconds of the run.
    peak_rss_mb : float
        Largest summed resident memory of the SuperLink and its child processes
        during the run, in MiB (sampled every ``RSS_POLL_S`` seconds).
    results_path : str
        The ServerApp's results JSON.
    store_root : str
        The run's store root; the events file is in ``run-<id>/`` below it.
    log_path : str
        The streamed ``flwr run`` output.
    """

    label: str
    returncode: int
    wall_s: float
    peak_rss_mb: float
    results_path: str
    store_root: str
    log_path: str


def scenarios(failure_scale: float) -> tuple[Scenario, ...]:
    """Return the four runs of the comparison for ``failure_scale``."""
    return (
        Scenario("checkbullet", "checkbullet", failure_scale),
        Scenario("fedavg", "fedavg", failure_scale),
        Scenario("full-checkpoint", "full-checkpoint", failure_scale),
        Scenario("fedavg-no-failures", "fedavg", 0.0),
    )


# ---------------------------------------------------------------------------
# Running the app
# ---------------------------------------------------------------------------


def toml_value(value: object) -> str:
    """Return ``value`` as a TOML literal for ``flwr run --run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run config value {value} is not finite; TOML run config needs a finite number")
        return repr(value)
    return json.dumps(str(value))


def format_run_config(config: Mapping[str, object]) -> str:
    """Return ``config`` as the space-separated ``key=value`` string ``--run-config`` takes."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def scenario_run_config(
    scenario: Scenario, *, out_dir: Path, base: Mapping[str, object]
) -> dict[str, object]:
    """Return the run config of one scenario: ``base`` plus its mode, failure scale and paths."""
    return {
        **base,
        "mode": scenario.mode,
        "failure-scale": float(scenario.failure_scale),
        "results-path": str(out_dir / f"{scenario.label}.json"),
        "store-root": str(out_dir / "stores" / scenario.label),
    }


class _RssSampler:
    """Polls the summed RSS of a process and its descendants in a background thread."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.root_pid))
            self._stop.wait(RSS_POLL_S)


def tree_rss_kib(root_pid: int) -> int:
    """Return the summed resident memory of ``root_pid`` and its descendants, in KiB (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        # The command name in field 2 may hold spaces, so split after its closing bracket.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        rss[int(entry.name)] = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )

    total, stack = 0, [root_pid]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total


def run_scenario(
    scenario: Scenario,
    *,
    superlink: Any,
    app_dir: Path,
    out_dir: Path,
    run_config: Mapping[str, object],
    num_supernodes: int,
    timeout_s: float,
) -> RunRecord:
    """Run ``flwr run APP --stream`` for one scenario on ``superlink`` and wait for it.

    Parameters
    ----------
    scenario : Scenario
        The run.
    superlink : LocalSuperLink
        A started SuperLink; its ``env()`` points ``flwr run`` at it.
    app_dir : Path
        The Flower app folder.
    out_dir : Path
        Where the log, results and stores go.
    run_config : Mapping[str, object]
        The scenario's full run config override.
    num_supernodes : int
        Simulated nodes in the federation.
    timeout_s : float
        Maximum wall-clock seconds of the run; it is killed after that.

    Returns
    -------
    RunRecord
    """
    log_path = out_dir / "logs" / f"{scenario.label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        _flwr_executable(),
        "run",
        str(app_dir),
        "--stream",
        "--run-config",
        format_run_config(run_config),
        "--federation-config",
        f"num-supernodes={num_supernodes}",
    ]
    env = {**os.environ, **FLWR_ENV, **superlink.env()}
    logger.info("Run %s: %s", scenario.label, " ".join(command))

    start = time.perf_counter()
    with open(log_path, "wb") as log, _RssSampler(superlink.process.pid) as sampler:
        process = subprocess.Popen(command, env=env, cwd=app_dir, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("Run %s timed out after %.0f s; stopping flwr run PID %d", scenario.label, timeout_s, process.pid)
            process.kill()
            returncode = process.wait()
    wall_s = time.perf_counter() - start

    record = RunRecord(
        label=scenario.label,
        returncode=returncode,
        wall_s=wall_s,
        peak_rss_mb=sampler.peak_kib / 1024.0,
        results_path=str(run_config["results-path"]),
        store_root=str(run_config["store-root"]),
        log_path=str(log_path),
    )
    logger.info(
        "Run %s finished with status %d in %.1f s, peak memory %.0f MiB",
        scenario.label, returncode, wall_s, record.peak_rss_mb,
    )
    return record


def _flwr_executable() -> str:
    candidate = Path(sys.executable).parent / "flwr"
    return str(candidate) if candidate.exists() else "flwr"


# ---------------------------------------------------------------------------
# Reading and summarizing
# ---------------------------------------------------------------------------


def load_results(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return a results JSON, or None (logged) when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        logger.error("Results file %s is missing; see the run's log for why the ServerApp did not write it", path)
    except json.JSONDecodeError as error:
        logger.error("Results file %s is not valid JSON (%s)", path, error)
    return None


def load_events(store_root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return every event line of every run folder under ``store_root``; a bad line is logged and skipped."""
    events: list[dict[str, Any]] = []
    for path in sorted(Path(store_root).glob(f"run-*/{EVENTS_FILE}")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as error:
                logger.warning("Skipping line %d of %s: not valid JSON (%s)", number, path, error)
    return events


def recovery_times_sim(events: Iterable[Mapping[str, Any]]) -> list[float]:
    """Return the device-clock recovery time of every failure that was recovered.

    A failure recovered within its round costs its load, decode and merge time plus
    the recompute of its lost steps. A state restored at the node's next contact
    costs its load, decode and merge time, because it is reported without recompute.
    Failures whose round was lost have no recovery time.
    """
    times = []
    for event in events:
        if event.get("event") == "failure" and event.get("outcome") == "recovered":
            times.append(float(event["recovery_time_sim_s"]) + float(event["recompute_time_sim_s"]))
        elif event.get("event") == "recovery":
            times.append(float(event["recovery_time_sim_s"]))
    return times


def steps_lost(events: Iterable[Mapping[str, Any]]) -> int:
    """Return the local steps that failures destroyed, from the events of every node.

    The events include what error replies never report to the server. A failure
    recovered within its round loses the steps after the restored state. A lost round
    loses all its steps so far. A state restored at the next contact loses the steps
    between it and the failure.
    """
    total = 0
    for event in events:
        if event.get("event") in ("failure", "recovery"):
            total += int(event.get("steps_lost", 0))
    return total


def failure_outcomes(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Count failures by outcome: ``recovered``, ``pending`` and ``lost``."""
    counts = {"recovered": 0, "pending": 0, "lost": 0}
    for event in events:
        if event.get("event") == "failure":
            outcome = str(event.get("outcome"))
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def tail_test_mse(results: Mapping[str, Any], rounds: int = TAIL_ROUNDS) -> float | None:
    """Return the mean test MSE of the last ``rounds`` rounds, or None when a value is missing."""
    values = [entry.get("test_mse") for entry in results.get("rounds", [])[-rounds:]]
    if not values or any(value is None for value in values):
        return None
    return float(statistics.fmean(values))


def summarize_run(
    results: Mapping[str, Any] | None, events: Sequence[Mapping[str, Any]], record: RunRecord | None = None
) -> dict[str, Any]:
    """Return the comparison row of one run from its results JSON, events and run record."""
    results = results or {}
    times = recovery_times_sim(events)
    outcomes = failure_outcomes(events)
    return {
        "complete": bool(results.get("complete", False)),
        "final_test_mse": results.get("final_test_mse"),
        "final_test_mae": results.get("final_test_mae"),
        "tail_test_mse": tail_test_mse(results),
        "failures": sum(outcomes.values()),
        "failures_recovered_in_round": outcomes["recovered"],
        "failures_recovered_next_contact": outcomes["pending"],
        "failures_round_lost": outcomes["lost"],
        "lost_steps": steps_lost(events),
        "server_failures": results.get("failures"),
        "server_recoveries": results.get("recoveries"),
        "server_lost_steps": results.get("lost_steps"),
        "median_recovery_time_s": results.get("median_recovery_time_s"),
        "median_recompute_time_sim_s": results.get("median_recompute_time_sim_s"),
        "median_recovery_time_sim_s": statistics.median(times) if times else None,
        "storage_bytes": results.get("storage_bytes"),
        "baseline_storage_bytes": results.get("baseline_storage_bytes"),
        "storage_ratio": results.get("storage_ratio"),
        "store_bytes": results.get("store_bytes"),
        "checkpoint_overhead": results.get("checkpoint_overhead"),
        "simulated_time_s": results.get("simulated_time_s"),
        "wall_s": record.wall_s if record else None,
        "peak_rss_mb": record.peak_rss_mb if record else None,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """Return ``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def compute_ratios(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Return the headline ratios between runs (None where a run or value is missing).

    - ``recovery_speedup_*``: the other run's median recovery time per failure over
      CheckBullet's.
    - ``storage_*`` and ``overhead_*``: CheckBullet's value over the other run's.
    - ``lost_steps_*``: the other run's lost steps over CheckBullet's.
    - ``mse_*_vs_reference``: a run's final test MSE over that of FedAvg without
      failures; ``tail_mse_*_vs_reference`` the same for the mean over the last
      `TAIL_ROUNDS` rounds.
    """
    empty: dict[str, Any] = {}
    checkbullet = rows.get("checkbullet", empty)
    fedavg = rows.get("fedavg", empty)
    full = rows.get("full-checkpoint", empty)
    reference = rows.get("fedavg-no-failures", empty)

    ratios = {
        "recovery_speedup_vs_fedavg": ratio(fedavg.get("median_recovery_time_sim_s"), checkbullet.get("median_recovery_time_sim_s")),
        "recovery_speedup_vs_full_checkpoint": ratio(
            full.get("median_recovery_time_sim_s"), checkbullet.get("median_recovery_time_sim_s")
        ),
        "lost_steps_fedavg_over_checkbullet": ratio(fedavg.get("lost_steps"), checkbullet.get("lost_steps")),
        "storage_vs_torch_save_same_interval": checkbullet.get("storage_ratio"),
        "storage_vs_full_checkpoint_run": ratio(checkbullet.get("storage_bytes"), full.get("storage_bytes")),
        "overhead_vs_full_checkpoint": ratio(checkbullet.get("checkpoint_overhead"), full.get("checkpoint_overhead")),
    }
    for label, row in rows.items():
        key = label.replace("-", "_")
        ratios[f"mse_{key}_vs_reference"] = ratio(row.get("final_test_mse"), reference.get("final_test_mse"))
        ratios[f"tail_mse_{key}_vs_reference"] = ratio(row.get("tail_test_mse"), reference.get("tail_test_mse"))
    return ratios


TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("final_test_mse", "final test MSE"),
    ("final_test_mae", "final test MAE"),
    ("tail_test_mse", f"mean test MSE, last {TAIL_ROUNDS} rounds"),
    ("failures", "failures (node events)"),
    ("failures_recovered_in_round", "  recovered in round"),
    ("failures_recovered_next_contact", "  recovered next contact"),
    ("failures_round_lost", "  round lost"),
    ("lost_steps", "lost steps (node events)"),
    ("server_failures", "failures (server count)"),
    ("server_recoveries", "recoveries (accepted replies)"),
    ("server_lost_steps", "lost steps (accepted replies)"),
    ("median_recovery_time_sim_s", "median recovery, sim s"),
    ("median_recovery_time_s", "median load+decode+merge, measured s"),
    ("median_recompute_time_sim_s", "median recompute, sim s"),
    ("storage_bytes", "checkpoint bytes written"),
    ("baseline_storage_bytes", "torch.save bytes, same interval"),
    ("store_bytes", "store bytes at end"),
    ("checkpoint_overhead", "checkpoint overhead (sim)"),
    ("simulated_time_s", "simulated time, s"),
    ("wall_s", "wall time, s"),
    ("peak_rss_mb", "peak memory, MiB"),
)


def format_table(rows: Mapping[str, Mapping[str, Any]], ratios: Mapping[str, float | None]) -> str:
    """Return the runs side by side as plain text, followed by the ratios."""
    labels = list(rows)
    name_width = max(len(name) for _, name in TABLE_ROWS)
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'':<{name_width}}  " + "  ".join(f"{label:>{width}}" for label in labels)]
    for key, name in TABLE_ROWS:
        cells = "  ".join(f"{_format_cell(rows[label].get(key)):>{width}}" for label in labels)
        lines.append(f"{name:<{name_width}}  {cells}")

    lines.append("")
    for key, value in ratios.items():
        lines.append(f"{key:<{name_width + 8}}  {_format_cell(value)}")
    return "\n".join(lines)


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_summary(
    runs: Mapping[str, tuple[Mapping[str, Any] | None, Sequence[Mapping[str, Any]], RunRecord | None]],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Return the JSON summary: settings, one row per run, ratios and run records."""
    rows = {label: summarize_run(results, events, record) for label, (results, events, record) in runs.items()}
    return {
        "settings": dict(settings),
        "runs": rows,
        "ratios": compute_ratios(rows),
        "records": {label: asdict(record) for label, (_, _, record) in runs.items() if record is not None},
    }


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Write the summary JSON with NaN and Inf as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_or_none(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.compare",
        description="Run CheckBullet, FedAvg, full-checkpoint and failure-free FedAvg with one seed and compare them.",
    )
    parser.add_argument("--data-dir", default="", help="folder of the LTE trace CSVs; empty for synthetic traces")
    parser.add_argument(
        "--num-supernodes", type=int, default=DEFAULT_SUPERNODES,
        help=f"simulated nodes per run (default {DEFAULT_SUPERNODES})",
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help=f"server rounds per run (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed shared by every run (default 42)")
    parser.add_argument(
        "--failure-scale",
        type=float,
        default=DEFAULT_FAILURE_SCALE,
        help=f"multiplier of the device failure rates in the failing runs (default {DEFAULT_FAILURE_SCALE:g})",
    )
    parser.add_argument("--local-steps", type=int, default=None, help="local steps per round (default: the app's)")
    parser.add_argument("--fraction-train", type=float, default=None, help="share of nodes sampled per round (default: the app's)")
    parser.add_argument(
        "--run-config",
        default="",
        help='further run config for every run, as "key=value ..." in TOML syntax',
    )
    parser.add_argument("--out", default="", help="output folder (default results/compare-seed<SEED>)")
    parser.add_argument("--plot", action="store_true", help="also write PNG plots into the output folder")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="maximum wall time per run, in s (default 3600)")
    parser.add_argument("--app-dir", default=str(REPO_ROOT), help="the Flower app folder (default: this checkout)")
    args = parser.parse_args(argv)

    if args.num_supernodes < 1 or args.rounds < 1:
        parser.error(f"--num-supernodes={args.num_supernodes} and --rounds={args.rounds} must both be at least 1")
    if not (math.isfinite(args.failure_scale) and args.failure_scale > 0):
        parser.error(f"--failure-scale={args.failure_scale} is invalid; use a number > 0")
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir={args.data_dir} is not a directory; pass the folder with SITE.csv and SITE_test.csv")
    return args


def base_run_config(args: argparse.Namespace) -> dict[str, object]:
    """Return the run config shared by every scenario."""
    config: dict[str, object] = {
        "num-server-rounds": args.rounds,
        "seed": args.seed,
        "data-dir": str(Path(args.data_dir).resolve()) if args.data_dir else "",
    }
    if args.local_steps is not None:
        config["local-steps"] = args.local_steps
    if args.fraction_train is not None:
        config["fraction-train"] = args.fraction_train
    for item in args.run_config.split():
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--run-config item {item!r} is not key=value")
        config[key] = _parse_toml_scalar(value)
    return config


def _parse_toml_scalar(text: str) -> object:
    return tomllib.loads(f"value = {text}")["value"]


def run_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Run the four scenarios on one SuperLink, then summarize, print and plot them."""
    from server_app.local_superlink import LocalSuperLink

    out_dir = Path(args.out or REPO_ROOT / "results" / f"compare-seed{args.seed}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(FLWR_ENV)
    base = base_run_config(args)

    runs: dict[str, tuple[dict[str, Any] | None, list[dict[str, Any]], RunRecord | None]] = {}
    with LocalSuperLink(out_dir / "flwr-home") as superlink:
        for scenario in scenarios(args.failure_scale):
            run_config = scenario_run_config(scenario, out_dir=out_dir, base=base)
            record = run_scenario(
                scenario,
                superlink=superlink,
                app_dir=Path(args.app_dir).resolve(),
                out_dir=out_dir,
                run_config=run_config,
                num_supernodes=args.num_supernodes,
                timeout_s=args.timeout_s,
            )
            results = load_results(record.results_path)
            if results is not None and not results.get("complete"):
                logger.error("Run %s did not finish all rounds; see %s", scenario.label, record.log_path)
            runs[scenario.label] = (results, load_events(record.store_root), record)

    settings = {
        "num_supernodes": args.num_supernodes,
        "rounds": args.rounds,
        "seed": args.seed,
        "failure_scale": args.failure_scale,
        "run_config": base,
    }
    summary = build_summary(runs, settings)
    write_summary(out_dir / SUMMARY_FILE, summary)
    print(format_table(summary["runs"], summary["ratios"]))
    print(f"\nSummary written to {out_dir / SUMMARY_FILE}")

    if args.plot:
        from simulations.plots import write_plots

        paths = write_plots({label: results for label, (results, _, _) in runs.items()},
                            {label: events for label, (_, events, _) in runs.items()}, out_dir)
        for path in paths:
            print(f"Plot written to {path}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m simulations.compare``; returns 1 when a run failed."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    summary = run_comparison(args)
    failed = [label for label, row in summary["runs"].items() if not row["complete"]]
    if failed:
        logger.error("Runs without complete results: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
