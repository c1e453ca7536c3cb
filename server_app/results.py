"""Per-round and per-run results of a federated run, written as one JSON file.

Counting rules, all from the train replies of the message contract:

- ``failed`` in a round counts error replies plus sampled nodes that sent nothing
  before the round's timeout. A device that fails in a round and cannot come back
  before the round's deadline replies with an error, so it shows up here.
- The totals ``failures`` add the rounds' ``failed`` counts to the ``failures``
  metric of the accepted replies. A reply's ``failures`` must therefore count only
  failures it recovered from within that reply's round, not a failure that was
  already reported through an error reply.
- ``recoveries``, ``lost_steps``, byte counts and times are sums of the accepted
  replies' metrics. Rejected replies contribute nothing.
- ``median_recovery_time_s`` is the median, over accepted replies with
  ``recoveries >= 1``, of ``recovery-time-s / recoveries``. These are measured
  seconds of load, decode and merge. ``median_recompute_time_sim_s`` does the same
  for ``recompute-time-sim-s``, the simulated seconds spent redoing lost steps.
- ``simulated_time_s`` of a round is the largest ``device-clock-s`` among its
  accepted replies, because the round ends when its slowest device has replied.
  It never falls below the previous round's value, so a round without accepted
  replies, or whose devices have slower clocks, keeps the previous value.
- ``storage_bytes`` is the bytes the devices' checkpoint stores wrote, and
  ``baseline_storage_bytes`` what ``torch.save`` of the fp32 state at the same
  checkpoint interval would have written. ``store_bytes`` sums each node's last
  reported on-device store size.
- ``checkpoint_overhead`` is total ``checkpoint-time-s`` over total
  ``train-time-s``. The ClientApp reports both in simulated device seconds.
  ``checkpoint_overhead_measured`` does the same with the optional
  ``checkpoint-time-measured-s`` and ``train-time-measured-s`` (wall-clock seconds
  on this machine), and is null when no reply carries them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    """Counts, losses and simulated time of one round."""

    round: int
    sampled: int = 0
    replied: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    recovered: int = 0
    partial: int = 0
    lost_steps: int = 0
    train_loss: float | None = None
    test_mse: float | None = None
    test_mae: float | None = None
    simulated_time_s: float = 0.0


class RunRecorder:
    """Collects round records and reply metrics, and writes the results file.

    Parameters
    ----------
    path : Path
        Where the results JSON goes; its folder is created when needed.
    header : Mapping[str, Any]
        Fields written at the top of the file: ``mode``, ``num_rounds``, ``seed``
        and the run config.
    """

    def __init__(self, path: Path, header: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.header = dict(header)
        self.rounds: dict[int, RoundRecord] = {}
        self.num_nodes = 0
        self.initial_test: dict[str, float] = {}
        self.final_test: dict[str, float] = {}
        self.complete = False
        self._sums = {
            "failures": 0,
            "recoveries": 0,
            "steps-lost": 0,
            "checkpoint-bytes-written": 0,
            "baseline-checkpoint-bytes": 0,
            "checkpoint-time-s": 0.0,
            "train-time-s": 0.0,
            "checkpoint-time-measured-s": 0.0,
            "train-time-measured-s": 0.0,
        }
        self._recovery_times: list[float] = []
        self._recompute_times: list[float] = []
        self._store_bytes: dict[int, int] = {}

    def round(self, server_round: int) -> RoundRecord:
        """Return the record of a round, creating it on first use."""
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundRecord(server_round)
        return self.rounds[server_round]

    def record_sampling(self, server_round: int, sampled: int, connected: int) -> None:
        """Record how many nodes a round sampled and how many were connected."""
        self.round(server_round).sampled = sampled
        self.num_nodes = max(self.num_nodes, connected)

    def record_replies(
        self,
        server_round: int,
        accepted: Sequence[tuple[int, Mapping[str, float]]],
        rejected: int,
        errors: int,
    ) -> None:
        """Record a round's train replies.

        Parameters
        ----------
        server_round : int
            The round.
        accepted : Sequence[tuple[int, Mapping[str, float]]]
            Node id and metrics of every accepted reply.
        rejected : int
            Replies that failed validation.
        errors : int
            Error replies.
        """
        record = self.round(server_round)
        record.accepted = len(accepted)
        record.rejected = rejected
        record.replied = len(accepted) + rejected
        missing = max(record.sampled - record.replied - errors, 0)
        record.failed = errors + missing

        for node_id, metrics in accepted:
            self._add_reply(record, node_id, metrics)

        losses = [metrics["train-loss"] for _, metrics in accepted]
        record.train_loss = statistics.fmean(losses) if losses else None
        clocks = [metrics.get("device-clock-s", 0.0) for _, metrics in accepted]
        previous = self.rounds.get(server_round - 1)
        record.simulated_time_s = max([*clocks, previous.simulated_time_s if previous else 0.0])

    def _add_reply(self, record: RoundRecord, node_id: int, metrics: Mapping[str, float]) -> None:
        record.recovered += int(metrics.get("recovered", 0))
        record.partial += int(metrics.get("partial", 0))
        record.lost_steps += int(metrics.get("steps-lost", 0))

        for key in self._sums:
            self._sums[key] += metrics.get(key, 0)

        recoveries = int(metrics.get("recoveries", 0))
        if recoveries >= 1:
            self._recovery_times.append(metrics.get("recovery-time-s", 0.0) / recoveries)
            self._recompute_times.append(metrics.get("recompute-time-sim-s", 0.0) / recoveries)
        if "store-bytes" in metrics:
            self._store_bytes[node_id] = int(metrics["store-bytes"])

    def state_dict(self) -> dict[str, Any]:
        """Return everything the recorder has counted, as a JSON-ready dict.

        The header, path and ``complete`` flag are left out, because a resumed run
        writes its own header and is not complete until its last round.
        :meth:`load_state_dict` reads the dict back.
        """
        return {
            "rounds": [asdict(self.rounds[key]) for key in sorted(self.rounds)],
            "num_nodes": self.num_nodes,
            "initial_test": dict(self.initial_test),
            "final_test": dict(self.final_test),
            "sums": dict(self._sums),
            "store_bytes": {str(node_id): size for node_id, size in self._store_bytes.items()},
            "recovery_times": list(self._recovery_times),
            "recompute_times": list(self._recompute_times),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace what the recorder has counted with :meth:`state_dict` output.

        Nothing changes when ``state`` is invalid.

        Raises
        ------
        ValueError
            When ``state`` lacks a field, a round record has unknown fields, or a
            value has the wrong type.
        """
        try:
            rounds = [RoundRecord(**record) for record in state["rounds"]]
            num_nodes = int(state["num_nodes"])
            initial_test = dict(state["initial_test"])
            final_test = dict(state["final_test"])
            sums = {key: state["sums"][key] for key in self._sums}
            store_bytes = {int(node): int(size) for node, size in state["store_bytes"].items()}
            recovery_times = [float(value) for value in state["recovery_times"]]
            recompute_times = [float(value) for value in state["recompute_times"]]
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"recorder state is invalid: {error!r}") from error

        self.rounds = {record.round: record for record in rounds}
        self.num_nodes = num_nodes
        self.initial_test = initial_test
        self.final_test = final_test
        self._sums.update(sums)
        self._store_bytes = store_bytes
        self._recovery_times = recovery_times
        self._recompute_times = recompute_times

    def record_evaluation(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Record the global model's test metrics after a round (round 0: initial model)."""
        if server_round == 0:
            self.initial_test = dict(metrics)
            return

        record = self.round(server_round)
        record.test_mse = metrics.get("mse")
        record.test_mae = metrics.get("mae")
        self.final_test = dict(metrics)

    def to_dict(self) -> dict[str, Any]:
        """Return the results as a JSON-ready dict (see the module docstring)."""
        sums = self._sums
        rounds = [asdict(self.rounds[key]) for key in sorted(self.rounds)]
        failed = sum(record["failed"] for record in rounds)

        results: dict[str, Any] = {
            **self.header,
            "num_nodes": self.num_nodes,
            "complete": self.complete,
            "rounds": rounds,
            "failures": int(sums["failures"]) + failed,
            "recoveries": int(sums["recoveries"]),
            "median_recovery_time_s": _median(self._recovery_times),
            "median_recompute_time_sim_s": _median(self._recompute_times),
            "lost_steps": int(sums["steps-lost"]),
            "rejected_replies": sum(record["rejected"] for record in rounds),
            "storage_bytes": int(sums["checkpoint-bytes-written"]),
            "baseline_storage_bytes": int(sums["baseline-checkpoint-bytes"]),
            "storage_ratio": _ratio(
                sums["checkpoint-bytes-written"], sums["baseline-checkpoint-bytes"]
            ),
            "store_bytes": sum(self._store_bytes.values()),
            "checkpoint_time_s": sums["checkpoint-time-s"],
            "train_time_s": sums["train-time-s"],
            "checkpoint_overhead": _ratio(sums["checkpoint-time-s"], sums["train-time-s"]),
            "checkpoint_time_measured_s": sums["checkpoint-time-measured-s"],
            "train_time_measured_s": sums["train-time-measured-s"],
            "checkpoint_overhead_measured": _ratio(
                sums["checkpoint-time-measured-s"], sums["train-time-measured-s"]
            ),
            "simulated_time_s": rounds[-1]["simulated_time_s"] if rounds else 0.0,
            "initial_test_mse": self.initial_test.get("mse"),
            "initial_test_mae": self.initial_test.get("mae"),
            "final_test_mse": self.final_test.get("mse"),
            "final_test_mae": self.final_test.get("mae"),
            "final_test_by_site": _by_site(self.final_test),
        }
        return finite_or_none(results)

    def write(self) -> Path:
        """Write the results file atomically and return its path."""
        write_json_atomic(self.path, self.to_dict())
        return self.path

    def summary_table(self) -> str:
        """Return a short plain-text table of the rounds and the totals."""
        results = self.to_dict()
        lines = [
            f"{'round':>5} {'sampled':>7} {'replied':>7} {'failed':>6} {'recov':>5} "
            f"{'lost':>6} {'test_mse':>9} {'test_mae':>9} {'sim_time_s':>11}"
        ]
        for record in results["rounds"]:
            lines.append(
                f"{record['round']:>5} {record['sampled']:>7} {record['replied']:>7} "
                f"{record['failed']:>6} {record['recovered']:>5} {record['lost_steps']:>6} "
                f"{_fmt(record['test_mse']):>9} {_fmt(record['test_mae']):>9} "
                f"{record['simulated_time_s']:>11.1f}"
            )
        lines.append(
            f"mode={results['mode']} nodes={results['num_nodes']} "
            f"failures={results['failures']} recoveries={results['recoveries']} "
            f"median_recovery_time_s={_fmt(results['median_recovery_time_s'])} "
            f"storage_ratio={_fmt(results['storage_ratio'])} "
            f"checkpoint_overhead={_fmt(results['checkpoint_overhead'])}"
        )
        return "\n".join(lines)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temporary file in the target folder, fsync it, then rename it.

    A reader sees either the previous file or the complete new one.

    Parameters
    ----------
    path : Path
        Target file; its folder is created when missing.
    data : Mapping[str, Any]
        JSON-serializable content; NaN and Inf are not allowed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    descriptor, temp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise

    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _by_site(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    sites: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, _, site = key.partition("/")
        if site:
            sites.setdefault(site, {})[name] = value
    return sites


def finite_or_none(value: Any) -> Any:
    """Replace NaN and Inf floats, also inside dicts and lists, with None.

    JSON has no NaN or Inf, so a diverged model's test loss is written as null.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    return value


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
