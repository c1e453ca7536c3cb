"""Checks that a train reply is safe to aggregate before FedAvg averages it.

A reply passes when its ``"arrays"`` ArrayRecord has exactly the global model's
keys, each with the expected shape and dtype, every value finite, and a payload no
larger than the arrays' raw bytes plus a small header allowance per array.
Its ``"metrics"`` MetricRecord must carry `REQUIRED_METRICS` with sane values, and
its ``server-round`` must not be newer than the current round.

A second, round-level check compares replies with each other: an array whose L2
norm is more than `MAX_NORM_RATIO` times the low median norm of that array across
the round's replies and the current global model is rejected as an outlier. The
factor is loose on purpose. Honest local training moves a norm by a few percent
to a few times, while a diverged or corrupted update is off by orders of magnitude.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"

# Every metric the aggregation weight and the results file are built from. The
# measured wall-clock times are optional: without them the measured overhead is null.
REQUIRED_METRICS: tuple[str, ...] = (
    "num-examples",
    "steps-completed",
    "steps-planned",
    "steps-lost",
    "failed",
    "partial",
    "recovered",
    "staleness",
    "train-loss",
    "recovery-time-s",
    "recompute-time-sim-s",
    "checkpoint-bytes-written",
    "baseline-checkpoint-bytes",
    "store-bytes",
    "checkpoint-time-s",
    "train-time-s",
    "device-clock-s",
    "server-round",
    "failures",
    "recoveries",
)
FLAG_METRICS: tuple[str, ...] = ("partial", "recovered", "failed")
COUNT_METRICS: tuple[str, ...] = (
    "num-examples",
    "steps-completed",
    "steps-planned",
    "steps-lost",
    "staleness",
    "server-round",
    "checkpoint-bytes-written",
    "baseline-checkpoint-bytes",
    "store-bytes",
    "failures",
    "recoveries",
)
NON_NEGATIVE_METRICS: tuple[str, ...] = (
    "recovery-time-s",
    "recompute-time-sim-s",
    "checkpoint-time-s",
    "train-time-s",
    "checkpoint-time-measured-s",
    "train-time-measured-s",
    "device-clock-s",
)

MAX_NORM_RATIO = 100.0
# Floor of the median norm, as a root mean square per element. Without it an
# array whose median norm is near zero (a freshly zeroed bias) would reject any
# reply that moved it at all.
NORM_FLOOR_RMS = 1e-2
# Bytes allowed per array beyond its raw data: the .npy header Flower serializes.
ARRAY_HEADER_BYTES = 1024


class InvalidReplyError(ValueError):
    """A train reply failed a check; the message is the reason that gets logged."""


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and dtype of one array of the global model."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Size of the raw array data in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class CheckedReply:
    """A train reply that passed `check_train_reply`, decoded once.

    Attributes
    ----------
    reply : Message
        The original reply.
    node_id : int
        Node that sent it.
    arrays : dict[str, np.ndarray]
        Decoded arrays, keyed as in the global model.
    metrics : dict[str, float]
        The reply's metrics, every value a finite scalar.
    """

    reply: Message
    node_id: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


def array_specs(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """Return the expected spec of every array in the global model."""
    return {key: ArraySpec(tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}


def max_reply_bytes(specs: Mapping[str, ArraySpec]) -> int:
    """Return the largest serialized ArrayRecord a reply may carry."""
    return sum(spec.nbytes + ARRAY_HEADER_BYTES for spec in specs.values())


def check_train_reply(
    reply: Message, specs: Mapping[str, ArraySpec], server_round: int
) -> CheckedReply:
    """Check one train reply's arrays and metrics.

    Parameters
    ----------
    reply : Message
        A reply without an error.
    specs : Mapping[str, ArraySpec]
        Expected arrays, from `array_specs` of the global model.
    server_round : int
        The current round; the reply's ``server-round`` may not be newer.

    Returns
    -------
    CheckedReply
        The decoded arrays and metrics.

    Raises
    ------
    InvalidReplyError
        With the first failed check as the message.
    """
    content = reply.content
    record = content.get(ARRAYS_KEY)
    if not isinstance(record, ArrayRecord):
        raise InvalidReplyError(f"reply has no ArrayRecord under {ARRAYS_KEY!r}")
    metric_record = content.get(METRICS_KEY)
    if not isinstance(metric_record, MetricRecord):
        raise InvalidReplyError(f"reply has no MetricRecord under {METRICS_KEY!r}")

    metrics = check_metrics(metric_record, server_round)
    arrays = check_arrays(record, specs)
    return CheckedReply(reply, reply.metadata.src_node_id, arrays, metrics)


def check_arrays(record: ArrayRecord, specs: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """Check keys, payload size, shapes, dtypes and finiteness; return decoded arrays."""
    missing = sorted(set(specs) - set(record))
    if missing:
        raise InvalidReplyError(f"missing arrays {missing}")
    extra = sorted(set(record) - set(specs))
    if extra:
        raise InvalidReplyError(f"unexpected arrays {extra}")

    # Sizes are checked on the serialized bytes before anything is decoded.
    total_bytes = sum(len(array.data) for array in record.values())
    limit = max_reply_bytes(specs)
    if total_bytes > limit:
        raise InvalidReplyError(f"arrays take {total_bytes} bytes, more than the limit of {limit}")

    decoded: dict[str, np.ndarray] = {}
    for key, spec in specs.items():
        decoded[key] = _check_array(key, record[key], spec)
    return decoded


def _check_array(key: str, array: Array, spec: ArraySpec) -> np.ndarray:
    if len(array.data) > spec.nbytes + ARRAY_HEADER_BYTES:
        raise InvalidReplyError(
            f"array {key!r} takes {len(array.data)} bytes, expected at most "
            f"{spec.nbytes + ARRAY_HEADER_BYTES}"
        )
    if tuple(array.shape) != spec.shape:
        raise InvalidReplyError(
            f"array {key!r} has shape {tuple(array.shape)}, expected {spec.shape}"
        )
    if str(array.dtype) != spec.dtype:
        raise InvalidReplyError(f"array {key!r} has dtype {array.dtype}, expected {spec.dtype}")

    try:
        value = array.numpy()
    except (ValueError, TypeError, OSError, EOFError) as exc:
        raise InvalidReplyError(
            f"array {key!r} does not decode as a NumPy .npy array ({type(exc).__name__})"
        ) from exc

    # The declared shape and dtype are metadata; the decoded array must agree.
    if value.shape != spec.shape or str(value.dtype) != spec.dtype:
        raise InvalidReplyError(
            f"array {key!r} decodes to {value.dtype}{list(value.shape)}, "
            f"expected {spec.dtype}{list(spec.shape)}"
        )
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        raise InvalidReplyError(f"array {key!r} has {bad} non-finite values (NaN or Inf)")
    return value


def check_metrics(record: MetricRecord, server_round: int) -> dict[str, float]:
    """Check the reply's metrics and return them as finite scalars."""
    missing = [key for key in REQUIRED_METRICS if key not in record]
    if missing:
        raise InvalidReplyError(f"missing metrics {missing}")

    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, list):
            if key in REQUIRED_METRICS:
                raise InvalidReplyError(f"metric {key!r} is a list, expected a number")
            continue
        if not math.isfinite(value):
            raise InvalidReplyError(f"metric {key!r} is {value}, expected a finite number")
        metrics[key] = value

    _check_metric_ranges(metrics, server_round)
    return metrics


def _check_metric_ranges(metrics: Mapping[str, float], server_round: int) -> None:
    for key in COUNT_METRICS:
        if key in metrics and (metrics[key] < 0 or not float(metrics[key]).is_integer()):
            raise InvalidReplyError(f"metric {key!r} is {metrics[key]}, expected a count >= 0")
    for key in FLAG_METRICS:
        if key in metrics and metrics[key] not in (0, 1):
            raise InvalidReplyError(f"metric {key!r} is {metrics[key]}, expected 0 or 1")
    for key in NON_NEGATIVE_METRICS:
        if key in metrics and metrics[key] < 0:
            raise InvalidReplyError(f"metric {key!r} is {metrics[key]}, expected >= 0")

    for key in ("num-examples", "steps-planned"):
        if metrics[key] < 1:
            raise InvalidReplyError(f"metric {key!r} is {metrics[key]}, expected at least 1")
    if metrics["steps-completed"] > metrics["steps-planned"]:
        raise InvalidReplyError(
            f"metric 'steps-completed' is {metrics['steps-completed']}, more than "
            f"steps-planned={metrics['steps-planned']}"
        )

    reply_round = metrics["server-round"]
    if reply_round > server_round:
        raise InvalidReplyError(
            f"reply is for server-round {int(reply_round)}, "
            f"newer than the current round {server_round}"
        )
    if metrics["staleness"] > server_round:
        raise InvalidReplyError(
            f"metric 'staleness' is {int(metrics['staleness'])}, more than the "
            f"{server_round} rounds run so far"
        )


def find_norm_outliers(
    replies: Sequence[CheckedReply],
    global_arrays: Mapping[str, np.ndarray],
    max_ratio: float = MAX_NORM_RATIO,
) -> dict[int, str]:
    """Find replies with an array whose L2 norm is far above the round's median.

    The reference for each array is the low median (the smaller middle value
    for an even count) of its norms in the replies and in the current global
    model. Counting the global model and taking the low median keep a wild
    reply from raising the reference to its own size, even when it is the
    round's only reply.

    NOTE: when most of a round's replies are inflated alike, the low median
    rises with them, so this check only catches a minority of outliers.

    Parameters
    ----------
    replies : Sequence[CheckedReply]
        Replies that passed `check_train_reply`.
    global_arrays : Mapping[str, np.ndarray]
        The global model these replies trained from.
    max_ratio : float, default MAX_NORM_RATIO
        Largest accepted ratio of an array's norm to the median norm.

    Returns
    -------
    dict[int, str]
        Index into ``replies`` to the reason it was rejected.
    """
    outliers: dict[int, str] = {}
    if not replies:
        return outliers

    for key, global_value in global_arrays.items():
        if not np.issubdtype(global_value.dtype, np.floating):
            continue

        norms = [_l2_norm(reply.arrays[key]) for reply in replies]
        median = statistics.median_low([*norms, _l2_norm(global_value)])
        floor = NORM_FLOOR_RMS * math.sqrt(max(global_value.size, 1))
        limit = max_ratio * max(median, floor)
        for index, norm in enumerate(norms):
            if norm > limit and index not in outliers:
                outliers[index] = (
                    f"array {key!r} has L2 norm {norm:.4g}, more than {max_ratio:g}x "
                    f"the round's median {median:.4g}"
                )
    return outliers


def _l2_norm(value: np.ndarray) -> float:
    return float(np.linalg.norm(value.astype(np.float64, copy=False).ravel()))
