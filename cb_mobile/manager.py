"""CheckpointManager: the one object a training loop embeds to checkpoint and recover.

A training loop calls :meth:`CheckpointManager.step` once per optimizer step. The
manager measures step time, queries its :class:`~cb_mobile.interval.IntervalPolicy`
whether a checkpoint is due, and if so captures the training state, encodes every tensor with
its codec and commits it to the device's :class:`~cb_mobile.store.CheckpointStore`.
After a restart, :meth:`CheckpointManager.recover` reads the stored checkpoints, skips
damaged ones, merges the lowest-loss ones and loads the result back into the model,
optimizer and RNGs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from cb_mobile.codec import (
    PARALLEL_CODEC_BYTES,
    Codec,
    EncodedTensor,
    codec_workers,
    decode_tensors,
    get_codec,
)
from cb_mobile.errors import (
    CheckpointError,
    CodecError,
    CorruptCheckpointError,
    NoValidCheckpointError,
    StoreWriteError,
)
from cb_mobile.interval import IntervalPolicy
from cb_mobile.merge import (
    RecoveryReport,
    Selection,
    checkpoint_loss,
    describe_selection,
    loss_weights,
    merge_training_states,
    select_min_loss,
)
from cb_mobile.state import (
    TrainingState,
    capture_rng_state,
    flatten_state,
    restore_rng_state,
    tensor_role,
    unflatten_state,
)
from cb_mobile.store import CheckpointInfo, CheckpointStore, CommitResult

__all__ = ["CheckpointManager", "CheckpointTiming", "ManagerStats", "RecoveryReport"]

logger = logging.getLogger(__name__)

# Key in TrainingState.extra where the manager keeps the step at which the round began.
ROUND_START_STEP = "round_start_step"


@dataclass(frozen=True)
class ManagerStats:
    """Counters of one manager since it was built.

    Attributes
    ----------
    checkpoints : int
        Checkpoints committed.
    skipped : int
        Checkpoints not committed: the store skipped them (for example because they
        cannot fit the cap), or a tensor failed to encode (for example NaN weights
        under a quantizing codec).
    write_errors : int
        Checkpoints that failed with :class:`~cb_mobile.errors.StoreWriteError`.
    recoveries : int
        Successful :meth:`CheckpointManager.recover` calls.
    checkpoint_seconds : float
        Checkpoint cost on the device clock: the cost hook's seconds when a hook is set,
        otherwise measured wall-clock seconds.
    measured_checkpoint_seconds : float
        Wall-clock seconds spent in snapshot, encode and commit.
    train_seconds : float
        Step time on the device clock: the ``step_seconds`` passed to
        :meth:`CheckpointManager.step`, otherwise measured wall-clock seconds.
    bytes_written : int
        Bytes the store wrote for committed checkpoints, after dedup and compression.
    logical_bytes : int
        Bytes of the encoded tensors of committed checkpoints, before dedup.
    """

    checkpoints: int = 0
    skipped: int = 0
    write_errors: int = 0
    recoveries: int = 0
    checkpoint_seconds: float = 0.0
    measured_checkpoint_seconds: float = 0.0
    train_seconds: float = 0.0
    bytes_written: int = 0
    logical_bytes: int = 0

    @property
    def overhead(self) -> float:
        """Checkpoint time as a share of training time on the device clock (NaN before any step)."""
        if self.train_seconds <= 0.0:
            return math.nan
        return self.checkpoint_seconds / self.train_seconds


@dataclass(frozen=True)
class CheckpointTiming:
    """Wall-clock seconds of the parts of one checkpoint."""

    snapshot_seconds: float
    encode_seconds: float
    commit_seconds: float

    @property
    def total_seconds(self) -> float:
        """Snapshot, encode and commit together."""
        return self.snapshot_seconds + self.encode_seconds + self.commit_seconds


@dataclass
class _Loaded:
    info: CheckpointInfo
    state: TrainingState


class CheckpointManager:
    """Failure-aware checkpointing and min-loss recovery for one device's training loop.

    Parameters
    ----------
    store : CheckpointStore, str or os.PathLike
        The device's store, or a directory to open one in with ``device_id``,
        ``cap_bytes`` and ``store_options``.
    model : torch.nn.Module
        The model whose state_dict is checkpointed and restored.
    optimizer : torch.optim.Optimizer or None, default None
        Its state_dict is checkpointed and restored.
    codec : str or Codec, default "int8"
        Codec for floating-point model tensors: ``"int8"``, ``"int4"``, ``"fp16"`` or
        ``"lossless"``.
    optimizer_codec : str or Codec, default "lossless"
        Codec for floating-point optimizer buffers such as Adam's moments. Integer
        tensors, RNG states and counters are always stored losslessly.
    policy : IntervalPolicy or None, default None
        Interval policy. None builds ``IntervalPolicy()`` with its defaults.
    merge_k : int, default 1
        How many lowest-loss checkpoints :meth:`recover` merges by default.
    device_id : str, default "device-0"
        Device id for a store built from a path. A given store keeps its own id.
    cap_bytes : int or None, default None
        Storage cap in bytes for a store built from a path.
    checkpoint_cost_hook : callable or None, default None
        Turns a :class:`~cb_mobile.store.CommitResult` into the checkpoint's cost in
        device seconds, for example bytes written over a simulated write bandwidth.
        None uses the measured snapshot, encode and commit time.
    rng_generators : mapping of str to torch.Generator or numpy.random.Generator, optional
        Generators the loop owns (for example for data shuffling), saved and restored
        with the global RNG states.
    store_options : mapping, optional
        Further keyword arguments for a store built from a path, such as ``fsync``.
    loss_smoothing : float or None, default None
        When given, the loss recorded with each checkpoint is an exponentially weighted
        moving average of the step losses, with this weight (in ``(0, 1]``) on the
        newest. Mini-batch losses are noisy, so an average ranks checkpoints for the
        min-loss merge more reliably. None records the last step's loss.

    Raises
    ------
    CodecError
        If a codec name is unknown.
    CheckpointError
        If ``merge_k`` or ``loss_smoothing`` is out of range.
    """

    def __init__(
        self,
        store: CheckpointStore | str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        codec: str | Codec = "int8",
        optimizer_codec: str | Codec = "lossless",
        policy: IntervalPolicy | None = None,
        merge_k: int = 1,
        device_id: str = "device-0",
        cap_bytes: int | None = None,
        checkpoint_cost_hook: Callable[[CommitResult], float] | None = None,
        rng_generators: Mapping[str, torch.Generator | Any] | None = None,
        store_options: Mapping[str, Any] | None = None,
        loss_smoothing: float | None = None,
    ) -> None:
        if isinstance(merge_k, bool) or not isinstance(merge_k, int) or merge_k < 1:
            raise CheckpointError(f"merge_k must be an int >= 1, got {merge_k!r}")
        if loss_smoothing is not None and not 0.0 < loss_smoothing <= 1.0:
            raise CheckpointError(f"loss_smoothing must be in (0, 1] or None, got {loss_smoothing!r}")

        if isinstance(store, CheckpointStore):
            _check_store_arguments(store, device_id, cap_bytes, store_options)
            self.store = store
        else:
            self.store = CheckpointStore(store, device_id=device_id, cap_bytes=cap_bytes, **dict(store_options or {}))
        self.device_id = self.store.device_id

        self.model = model
        self.optimizer = optimizer
        self.policy = policy if policy is not None else IntervalPolicy()
        self.merge_k = merge_k
        self.checkpoint_cost_hook = checkpoint_cost_hook
        self.loss_smoothing = loss_smoothing
        self.rng_generators = dict(rng_generators or {})
        self._codecs = {
            "model": get_codec(codec),
            "optimizer": get_codec(optimizer_codec),
            "exact": get_codec("lossless"),
        }

        self.step_count = 0
        self.epoch = 0
        self.data_position = 0
        self.round = 0
        self.model_version = "0"
        self.loss: float | None = None
        self.extra: dict[str, Any] = {ROUND_START_STEP: 0}
        self.steps_since_checkpoint = 0
        self.last_result: CommitResult | None = None
        self.last_timing: CheckpointTiming | None = None
        self._committed_step: int | None = None
        # Quantization grids of the last committed checkpoint, by tensor name.
        self._grids: dict[str, EncodedTensor] = {}

        self._stats = ManagerStats()
        self._last_mark = time.perf_counter()
        self._checkpoint_in_progress = False
        self._optimizer_stepped = False
        self._pending_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._register_optimizer_hooks()

    # -- training loop ------------------------------------------------------

    @property
    def stats(self) -> ManagerStats:
        """Counters since the manager was built (a snapshot)."""
        return self._stats

    def begin_round(self, round: int, model_version: str) -> None:
        """Start federated round ``round`` from the global model ``model_version``.

        Later checkpoints carry both, and :meth:`recover` selects by model version.
        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise CheckpointError(f"round must be an int >= 0, got {round!r}")
        if not isinstance(model_version, str):
            raise CheckpointError(f"model_version must be a str, got {type(model_version).__name__}")

        self.round = round
        self.model_version = model_version
        self.extra[ROUND_START_STEP] = self.step_count
        self._last_mark = time.perf_counter()
        logger.info("Device %s began round %d from model version %r", self.device_id, round, model_version)

    @property
    def round_step(self) -> int:
        """Steps taken since :meth:`begin_round`."""
        return self.step_count - int(self.extra.get(ROUND_START_STEP, 0))

    def step(
        self,
        loss: float | torch.Tensor,
        *,
        data_position: int | None = None,
        epoch: int | None = None,
        step_seconds: float | None = None,
    ) -> CommitResult | None:
        """Count one optimizer step and checkpoint when the policy's interval is reached.

        Call it after ``optimizer.step()``.

        Parameters
        ----------
        loss : float or 0-dim tensor
            Training loss of this step. With ``loss_smoothing`` the checkpoints record
            its moving average. A NaN loss is recorded, and recovery passes over
            checkpoints that carry it.
        data_position : int or None, default None
            Position in the epoch where training resumes after this step (the next
            sample or batch index). None keeps the previous value.
        epoch : int or None, default None
            Current epoch. None keeps the previous value.
        step_seconds : float or None, default None
            Duration of the step on the device clock, in seconds, for a simulated
            device. None measures the wall-clock time since the previous call, leaving
            out checkpoint time.

        Returns
        -------
        CommitResult or None
            The checkpoint's result when one was attempted, else None. A store write
            failure is logged and counted in ``stats.write_errors`` and returns None,
            so training continues.

        Raises
        ------
        SystemExit
            After checkpointing for a deferred signal whose previous handler was the
            default; see :meth:`failure_signals`.
        """
        measured = time.perf_counter() - self._last_mark
        seconds = measured if step_seconds is None else step_seconds

        self.step_count += 1
        self.loss = self._recorded_loss(float(loss))
        if data_position is not None:
            self.data_position = _check_counter("data_position", data_position)
        if epoch is not None:
            self.epoch = _check_counter("epoch", epoch)
        self._optimizer_stepped = False
        if not math.isfinite(self.loss):
            logger.warning("Device %s step %d has non-finite loss %s", self.device_id, self.step_count, self.loss)

        self.policy.observe_step(seconds)
        self._stats = replace(self._stats, train_seconds=self._stats.train_seconds + seconds)
        self.steps_since_checkpoint += 1

        result = None
        if self._pending_signal is not None:
            self._handle_pending_signal()
        elif self.policy.should_checkpoint(self.steps_since_checkpoint):
            result = self._checkpoint_logged("interval")

        self._last_mark = time.perf_counter()
        return result

    def _recorded_loss(self, step_loss: float) -> float:
        # A non-finite step loss is recorded as it is, so selection passes over its
        # checkpoint. The average then restarts from the next finite loss.
        if self.loss_smoothing is None or not math.isfinite(step_loss):
            return step_loss
        if self.loss is None or not math.isfinite(self.loss):
            return step_loss
        return (1.0 - self.loss_smoothing) * self.loss + self.loss_smoothing * step_loss

    def signal_hazard(self, hazard_rate: float | None = None, *, imminent: bool = False) -> CommitResult | None:
        """Update the hazard rate, and checkpoint now when a failure is imminent.

        Parameters
        ----------
        hazard_rate : float or None, default None
            New hazard rate in failures per second, for the interval policy.
        imminent : bool, default False
            True when a failure is about to happen (battery low, shutdown notice): a
            checkpoint is taken at once unless nothing changed since the last one.

        Returns
        -------
        CommitResult or None
            The checkpoint's result, or None when no checkpoint was taken or the store
            write failed (logged and counted).
        """
        if hazard_rate is not None:
            self.policy.set_hazard_rate(hazard_rate)
            logger.info(
                "Device %s hazard rate set to %.3g per s; interval is now %d steps",
                self.device_id, hazard_rate, self.policy.interval_steps(),
            )
        if not imminent:
            return None

        if self._state_is_committed():
            logger.info(
                "Device %s imminent failure: step %d is already checkpointed in %s",
                self.device_id, self.step_count, self.last_result.checkpoint_id,
            )
            return None
        return self._checkpoint_logged("imminent failure")

    def checkpoint(self, reason: str = "manual") -> CommitResult:
        """Capture, encode and commit a checkpoint now.

        Parameters
        ----------
        reason : str, default "manual"
            Why the checkpoint is taken; stored in the metadata and logged.

        Returns
        -------
        CommitResult
            The store's result. ``committed`` is False when the store skipped it.

        Raises
        ------
        StoreWriteError
            If the store failed to write; the previous checkpoint stays loadable.
        CheckpointError
            If the state cannot be flattened (the message names the field).
        """
        if self._checkpoint_in_progress:
            raise CheckpointError("a checkpoint is already in progress; checkpoint() is not reentrant")
        self._checkpoint_in_progress = True
        try:
            return self._checkpoint(reason)
        finally:
            self._checkpoint_in_progress = False
            self._last_mark = time.perf_counter()
            if self._pending_signal is not None and not self._optimizer_stepped:
                self._handle_pending_signal()

    def _checkpoint(self, reason: str) -> CommitResult:
        start = time.perf_counter()
        state = self.capture_state()
        snapshot_done = time.perf_counter()

        tensors, meta = flatten_state(state)
        try:
            encoded = self._encode(tensors)
        except CodecError:
            self._stats = replace(self._stats, skipped=self._stats.skipped + 1)
            self.steps_since_checkpoint = 0
            raise
        meta.update(
            device_id=self.device_id,
            checkpoint_reason=reason,
            codecs={role: codec.get_config() for role, codec in self._codecs.items()},
        )
        encode_done = time.perf_counter()

        try:
            result = self.store.commit(encoded, meta)
        except StoreWriteError:
            self._stats = replace(self._stats, write_errors=self._stats.write_errors + 1)
            self.steps_since_checkpoint = 0
            raise
        commit_done = time.perf_counter()
        if result.committed:
            self._remember_grids(encoded)

        timing = CheckpointTiming(snapshot_done - start, encode_done - snapshot_done, commit_done - encode_done)
        self._account(result, timing, reason)
        return result

    def _encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, EncodedTensor]:
        def encode_one(name: str) -> EncodedTensor:
            tensor = tensors[name]
            codec = self._codecs[tensor_role(name, tensor)]
            try:
                return codec.encode(tensor, self._grids.get(name))
            except CodecError as error:
                raise CodecError(f"encoding tensor {name!r} with {codec.get_config()} failed: {error}") from error

        # numpy releases the GIL in the quantize loops, so a large state is encoded on
        # threads, largest tensors first.
        names = list(tensors)
        workers = codec_workers()
        if workers <= 1 or sum(tensor.numel() * 4 for tensor in tensors.values()) < PARALLEL_CODEC_BYTES:
            return {name: encode_one(name) for name in names}
        order = sorted(names, key=lambda name: -tensors[name].numel())
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cb-encode") as pool:
            encoded = dict(zip(order, pool.map(encode_one, order)))
        return {name: encoded[name] for name in names}

    def _remember_grids(self, encoded: Mapping[str, EncodedTensor]) -> None:
        """Keep the quantization grid of each committed tensor as the reference of its next encoding.

        Only the side buffers are kept, not the codes, so the memory this takes is one
        scale and one minimum per channel.
        """
        self._grids = {
            name: EncodedTensor(item.codec, item.shape, item.dtype,
                                {key: value for key, value in item.buffers.items() if key in ("scale", "minimum")})
            for name, item in encoded.items()
            if "scale" in item.buffers and "minimum" in item.buffers
        }

    def _account(self, result: CommitResult, timing: CheckpointTiming, reason: str) -> None:
        measured = timing.total_seconds
        cost = measured if self.checkpoint_cost_hook is None else float(self.checkpoint_cost_hook(result))
        self.policy.observe_checkpoint(cost)

        stats = self._stats
        stats = replace(
            stats,
            checkpoint_seconds=stats.checkpoint_seconds + cost,
            measured_checkpoint_seconds=stats.measured_checkpoint_seconds + measured,
        )
        if result.committed:
            stats = replace(
                stats,
                checkpoints=stats.checkpoints + 1,
                bytes_written=stats.bytes_written + result.bytes_written,
                logical_bytes=stats.logical_bytes + result.logical_bytes,
            )
        else:
            stats = replace(stats, skipped=stats.skipped + 1)
        self._stats = stats

        self.steps_since_checkpoint = 0
        self.last_result = result
        self.last_timing = timing
        self._committed_step = self.step_count if result.committed else None

        decision = self.policy.decide()
        if result.committed:
            logger.info(
                "Device %s committed checkpoint %s at step %d (%s): %d bytes written of %d, "
                "cost %.4f s; next interval %d steps (%s)",
                self.device_id, result.checkpoint_id, self.step_count, reason, result.bytes_written,
                result.logical_bytes, cost, decision.steps, decision.rule,
            )
        else:
            # The store already logged the skip as a warning with its reason; this line
            # only adds the training step.
            logger.info(
                "Device %s skipped checkpoint at step %d (%s)",
                self.device_id, self.step_count, reason,
            )

    def _checkpoint_logged(self, reason: str) -> CommitResult | None:
        """Checkpoint, logging a store write or encode failure instead of raising it."""
        try:
            return self.checkpoint(reason)
        except StoreWriteError as error:
            logger.error(
                "Device %s failed to write checkpoint at step %d (%s): %s; training continues and "
                "the previous checkpoint stays loadable",
                self.device_id, self.step_count, reason, error,
            )
        except CodecError as error:
            logger.error(
                "Device %s skipped checkpoint at step %d (%s) because the state does not encode: %s",
                self.device_id, self.step_count, reason, error,
            )
        return None

    def _state_is_committed(self) -> bool:
        return (
            self.last_result is not None
            and self.last_result.committed
            and self._committed_step == self.step_count
        )

    def capture_state(self) -> TrainingState:
        """Return the current training state. Its tensors share memory with the model."""
        return TrainingState(
            model=self.model.state_dict(),
            optimizer=None if self.optimizer is None else self.optimizer.state_dict(),
            step=self.step_count,
            epoch=self.epoch,
            data_position=self.data_position,
            loss=self.loss,
            round=self.round,
            model_version=self.model_version,
            rng=capture_rng_state(self.rng_generators),
            extra=dict(self.extra),
        )

    # -- recovery -----------------------------------------------------------

    def recover(
        self, *, k: int | None = None, model_version: str | None = None, apply: bool = True
    ) -> RecoveryReport:
        """Load, merge and optionally restore the best stored checkpoints.

        Selects the ``k`` lowest-loss checkpoints of ``model_version`` (see
        :func:`~cb_mobile.merge.select_min_loss`). A checkpoint that fails to read or
        decode is logged, recorded in ``report.skipped`` and replaced by the next one in
        the ranking. The model weights are a loss-weighted average; the optimizer state,
        counters, RNG states and data position come from the newest selected checkpoint.

        Parameters
        ----------
        k : int or None, default None
            How many checkpoints to merge. None uses ``merge_k``.
        model_version : str or None, default None
            Model version to recover. None uses the newest checkpoint's version.
        apply : bool, default True
            Load the state into the model, optimizer, RNGs and the manager's counters.
            False only returns it.

        Returns
        -------
        RecoveryReport
            The state, what was selected and why, and load, decode and merge seconds.

        Raises
        ------
        NoValidCheckpointError
            If the store contains no checkpoint of the version that reads and decodes.
        CheckpointError
            If ``apply`` is True and the state does not fit the model or optimizer.
        """
        k = self.merge_k if k is None else k

        start = time.perf_counter()
        infos = self.store.checkpoints()
        timer = _RecoveryTimer(load_seconds=time.perf_counter() - start)
        selection = select_min_loss(infos, k, model_version)
        if not selection.selected:
            raise NoValidCheckpointError(
                f"device {self.device_id} has no usable checkpoint under {self.store.root}: {selection.reason}"
            )

        damaged: list[tuple[str, str]] = []
        loaded = self._load_ranked(selection.ranked, k, timer, damaged)
        used_fallback = not loaded
        if used_fallback:
            loaded = self._load_ranked(selection.unscored, 1, timer, damaged)
        if not loaded:
            raise NoValidCheckpointError(
                f"device {self.device_id} has no checkpoint of model version {selection.model_version!r} "
                f"that reads cleanly under {self.store.root}; damaged: {damaged}"
            )

        start = time.perf_counter()
        state, losses, weights = _merge_loaded(loaded)
        timer.merge_seconds = time.perf_counter() - start

        reason = _recovery_reason(selection, loaded, k, damaged, used_fallback)
        report = RecoveryReport(
            state=state,
            selected=tuple(item.info.checkpoint_id for item in loaded),
            losses=losses,
            weights=weights,
            reason=reason,
            load_seconds=timer.load_seconds,
            decode_seconds=timer.decode_seconds,
            merge_seconds=timer.merge_seconds,
            skipped=tuple(selection.rejected) + tuple(damaged),
            model_version=selection.model_version,
            applied=apply,
        )

        if apply:
            self.restore(state)
        self._stats = replace(self._stats, recoveries=self._stats.recoveries + 1)
        logger.info(
            "Device %s recovered step %d from %s (weights %s); %s",
            self.device_id, state.step, list(report.selected), [round(w, 4) for w in weights], reason,
        )
        return report

    def _load_ranked(
        self,
        candidates: Sequence[CheckpointInfo],
        k: int,
        timer: _RecoveryTimer,
        damaged: list[tuple[str, str]],
    ) -> list[_Loaded]:
        loaded: list[_Loaded] = []
        for info in candidates:
            if len(loaded) == k:
                break
            state = self._load_one(info, timer, damaged)
            if state is not None:
                loaded.append(_Loaded(info, state))
        return loaded

    def _load_one(
        self, info: CheckpointInfo, timer: _RecoveryTimer, damaged: list[tuple[str, str]]
    ) -> TrainingState | None:
        start = time.perf_counter()
        try:
            encoded, meta = self.store.read(info.checkpoint_id)
        except (CheckpointError, OSError) as error:
            timer.load_seconds += time.perf_counter() - start
            path = getattr(error, "path", None) or getattr(error, "filename", None)
            logger.warning(
                "Device %s skipped damaged checkpoint %s (file %s): %s",
                self.device_id, info.checkpoint_id, path, error,
            )
            damaged.append((info.checkpoint_id, f"damaged: {error}"))
            return None
        read_done = time.perf_counter()
        timer.load_seconds += read_done - start

        try:
            tensors = decode_tensors(encoded)
            state = unflatten_state(tensors, meta)
        except (CodecError, CorruptCheckpointError) as error:
            logger.warning(
                "Device %s skipped checkpoint %s that does not decode: %s",
                self.device_id, info.checkpoint_id, error,
            )
            damaged.append((info.checkpoint_id, f"does not decode: {error}"))
            return None
        finally:
            timer.decode_seconds += time.perf_counter() - read_done
        return state

    def restore(self, state: TrainingState) -> None:
        """Load ``state`` into the model, optimizer, RNGs and the manager's counters.

        Raises
        ------
        CheckpointError
            If the state_dict or optimizer state does not fit, naming the reason.
        """
        try:
            self.model.load_state_dict(state.model)
        except RuntimeError as error:
            raise CheckpointError(
                f"checkpointed model state_dict does not fit the model: {error}; build the model "
                "with the architecture the checkpoint was saved from"
            ) from error

        if self.optimizer is not None and state.optimizer is not None:
            try:
                self.optimizer.load_state_dict(state.optimizer)
            except (ValueError, KeyError, RuntimeError) as error:
                raise CheckpointError(
                    f"checkpointed optimizer state does not fit the optimizer: {error}; build the "
                    "optimizer type and param_groups the checkpoint was saved with"
                ) from error
        elif self.optimizer is not None:
            logger.warning("Device %s checkpoint has no optimizer state; the optimizer starts fresh", self.device_id)

        if state.rng is not None:
            restore_rng_state(state.rng, self.rng_generators)

        self.step_count = state.step
        self.epoch = state.epoch
        self.data_position = state.data_position
        self.loss = state.loss
        self.round = state.round
        self.model_version = state.model_version
        self.extra = dict(state.extra)
        self.extra.setdefault(ROUND_START_STEP, 0)
        self.steps_since_checkpoint = 0
        self._committed_step = None
        self._optimizer_stepped = False
        self._last_mark = time.perf_counter()

    # -- signals ------------------------------------------------------------

    @contextlib.contextmanager
    def failure_signals(self, signals: Sequence[int] = (signal.SIGTERM,)) -> Iterator[CheckpointManager]:
        """Checkpoint when one of ``signals`` arrives, inside a ``with`` block.

        The handler checkpoints at once, unless the optimizer has stepped since the last
        :meth:`step` call. Then the weights are ahead of the counters, so the checkpoint
        is deferred to the next :meth:`step` call. After checkpointing, the previous
        handler runs. When the previous handler was the default, ``SystemExit(128 +
        signum)`` is raised so the process ends as the signal intended, running
        ``finally`` blocks on the way. An ignored signal only checkpoints.

        A signal still held when the block exits is handled then. If the optimizer has
        stepped since the last :meth:`step` call, no checkpoint is taken (an error is
        logged) and the previous handler runs.

        Signal handlers can only be installed in the main thread. Elsewhere the block
        runs without them and a warning is logged. The previous handlers are restored
        when the block exits.

        Parameters
        ----------
        signals : sequence of int, default (signal.SIGTERM,)
            Signals to handle.
        """
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "Device %s cannot install signal handlers outside the main thread; "
                "signals will not trigger checkpoints",
                self.device_id,
            )
            yield self
            return

        installed = {}
        try:
            for signum in signals:
                installed[signum] = signal.signal(signum, self._on_signal)
            self._previous_handlers.update(installed)
            yield self
        finally:
            for signum, previous in installed.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            try:
                # A signal deferred to a step() call that never came is handled on exit.
                self._handle_pending_signal()
            finally:
                for signum in installed:
                    self._previous_handlers.pop(signum, None)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._optimizer_stepped or self._checkpoint_in_progress:
            logger.warning(
                "Device %s received %s mid-step; checkpointing at the next step boundary",
                self.device_id, name,
            )
            self._pending_signal = signum
            return

        logger.warning("Device %s received %s at step %d; checkpointing now", self.device_id, name, self.step_count)
        self._pending_signal = signum
        self._handle_pending_signal()

    def _handle_pending_signal(self) -> None:
        signum = self._pending_signal
        self._pending_signal = None
        if signum is None:
            return

        name = signal.Signals(signum).name
        if self._optimizer_stepped:
            logger.error(
                "Device %s handles %s mid-step: the optimizer stepped after step %d was counted, "
                "so no checkpoint is taken and the last committed one stays the recovery point",
                self.device_id, name, self.step_count,
            )
        elif not self._state_is_committed():
            self._checkpoint_logged(f"signal {name}")

        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, None)
        elif previous is None or previous == signal.SIG_DFL:
            logger.warning("Device %s exiting on %s after checkpointing", self.device_id, name)
            raise SystemExit(128 + signum)

    def _register_optimizer_hooks(self) -> None:
        if self.optimizer is None:
            return

        def mark_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._optimizer_stepped = True

        self.optimizer.register_step_pre_hook(mark_stepped)


@dataclass
class _RecoveryTimer:
    load_seconds: float = 0.0
    decode_seconds: float = 0.0
    merge_seconds: float = 0.0


def _merge_loaded(loaded: Sequence[_Loaded]) -> tuple[TrainingState, tuple[float, ...], tuple[float, ...]]:
    losses = []
    for item in loaded:
        loss, _ = checkpoint_loss(item.info)
        losses.append(math.nan if loss is None else loss)

    if len(loaded) == 1:
        return loaded[0].state, tuple(losses), (1.0,)

    weights = loss_weights(losses)
    newest = max(range(len(loaded)), key=lambda index: loaded[index].info.seq)
    state = merge_training_states([item.state for item in loaded], weights, newest=newest)
    return state, tuple(losses), weights


def _recovery_reason(
    selection: Selection,
    loaded: Sequence[_Loaded],
    k: int,
    damaged: Sequence[tuple[str, str]],
    used_fallback: bool,
) -> str:
    infos = [item.info for item in loaded]
    if used_fallback and selection.ranked:
        names = ", ".join(info.checkpoint_id for info in infos)
        reason = (
            f"every checkpoint of model version {selection.model_version!r} with a finite loss "
            f"is damaged, so the newest one without a loss was used: {names}"
        )
    else:
        reason = describe_selection(selection, infos, k)

    if damaged:
        reason += "; damaged and passed over: " + "; ".join(f"{cid} ({why})" for cid, why in damaged)
    return reason


def _check_store_arguments(
    store: CheckpointStore, device_id: str, cap_bytes: int | None, store_options: Mapping[str, Any] | None
) -> None:
    if device_id not in ("device-0", store.device_id):
        raise CheckpointError(
            f"device_id {device_id!r} differs from the given store's device_id {store.device_id!r}; "
            "pass the device id to CheckpointStore, or pass a path instead of a store"
        )
    if cap_bytes is not None and cap_bytes != store.cap_bytes:
        raise CheckpointError(
            f"cap_bytes {cap_bytes} differs from the given store's cap_bytes {store.cap_bytes}; "
            "pass the cap to CheckpointStore, or pass a path instead of a store"
        )
    if store_options:
        raise CheckpointError(
            f"store_options {sorted(store_options)} only apply to a store opened from a path; "
            "pass them to CheckpointStore instead"
        )


def _check_counter(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{name} must be an int >= 0, got {value!r}")
    return value
