"""Server checkpoints after every round, and resuming a killed run from the last one.

After each completed round (aggregation, then the server's evaluation),
`ServerCheckpointer.save` commits one checkpoint into a cb_mobile `CheckpointStore`
with device id ``server``. It holds:

- the global model arrays, encoded losslessly, so a resumed run starts from the
  exact bits the killed run had;
- the global RNG states (torch, numpy, Python). FedAvg samples nodes with Python's
  ``random``, so restoring it makes the next round sample what the killed run would
  have sampled from the same nodes. `CheckBulletFedAvg` keeps no other state across
  rounds: its reply specs come from the initial model and its copy of the global
  model from the arrays of each round;
- the results recorded so far, as JSON in the meta. The per-recovery time lists
  go into float64 tensors, so the meta grows only with rounds and nodes;
- the completed round, ``model_version`` ``r<round + 1>`` (the version nodes get
  next), ``loss`` = the round's test MSE, and a fingerprint of the run config.

`run_with_checkpoints` runs the strategy. With ``resume`` it reads the newest
checkpoint that reads cleanly, rejects it with a `CheckpointError` when its run
config fingerprint differs from this run's, restores model, RNG and results, and
runs rounds ``last + 1 .. num_rounds`` through `ResumedRounds`, which hands the
strategy the real round numbers. Keys that only say where files go or how long to
run (see `FINGERPRINT_IGNORED`) may change between the runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from cb_mobile.codec import LosslessCodec, decode_tensors
from cb_mobile.errors import CheckpointError, CorruptCheckpointError, NoValidCheckpointError
from cb_mobile.state import (
    TrainingState,
    capture_rng_state,
    flatten_state,
    restore_rng_state,
    unflatten_state,
)
from cb_mobile.store import CheckpointStore, CommitResult
from server_app.config import RunSettings
from server_app.results import RunRecorder

logger = logging.getLogger(__name__)

SERVER_DEVICE_ID = "server"
KEEP_CHECKPOINTS = 3
"""Newest server checkpoints kept; older ones are deleted after each commit."""
SERVER_STORE_SUFFIX = ".server-store"
"""Suffix of the default server store, which replaces the results file's ``.json``."""

FINGERPRINT_IGNORED: tuple[str, ...] = (
    "resume",
    "server-store",
    "results-path",
    "store-root",
    "num-server-rounds",
    "round-timeout-s",
)
"""Run config keys that may differ between a killed run and its resumed run."""

RESULTS_TENSOR_PREFIX = "results/"
# Keys of RunRecorder.state_dict() whose lists of floats grow with every recovery;
# they are stored as float64 tensors instead of in the JSON meta.
_RESULT_LISTS: tuple[str, ...] = ("recovery_times", "recompute_times")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class ServerState:
    """Contents of one server checkpoint.

    Attributes
    ----------
    round : int
        The last completed round.
    arrays : ArrayRecord
        The global model after that round.
    results : dict
        `recorder_state` of the run's recorder after that round.
    rng : dict or None
        `capture_rng_state` output taken after that round.
    fingerprint : str
        SHA-256 of the run config keys that must match on resume.
    run_config : dict
        Those keys and their values.
    checkpoint_id : str or None
        The store's id of the checkpoint, once committed or read.
    """

    round: int
    arrays: ArrayRecord
    results: dict[str, Any]
    rng: dict[str, Any] | None
    fingerprint: str
    run_config: dict[str, Any]
    checkpoint_id: str | None = field(default=None)


def config_fingerprint(run_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return the SHA-256 of the run config keys that must match on resume, and those keys.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        The run config with dash-separated keys, as `RunSettings.to_run_config` gives it.

    Returns
    -------
    tuple of str and dict
        The hex digest and the fingerprinted keys with their values, sorted by key.
    """
    kept = {key: run_config[key] for key in sorted(run_config) if key not in FINGERPRINT_IGNORED}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest(), kept


def arrays_digest(arrays: ArrayRecord) -> str:
    """Return the SHA-256 over the keys, dtypes, shapes and bytes of ``arrays``, in order."""
    digest = hashlib.sha256()
    for key, array in arrays.items():
        values = np.ascontiguousarray(array.numpy())
        digest.update(f"{key}|{values.dtype.str}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def recorder_state(recorder: RunRecorder) -> dict[str, Any]:
    """Return `RunRecorder.state_dict` of ``recorder``: everything it has counted, JSON-ready."""
    return recorder.state_dict()


def restore_recorder(recorder: RunRecorder, results: Mapping[str, Any]) -> None:
    """Load `recorder_state` output into ``recorder``, replacing what it counted.

    Raises
    ------
    CorruptCheckpointError
        When ``results`` lacks a field or a round record has unknown fields.
    """
    try:
        recorder.load_state_dict(results)
    except ValueError as error:
        raise CorruptCheckpointError(
            f"the results in the server checkpoint are incomplete ({error}); "
            "resume from another checkpoint or start the run again with resume=false"
        ) from error


def capture_server_state(
    server_round: int, arrays: ArrayRecord, recorder: RunRecorder, run_config: Mapping[str, Any]
) -> ServerState:
    """Return the server's state after ``server_round``, with the RNG states of this moment."""
    fingerprint, kept = config_fingerprint(run_config)
    return ServerState(
        round=server_round,
        arrays=arrays,
        results=recorder_state(recorder),
        rng=capture_rng_state(),
        fingerprint=fingerprint,
        run_config=kept,
    )


class ServerCheckpointer:
    """Commits and reads the server's checkpoints in one cb_mobile store.

    Parameters
    ----------
    root : str or os.PathLike
        Store folder; created at the first commit.
    run_config : Mapping[str, Any]
        This run's config; its fingerprint goes into every checkpoint and is
        checked against the one read on resume.
    keep : int, default KEEP_CHECKPOINTS
        Newest checkpoints kept. Older ones stay readable until the next commit,
        so a damaged newest checkpoint still leaves one to fall back to.
    fsync : bool, default True
        Whether the store fsyncs its files and folders.
    """

    def __init__(
        self,
        root: str | Path,
        run_config: Mapping[str, Any],
        *,
        keep: int = KEEP_CHECKPOINTS,
        fsync: bool = True,
    ) -> None:
        if keep < 1:
            raise CheckpointError(f"keep={keep} server checkpoints is invalid; keep at least 1")
        self.root = Path(root)
        self.full_run_config = dict(run_config)
        self.fingerprint, self.run_config = config_fingerprint(run_config)
        self.keep = keep
        self.fsync = fsync
        self._codec = LosslessCodec()
        self._store: CheckpointStore | None = None

    @property
    def store(self) -> CheckpointStore:
        """The store, opened (and created) on first use."""
        if self._store is None:
            self._store = CheckpointStore(
                self.root, device_id=SERVER_DEVICE_ID, fsync=self.fsync, workers=1
            )
        return self._store

    def capture(self, server_round: int, arrays: ArrayRecord, recorder: RunRecorder) -> ServerState:
        """Return the server's state after ``server_round`` with this run's fingerprint."""
        return capture_server_state(server_round, arrays, recorder, self.full_run_config)

    def save(self, state: ServerState) -> CommitResult:
        """Commit ``state`` losslessly, then delete all but the newest ``keep`` checkpoints.

        Raises
        ------
        CheckpointError
            When the state cannot be stored, for example a full disk (`StoreWriteError`).
        """
        tensors, meta = flatten_state(_training_state(state))
        for name in _RESULT_LISTS:
            values = state.results.get(name, [])
            tensors[RESULTS_TENSOR_PREFIX + name] = torch.tensor(values, dtype=torch.float64)

        encoded = {name: self._codec.encode(tensor) for name, tensor in tensors.items()}
        result = self.store.commit(encoded, meta)
        state.checkpoint_id = result.checkpoint_id
        logger.info(
            "Server checkpoint %s: round %d, test MSE %s, %d bytes written to %s",
            result.checkpoint_id,
            state.round,
            meta["loss"],
            result.bytes_written,
            self.root,
        )

        self._prune()
        return result

    def load_latest(self) -> ServerState | None:
        """Return the newest server checkpoint that reads cleanly, or None when there is none.

        A checkpoint whose chunks, manifest or metadata are damaged is logged and
        skipped in favour of the next older one.

        Raises
        ------
        CheckpointError
            When the checkpoint was written by a run with another config
            (fingerprint mismatch); the message names the keys that differ.
        """
        if not (self.root / "devices" / SERVER_DEVICE_ID).is_dir():
            logger.info("No server checkpoint under %s", self.root)
            return None

        try:
            info, encoded = self.store.read_latest()
        except NoValidCheckpointError as error:
            logger.warning("No server checkpoint under %s reads cleanly: %s", self.root, error)
            return None

        candidates = [(info.checkpoint_id, encoded, info.meta)]
        older = [entry for entry in self.store.checkpoints() if entry.seq < info.seq]
        for checkpoint_id, tensors, meta in self._with_older(candidates, older):
            try:
                state = _server_state(decode_tensors(tensors), meta)
            except CheckpointError as error:
                logger.warning(
                    "Server checkpoint %s is damaged (%s); trying an older one", checkpoint_id, error
                )
                continue

            state.checkpoint_id = checkpoint_id
            self._check_fingerprint(state)
            return state

        logger.warning("No server checkpoint under %s has intact metadata", self.root)
        return None

    def read(self, checkpoint_id: str) -> ServerState:
        """Read one server checkpoint by id, without the fingerprint check.

        Raises
        ------
        CheckpointError
            When the id is unknown or the checkpoint is damaged.
        """
        tensors, meta = self.store.read(checkpoint_id)
        state = _server_state(decode_tensors(tensors), meta)
        state.checkpoint_id = checkpoint_id
        return state

    def clear(self) -> int:
        """Delete every server checkpoint in the store and return how many were deleted."""
        if not (self.root / "devices" / SERVER_DEVICE_ID).is_dir():
            return 0
        checkpoints = self.store.checkpoints()
        for entry in checkpoints:
            self.store.delete(entry.checkpoint_id)
        return len(checkpoints)

    def _with_older(
        self, candidates: list[tuple[str, Any, Mapping[str, Any]]], older: list[Any]
    ) -> Iterable[tuple[str, Any, Mapping[str, Any]]]:
        yield from candidates
        for entry in reversed(older):
            try:
                tensors, meta = self.store.read(entry.checkpoint_id)
            except CorruptCheckpointError as error:
                logger.warning(
                    "Server checkpoint %s is damaged (%s); trying an older one",
                    entry.checkpoint_id,
                    error,
                )
                continue
            yield entry.checkpoint_id, tensors, meta

    def _check_fingerprint(self, state: ServerState) -> None:
        if state.fingerprint == self.fingerprint:
            return

        keys = sorted(set(state.run_config) | set(self.run_config))
        differ = [
            f"{key}: checkpoint {state.run_config.get(key)!r}, this run {self.run_config.get(key)!r}"
            for key in keys
            if state.run_config.get(key) != self.run_config.get(key)
        ]
        raise CheckpointError(
            f"server checkpoint {state.checkpoint_id} (round {state.round}) under {self.root} "
            f"was written by a run with another config ({'; '.join(differ) or 'fingerprint only'}). "
            "Resume with the run config of that run, or start a new run with resume=false "
            "or another server-store"
        )

    def _prune(self) -> None:
        checkpoints = self.store.checkpoints()
        for entry in checkpoints[: -self.keep]:
            try:
                self.store.delete(entry.checkpoint_id)
            except CheckpointError as error:
                logger.warning(
                    "Deleting old server checkpoint %s failed: %s", entry.checkpoint_id, error
                )


class ResumedRounds(Strategy):
    """Runs a strategy's rounds ``offset + 1 ..`` through Flower's round loop.

    ``Strategy.start`` numbers rounds from 1. This wrapper adds ``offset`` to every
    round number before it reaches ``inner``, so train configs carry the real
    ``server-round`` and ``model-version`` that nodes use for staleness.

    Parameters
    ----------
    inner : Strategy
        The strategy that configures and aggregates the rounds.
    offset : int
        Rounds already completed by an earlier run.
    """

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def summary(self) -> None:
        """Log the inner strategy's summary and the round offset."""
        self.inner.summary()
        logger.info(
            "Resumed run: Flower's round k below is round k+%d of the run", self.offset
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the real round ``server_round + offset``."""
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies of the real round ``server_round + offset``."""
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure node evaluation of the real round ``server_round + offset``."""
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate node evaluation of the real round ``server_round + offset``."""
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def run_with_checkpoints(
    strategy: Strategy,
    *,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_fn: EvaluateFn,
    recorder: RunRecorder,
    checkpointer: ServerCheckpointer,
    resume: bool,
) -> int:
    """Run ``strategy`` with a server checkpoint after every round; resume when asked.

    Parameters
    ----------
    strategy : Strategy
        The strategy, for example `CheckBulletFedAvg`.
    grid : Grid
        The ServerApp's grid.
    initial_arrays : ArrayRecord
        The freshly built global model; a restored model must match its keys,
        shapes and dtypes.
    num_rounds : int
        The run's last round.
    timeout : float
        Seconds to wait for a round's replies.
    train_config : ConfigRecord
        Per-run train config.
    evaluate_fn : EvaluateFn
        The server's evaluation; it records into ``recorder`` and writes the results.
    recorder : RunRecorder
        The run's recorder; on resume it gets the restored results and
        ``resumed_from_round`` in its header.
    checkpointer : ServerCheckpointer
        Where the server checkpoints go, with this run's config fingerprint.
    resume : bool
        Continue from the newest checkpoint; False deletes the store's earlier
        server checkpoints and starts at round 1.

    Returns
    -------
    int
        The first round this call ran (``num_rounds + 1`` when none was left).

    Raises
    ------
    CheckpointError
        When the checkpoint to resume from has another config fingerprint or a
        model whose keys, shapes or dtypes differ from ``initial_arrays``.
    """
    recorder.header["resumed_from_round"] = None
    state = _state_to_resume(checkpointer, resume)
    arrays, offset = initial_arrays, 0
    if state is not None:
        _check_same_layout(state, initial_arrays)
        restore_recorder(recorder, state.results)
        if state.rng is not None:
            restore_rng_state(state.rng)
        recorder.header["resumed_from_round"] = state.round
        arrays, offset = state.arrays, state.round
        logger.info(
            "Resuming from server checkpoint %s: round %d of %d done, global model sha256 %s",
            state.checkpoint_id,
            state.round,
            num_rounds,
            arrays_digest(arrays),
        )

    if offset >= num_rounds:
        logger.info("All %d rounds were done before the restart; nothing left to run", num_rounds)
        return num_rounds + 1

    strategy_to_run = strategy if offset == 0 else ResumedRounds(strategy, offset)
    strategy_to_run.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=num_rounds - offset,
        timeout=timeout,
        train_config=train_config,
        evaluate_fn=_checkpointing_evaluate_fn(evaluate_fn, checkpointer, recorder, offset),
    )
    return offset + 1


def server_store_path(settings: RunSettings) -> Path:
    """Return the server store folder: ``server-store``, or one named after the results file.

    The default for ``results/checkbullet-seed42.json`` is
    ``results/checkbullet-seed42.server-store``, so runs that write their results
    into the same folder never share, and never clear, each other's server checkpoints.
    """
    if settings.server_store:
        return Path(settings.server_store)

    results_path = settings.resolved_results_path()
    stem = results_path.name.removesuffix(".json")
    return results_path.with_name(stem + SERVER_STORE_SUFFIX)


def checkpointer_for(settings: RunSettings) -> ServerCheckpointer:
    """Return the `ServerCheckpointer` of a run with these settings."""
    return ServerCheckpointer(server_store_path(settings), settings.to_run_config())


def _state_to_resume(checkpointer: ServerCheckpointer, resume: bool) -> ServerState | None:
    if not resume:
        deleted = checkpointer.clear()
        if deleted:
            logger.info(
                "resume=false: deleted %d server checkpoint(s) of an earlier run under %s",
                deleted,
                checkpointer.root,
            )
        return None

    state = checkpointer.load_latest()
    if state is None:
        logger.info("resume=true but no server checkpoint exists; starting from round 1")
    return state


def _checkpointing_evaluate_fn(
    evaluate_fn: EvaluateFn,
    checkpointer: ServerCheckpointer,
    recorder: RunRecorder,
    offset: int,
) -> EvaluateFn:
    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + offset
        if flower_round == 0 and offset > 0:
            # The restored model was evaluated as round `offset` before the restart.
            return None

        metrics = evaluate_fn(server_round, arrays)
        if server_round == 0:
            return metrics

        try:
            checkpointer.save(checkpointer.capture(server_round, arrays, recorder))
        except CheckpointError as error:
            logger.error(
                "Server checkpoint of round %d failed, so a restart would redo this round: %s",
                server_round,
                error,
            )
        return metrics

    return evaluate


def _check_same_layout(state: ServerState, initial_arrays: ArrayRecord) -> None:
    expected = {key: (array.dtype, tuple(array.shape)) for key, array in initial_arrays.items()}
    restored = {key: (array.dtype, tuple(array.shape)) for key, array in state.arrays.items()}
    if restored != expected:
        raise CheckpointError(
            f"server checkpoint {state.checkpoint_id} contains a model whose arrays "
            f"({len(restored)} keys) differ from this run's model ({len(expected)} keys) in "
            "keys, shapes or dtypes; resume with the run config of the killed run"
        )


def _training_state(state: ServerState) -> TrainingState:
    mse = state.results["rounds"][-1].get("test_mse") if state.results["rounds"] else None
    loss = mse if isinstance(mse, float) and math.isfinite(mse) else None
    json_results = {key: value for key, value in state.results.items() if key not in _RESULT_LISTS}
    return TrainingState(
        model=state.arrays.to_torch_state_dict(),
        optimizer=None,
        step=state.round,
        round=state.round,
        loss=loss,
        model_version=f"r{state.round + 1}",
        rng=state.rng,
        extra={
            "fingerprint": state.fingerprint,
            "run_config": state.run_config,
            "results": json_results,
        },
    )


def _server_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> ServerState:
    tensors = dict(tensors)
    lists = {}
    for name in _RESULT_LISTS:
        tensor = tensors.pop(RESULTS_TENSOR_PREFIX + name, None)
        if tensor is None:
            raise CorruptCheckpointError(
                f"server checkpoint is missing the tensor {RESULTS_TENSOR_PREFIX + name}; "
                "resume from another checkpoint"
            )
        lists[name] = [float(value) for value in tensor.tolist()]

    training = unflatten_state(tensors, meta)
    extra = training.extra
    for key in ("fingerprint", "run_config", "results"):
        if key not in extra:
            raise CorruptCheckpointError(
                f"server checkpoint metadata is missing extra[{key!r}]; "
                "resume from another checkpoint"
            )

    return ServerState(
        round=training.round,
        arrays=ArrayRecord(training.model),
        results={**extra["results"], **lists},
        rng=training.rng,
        fingerprint=str(extra["fingerprint"]),
        run_config=dict(extra["run_config"]),
    )
