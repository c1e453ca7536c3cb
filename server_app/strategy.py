"""FedAvg that checks every train reply and weights recovered and partial states.

`CheckBulletFedAvg` changes two steps of Flower's ``FedAvg``:

- ``configure_train`` waits a bounded time for nodes, clamps the minimum node
  counts to what is connected (``FedAvg`` would otherwise wait forever when the
  federation is smaller than ``min_available_nodes``), and adds ``model-version``
  to the train config.
- ``aggregate_train`` rejects replies that fail `server_app.validation`, gives each
  accepted reply its aggregation weight (see `aggregation_weight`), and only then
  hands the replies to ``FedAvg.aggregate_train``. When every reply is rejected or
  failed, the round returns no arrays and the previous global model is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server_app.results import RunRecorder
from server_app.validation import (
    ARRAYS_KEY,
    MAX_NORM_RATIO,
    METRICS_KEY,
    CheckedReply,
    InvalidReplyError,
    array_specs,
    check_train_reply,
    find_norm_outliers,
)

logger = logging.getLogger(__name__)

WEIGHT_KEY = "aggregation-weight"
NODE_POLL_S = 0.5


def aggregation_weight(metrics: Mapping[str, float]) -> float:
    """Return the FedAvg weight of an accepted train reply.

    A complete, fresh reply weighs its ``num-examples``, as in plain FedAvg. A
    reply with ``partial=1`` or ``recovered=1`` weighs

        num-examples * (steps-completed / steps-planned) / (1 + staleness)

    so a state that did half its local steps counts half, and a state trained
    from a global model one round old counts half again. The staleness discount
    keeps an old state from pulling the new global model back toward an older one.

    Parameters
    ----------
    metrics : Mapping[str, float]
        Metrics of a reply that passed `check_train_reply`.

    Returns
    -------
    float
        The weight, 0 when a partial reply completed no step.
    """
    examples = float(metrics["num-examples"])
    if not (metrics["partial"] or metrics["recovered"]):
        return examples

    progress = metrics["steps-completed"] / metrics["steps-planned"]
    return examples * progress / (1.0 + metrics["staleness"])


class CheckBulletFedAvg(FedAvg):
    """FedAvg with reply validation, metadata weights and bounded node sampling.

    Parameters
    ----------
    initial_arrays : ArrayRecord
        The initial global model. Its keys, shapes and dtypes are what every
        train reply must match.
    fraction_train : float, default 1.0
        Share of the connected nodes sampled each round.
    min_train_nodes : int, default 2
        Nodes sampled at least, clamped to the number connected.
    min_available_nodes : int, default 2
        Nodes to wait for before sampling, up to ``node_wait_s`` seconds.
    node_wait_s : float, default 30.0
        Maximum wait, in seconds, for ``min_available_nodes`` to connect.
        After it the round samples from the nodes that are connected.
    max_norm_ratio : float, default MAX_NORM_RATIO
        Largest accepted ratio of a reply array's L2 norm to the round's median.
    recorder : RunRecorder or None, default None
        Receives sampling and reply counts for the results file.
    """

    def __init__(
        self,
        initial_arrays: ArrayRecord,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        node_wait_s: float = 30.0,
        max_norm_ratio: float = MAX_NORM_RATIO,
        recorder: RunRecorder | None = None,
    ) -> None:
        # Evaluation runs on the server (evaluate_fn), so no node is asked to evaluate.
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
            weighted_by_key=WEIGHT_KEY,
            arrayrecord_key=ARRAYS_KEY,
        )
        self.node_wait_s = node_wait_s
        self.max_norm_ratio = max_norm_ratio
        self.recorder = recorder
        self.specs = array_specs(initial_arrays)
        self.global_arrays = _decode(initial_arrays)

    def summary(self) -> None:
        """Log the FedAvg settings and the reply checks."""
        super().summary()
        logger.info(
            "Reply checks: %d arrays with fixed shapes and dtypes, finite values, "
            "L2 norm at most %gx the round's low median. Partial and recovered replies "
            "are weighted by steps-completed/steps-planned/(1+staleness)",
            len(self.specs),
            self.max_norm_ratio,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample connected nodes and send them the global model and round config."""
        self.global_arrays = _decode(arrays)
        connected = self._wait_for_nodes(grid)
        if connected == 0:
            logger.warning(
                "Round %d: no node is connected, so the round trains nothing", server_round
            )
            self._record_sampling(server_round, 0, 0)
            return []

        round_config = ConfigRecord(dict(config))
        round_config["model-version"] = f"r{server_round}"

        # FedAvg samples max(fraction * connected, min_train_nodes) nodes and
        # waits until min_available_nodes are connected. Clamping both to the
        # connected count keeps a small federation from waiting forever.
        requested = (self.min_train_nodes, self.min_available_nodes)
        self.min_train_nodes = min(self.min_train_nodes, connected)
        self.min_available_nodes = min(self.min_available_nodes, connected)
        try:
            messages = list(super().configure_train(server_round, arrays, round_config, grid))
        finally:
            self.min_train_nodes, self.min_available_nodes = requested

        self._record_sampling(server_round, len(messages), connected)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject bad replies, weight the rest from their metadata, then run FedAvg."""
        replies = list(replies)
        errors = [reply for reply in replies if reply.has_error()]
        accepted, rejected = self._screen_replies(
            server_round, [reply for reply in replies if not reply.has_error()]
        )
        self._log_replies(server_round, len(replies), len(accepted), rejected, errors)
        if self.recorder is not None:
            self.recorder.record_replies(
                server_round,
                [(checked.node_id, checked.metrics) for checked, _ in accepted],
                rejected=len(rejected),
                errors=len(errors),
            )

        if not accepted:
            logger.warning(
                "Round %d: no reply can be aggregated, so the global model stays as it was",
                server_round,
            )
            return None, None

        # FedAvg logs its own count line for the accepted replies it averages.
        weighted = [_weighted_reply(checked, weight) for checked, weight in accepted]
        arrays, metrics = super().aggregate_train(server_round, weighted)
        return self._restore_dtypes(arrays), metrics

    def _screen_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[tuple[CheckedReply, float]], list[tuple[int, str]]]:
        checked: list[CheckedReply] = []
        rejected: list[tuple[int, str]] = []
        for reply in replies:
            try:
                checked.append(check_train_reply(reply, self.specs, server_round))
            except InvalidReplyError as exc:
                rejected.append((reply.metadata.src_node_id, str(exc)))

        outliers = find_norm_outliers(checked, self.global_arrays, self.max_norm_ratio)
        accepted: list[tuple[CheckedReply, float]] = []
        for index, reply in enumerate(checked):
            if index in outliers:
                rejected.append((reply.node_id, outliers[index]))
                continue

            weight = aggregation_weight(reply.metrics)
            if weight <= 0.0:
                rejected.append(
                    (
                        reply.node_id,
                        f"partial reply completed 0 of {int(reply.metrics['steps-planned'])} "
                        "steps, so its aggregation weight is 0",
                    )
                )
                continue
            accepted.append((reply, weight))
        return accepted, rejected

    def _log_replies(
        self,
        server_round: int,
        received: int,
        valid: int,
        rejected: list[tuple[int, str]],
        errors: list[Message],
    ) -> None:
        # FedAvg then logs its own "Received N results and 0 failures" line, which
        # counts only the valid replies handed to it, so this line names both.
        logger.info(
            "aggregate_train: Received %d replies: %d valid, %d rejected, %d failures "
            "(FedAvg aggregates the %d valid ones)",
            received,
            valid,
            len(rejected),
            len(errors),
            valid,
        )
        for node_id, reason in rejected:
            logger.warning(
                "\t> Rejected reply from node %d in round %d: %s", node_id, server_round, reason
            )
        for reply in errors:
            logger.info(
                "\t> Received error in reply from node %d: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )

    def _wait_for_nodes(self, grid: Grid) -> int:
        deadline = time.monotonic() + self.node_wait_s
        connected = len(list(grid.get_node_ids()))
        while connected < self.min_available_nodes and time.monotonic() < deadline:
            time.sleep(min(NODE_POLL_S, max(deadline - time.monotonic(), 0.0)))
            connected = len(list(grid.get_node_ids()))

        if connected < self.min_available_nodes:
            logger.warning(
                "%d nodes connected after %.0f s, fewer than the %d requested; "
                "sampling from the connected ones",
                connected,
                self.node_wait_s,
                self.min_available_nodes,
            )
        return connected

    def _record_sampling(self, server_round: int, sampled: int, connected: int) -> None:
        if self.recorder is not None:
            self.recorder.record_sampling(server_round, sampled, connected)

    def _restore_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        # Averaging integer buffers yields floats. The global model keeps the
        # initial dtypes, because the next round's replies are checked against them.
        if arrays is None:
            return None
        if all(str(arrays[key].dtype) == spec.dtype for key, spec in self.specs.items()):
            return arrays

        restored = {}
        for key, spec in self.specs.items():
            value = arrays[key].numpy()
            if np.issubdtype(np.dtype(spec.dtype), np.integer):
                value = np.rint(value)
            restored[key] = Array(np.ascontiguousarray(value.astype(spec.dtype)))
        return ArrayRecord(restored)


def _weighted_reply(checked: CheckedReply, weight: float) -> Message:
    metrics = checked.metrics
    if metrics["partial"] or metrics["recovered"]:
        logger.info(
            "\t> Node %d: %s state, %d of %d steps, staleness %d, weight %.1f of %d examples",
            checked.node_id,
            "partial" if metrics["partial"] else "recovered",
            metrics["steps-completed"],
            metrics["steps-planned"],
            metrics["staleness"],
            weight,
            metrics["num-examples"],
        )

    content = RecordDict(
        {
            ARRAYS_KEY: checked.reply.content[ARRAYS_KEY],
            METRICS_KEY: MetricRecord(
                {WEIGHT_KEY: weight, "train-loss": float(metrics["train-loss"])}
            ),
        }
    )
    return Message(content=content, metadata=checked.reply.metadata)


def _decode(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}
