"""Checkpoint backends of a simulated node: CheckBullet, full torch.save, or none (FedAvg).

Contract
--------
A node attaches a backend to a freshly built model and optimizer with :meth:`attach`
and reports every finished training step to :meth:`after_step`. When the device fails,
:meth:`detach` drops every in-memory object of the backend. Only what it wrote to disk survives.
:meth:`restore` loads the newest usable state of one model version into the attached
model and optimizer and returns a :class:`RestoredState`, or None when the disk has
nothing of that version. Costs come back as :class:`CheckpointCost`. Measured seconds
are real wall-clock time on this machine. Simulated seconds are the measured seconds
plus the bytes moved over the device profile's storage bandwidth, and they are what
the device clock advances by.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cb_mobile.dropout import DeviceProfile
from cb_mobile.errors import CheckpointError, NoValidCheckpointError
from cb_mobile.interval import IntervalPolicy
from cb_mobile.manager import CheckpointManager
from cb_mobile.store import CheckpointStore, CommitResult
from server_app.config import RunSettings

logger = logging.getLogger(__name__)

FULL_CHECKPOINT_SUFFIX = ".pt"
DEFAULT_PRIOR_MTBF_S = RunSettings.prior_mtbf_s


@dataclass(frozen=True)
class CheckpointCost:
    """One checkpoint attempt and what it cost.

    Attributes
    ----------
    committed : bool
        Whether the checkpoint reached the disk.
    bytes_written : int
        Bytes written to the device's storage.
    measured_s : float
        Wall-clock seconds of snapshot, encode and write.
    simulated_s : float
        Seconds on the device clock: ``measured_s`` plus ``bytes_written`` over the
        profile's write bandwidth.
    """

    committed: bool
    bytes_written: int
    measured_s: float
    simulated_s: float


@dataclass(frozen=True)
class RestoredState:
    """A training state loaded back into the model and optimizer after a failure.

    Attributes
    ----------
    step : int
        Local step of the restored state within its round.
    loss : float or None
        Training loss stored with it.
    source : str
        What was loaded, for the logs.
    measured_s : float
        Wall-clock seconds of load, decode and merge.
    bytes_read : int
        Bytes read from the device's storage.
    simulated_s : float
        Seconds on the device clock: ``measured_s`` plus ``bytes_read`` over the
        profile's read bandwidth.
    """

    step: int
    loss: float | None
    source: str
    measured_s: float
    bytes_read: int
    simulated_s: float


def build_interval_policy(
    profile: DeviceProfile,
    hazard_rate: float | None,
    checkpoint_cost_s: float | None,
    prior_mtbf_s: float,
    observed_uptimes_s: Sequence[float],
    *,
    device_id: str,
) -> IntervalPolicy:
    """Build the interval policy of one round and feed it every failure the node has observed.

    Parameters
    ----------
    profile : DeviceProfile
        Its ``step_seconds`` is the initial step time estimate.
    hazard_rate : float or None
        Failures per second from the device's failure model; None estimates the rate
        from ``prior_mtbf_s`` and ``observed_uptimes_s``.
    checkpoint_cost_s : float or None
        Smoothed checkpoint cost of earlier rounds, in simulated seconds.
    prior_mtbf_s : float
        Prior mean time between failures in seconds.
    observed_uptimes_s : Sequence[float]
        Seconds the node was up before each observed failure.
    device_id : str
        Device id for the log.
    """
    # NOTE: observed uptimes are wall-clock seconds of real process restarts, while
    # step and checkpoint times are on the device clock. Both are the same on a real
    # device; on a simulated profile the estimated rate mixes the two clocks.
    policy = IntervalPolicy(
        hazard_rate,
        checkpoint_cost_s=checkpoint_cost_s,
        step_seconds=profile.step_seconds,
        prior_mtbf_s=prior_mtbf_s,
    )
    for uptime_s in observed_uptimes_s:
        policy.observe_failure(uptime_s)
    if hazard_rate is None:
        logger.debug(
            "Device %s interval policy: %d observed failure(s), estimated hazard rate %.3g per s",
            device_id, len(observed_uptimes_s), policy.hazard_rate,
        )
    return policy


def full_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Return the size of ``torch.save`` of the fp32 model and optimizer state_dicts.

    The state is serialized into memory, so nothing touches the disk.
    """
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return buffer.tell()


class CheckpointBackend(ABC):
    """Interface through which a node's training loop checkpoints and restores.

    Parameters
    ----------
    profile : DeviceProfile
        Storage bandwidths that turn bytes into simulated seconds.
    """

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        server_round: int,
        model_version: str,
        hazard_rate: float | None,
        checkpoint_cost_s: float | None,
        prior_mtbf_s: float = DEFAULT_PRIOR_MTBF_S,
        observed_uptimes_s: Sequence[float] = (),
    ) -> None:
        """Start checkpointing a new model and optimizer for one round's model version.

        ``hazard_rate`` None lets the interval policy estimate the hazard rate from
        ``prior_mtbf_s`` and ``observed_uptimes_s``, the uptimes before the node's
        observed failures.
        """

    def detach(self) -> None:
        """Drop every in-memory object; the files on disk stay."""

    def after_step(
        self, step: int, loss: float, *, step_seconds: float, hazard_rate: float | None, battery_low: bool
    ) -> CheckpointCost | None:
        """Account one finished step; return the cost of a checkpoint taken after it, if any."""
        return None

    def checkpoint_now(self, step: int, loss: float, reason: str) -> CheckpointCost | None:
        """Checkpoint at once, for example before a missed upload; None when nothing was taken."""
        return None

    @abstractmethod
    def restore(self, model_version: str) -> RestoredState | None:
        """Load the best stored state of ``model_version`` into the attached objects."""

    def store_bytes(self) -> int:
        """Return the bytes the node's checkpoints occupy on disk now."""
        return 0

    @property
    def checkpoint_cost_s(self) -> float | None:
        """Smoothed simulated checkpoint cost, to warm the next round's interval policy."""
        return None


class NoCheckpoints(CheckpointBackend):
    """Vanilla FedAvg: nothing is stored, so a failure loses the round's local work."""

    def restore(self, model_version: str) -> RestoredState | None:
        """Return None: there is never anything on disk to restore."""
        return None


class CheckBulletCheckpoints(CheckpointBackend):
    """Quantized, deduplicated checkpoints at a failure-aware interval, min-loss merge on recovery.

    Parameters
    ----------
    profile : DeviceProfile
        Storage bandwidths of the device.
    store_dir : Path
        The node's own store folder. Each node gets its own root, so the chunk garbage
        collection of one node never runs while another node's commit is half written.
    device_id : str
        Device id inside the store.
    codec, optimizer_codec : str
        Codecs for the model weights and the optimizer buffers.
    merge_k : int
        Checkpoints merged on recovery.
    cap_bytes : int or None
        Storage cap of the node's store; None for no cap.
    """

    def __init__(
        self,
        profile: DeviceProfile,
        store_dir: Path,
        *,
        device_id: str,
        codec: str,
        optimizer_codec: str,
        merge_k: int,
        cap_bytes: int | None,
    ) -> None:
        super().__init__(profile)
        self.store_dir = Path(store_dir)
        self.device_id = device_id
        self.codec = codec
        self.optimizer_codec = optimizer_codec
        self.merge_k = merge_k
        self.cap_bytes = cap_bytes
        self.manager: CheckpointManager | None = None
        self._low_battery_signalled = False
        self._last_cost_s: float | None = None
        self._call_started = time.perf_counter()
        self._last_measured_s = 0.0

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        server_round: int,
        model_version: str,
        hazard_rate: float | None,
        checkpoint_cost_s: float | None,
        prior_mtbf_s: float = DEFAULT_PRIOR_MTBF_S,
        observed_uptimes_s: Sequence[float] = (),
    ) -> None:
        """Open the node's store and build a CheckpointManager around ``model`` and ``optimizer``."""
        policy = build_interval_policy(
            self.profile, hazard_rate, checkpoint_cost_s, prior_mtbf_s, observed_uptimes_s, device_id=self.device_id
        )
        store = CheckpointStore(self.store_dir, device_id=self.device_id, cap_bytes=self.cap_bytes)
        self.manager = CheckpointManager(
            store,
            model,
            optimizer,
            codec=self.codec,
            optimizer_codec=self.optimizer_codec,
            policy=policy,
            merge_k=self.merge_k,
            checkpoint_cost_hook=self._simulated_cost,
        )
        self.manager.begin_round(server_round, model_version)
        self._low_battery_signalled = False
        self._last_cost_s = checkpoint_cost_s

    def detach(self) -> None:
        """Drop the manager, its store object and its interval policy."""
        self.manager = None

    def _simulated_cost(self, result: CommitResult) -> float:
        # The manager calls this hook right after the commit, so the time since the
        # manager call began covers snapshot, encode and commit.
        measured = time.perf_counter() - self._call_started
        self._last_measured_s = measured
        return measured + self.profile.write_seconds(result.bytes_written)

    def _require_manager(self) -> CheckpointManager:
        if self.manager is None:
            raise CheckpointError(f"device {self.device_id}: no model is attached; call attach() first")
        return self.manager

    def after_step(
        self, step: int, loss: float, *, step_seconds: float, hazard_rate: float | None, battery_low: bool
    ) -> CheckpointCost | None:
        """Feed the step to the manager; checkpoint on its interval or at once on a low battery."""
        manager = self._require_manager()
        if hazard_rate is not None:
            manager.policy.set_hazard_rate(hazard_rate)
        self._call_started = time.perf_counter()
        result = manager.step(loss, data_position=step, step_seconds=step_seconds)

        if not battery_low:
            self._low_battery_signalled = False
        elif not self._low_battery_signalled:
            self._low_battery_signalled = True
            logger.info("Device %s battery is low at step %d; checkpointing now", self.device_id, step)
            self._call_started = time.perf_counter()
            imminent = manager.signal_hazard(imminent=True)
            result = imminent if imminent is not None else result

        if result is None:
            return None
        return self._cost_of(result)

    def checkpoint_now(self, step: int, loss: float, reason: str) -> CheckpointCost | None:
        """Checkpoint the attached state now unless this step is already stored."""
        manager = self._require_manager()
        self._call_started = time.perf_counter()
        result = manager.signal_hazard(imminent=True)
        if result is None:
            return None
        return self._cost_of(result)

    def _cost_of(self, result: CommitResult) -> CheckpointCost:
        manager = self._require_manager()
        measured = self._last_measured_s
        bytes_written = result.bytes_written if result.committed else 0
        self._last_cost_s = manager.policy.checkpoint_cost_s
        return CheckpointCost(result.committed, bytes_written, measured, measured + self.profile.write_seconds(bytes_written))

    def restore(self, model_version: str) -> RestoredState | None:
        """Merge the lowest-loss checkpoints of ``model_version`` into the attached model."""
        manager = self._require_manager()
        try:
            report = manager.recover(model_version=model_version)
        except NoValidCheckpointError as error:
            logger.info("Device %s has no checkpoint of model version %r to restore: %s", self.device_id, model_version, error)
            return None

        sizes = {info.checkpoint_id: info.stored_bytes for info in manager.store.checkpoints()}
        bytes_read = sum(sizes.get(checkpoint_id, 0) for checkpoint_id in report.selected)
        measured = report.load_seconds + report.decode_seconds + report.merge_seconds
        source = f"{len(report.selected)} merged checkpoint(s) {list(report.selected)}"
        return RestoredState(
            step=report.state.step,
            loss=report.state.loss,
            source=source,
            measured_s=measured,
            bytes_read=bytes_read,
            simulated_s=measured + self.profile.read_seconds(bytes_read),
        )

    def store_bytes(self) -> int:
        """Return the bytes of the node's manifests and the chunks they reference."""
        if self.manager is not None:
            return self.manager.store.size_bytes()
        return CheckpointStore(self.store_dir, device_id=self.device_id, cap_bytes=self.cap_bytes).size_bytes()

    @property
    def checkpoint_cost_s(self) -> float | None:
        """Smoothed simulated checkpoint cost of the interval policy."""
        return self._last_cost_s


class FullCheckpoints(CheckpointBackend):
    """Baseline: ``torch.save`` of the fp32 model and optimizer at a failure-aware interval.

    The interval comes from an :class:`IntervalPolicy` with the same parameters, step
    time and hazard rate as CheckBullet's, fed with this backend's own checkpoint cost.
    A full checkpoint costs more, so the policy may space checkpoints further apart.
    Files of older model versions are deleted when a new round starts training, so the
    folder keeps one round's checkpoints.

    Parameters
    ----------
    profile : DeviceProfile
        Storage bandwidths of the device.
    folder : Path
        The node's checkpoint folder.
    device_id : str
        Device id for the logs.
    """

    def __init__(self, profile: DeviceProfile, folder: Path, *, device_id: str) -> None:
        super().__init__(profile)
        self.folder = Path(folder)
        self.device_id = device_id
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.policy: IntervalPolicy | None = None
        self.model_version = ""
        self.server_round = 0
        self._steps_since_checkpoint = 0
        self._committed_step: int | None = None
        self._low_battery_signalled = False
        self._last_cost_s: float | None = None

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        server_round: int,
        model_version: str,
        hazard_rate: float | None,
        checkpoint_cost_s: float | None,
        prior_mtbf_s: float = DEFAULT_PRIOR_MTBF_S,
        observed_uptimes_s: Sequence[float] = (),
    ) -> None:
        """Keep references to the model and optimizer and build a fresh interval policy."""
        self.model = model
        self.optimizer = optimizer
        self.policy = build_interval_policy(
            self.profile, hazard_rate, checkpoint_cost_s, prior_mtbf_s, observed_uptimes_s, device_id=self.device_id
        )
        self.server_round = server_round
        self.model_version = model_version
        self._steps_since_checkpoint = 0
        self._committed_step = None
        self._low_battery_signalled = False
        self._last_cost_s = checkpoint_cost_s
        self.folder.mkdir(parents=True, exist_ok=True)

    def detach(self) -> None:
        """Drop the model, optimizer and policy references."""
        self.model = None
        self.optimizer = None
        self.policy = None

    def delete_other_versions(self, model_version: str) -> None:
        """Delete the checkpoint files of every model version except ``model_version``."""
        prefix = _file_prefix(model_version)
        for path in self.folder.glob(f"*{FULL_CHECKPOINT_SUFFIX}"):
            if not path.name.startswith(prefix):
                path.unlink(missing_ok=True)

    def after_step(
        self, step: int, loss: float, *, step_seconds: float, hazard_rate: float | None, battery_low: bool
    ) -> CheckpointCost | None:
        """Feed the policy; save on its interval or at once on a low battery."""
        policy = self._require_policy()
        policy.observe_step(step_seconds)
        if hazard_rate is not None:
            policy.set_hazard_rate(hazard_rate)
        self._steps_since_checkpoint += 1

        if not battery_low:
            self._low_battery_signalled = False
        elif not self._low_battery_signalled:
            self._low_battery_signalled = True
            logger.info("Device %s battery is low at step %d; saving a full checkpoint now", self.device_id, step)
            return self._save(step, loss, "imminent failure")

        if policy.should_checkpoint(self._steps_since_checkpoint):
            return self._save(step, loss, "interval")
        return None

    def checkpoint_now(self, step: int, loss: float, reason: str) -> CheckpointCost | None:
        """Save now unless this step is already saved."""
        if self._committed_step == step:
            return None
        return self._save(step, loss, reason)

    def _require_policy(self) -> IntervalPolicy:
        if self.policy is None:
            raise CheckpointError(f"device {self.device_id}: no model is attached; call attach() first")
        return self.policy

    def _save(self, step: int, loss: float, reason: str) -> CheckpointCost:
        if self.model is None or self.optimizer is None:
            raise CheckpointError(f"device {self.device_id}: no model is attached; call attach() first")

        start = time.perf_counter()
        path = self.folder / f"{_file_prefix(self.model_version)}step{step:06d}{FULL_CHECKPOINT_SUFFIX}"
        temp = path.with_name(path.name + ".tmp")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": step,
            "loss": float(loss),
            "round": self.server_round,
            "model_version": self.model_version,
        }
        with open(temp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_dir(self.folder)
        measured = time.perf_counter() - start

        size = path.stat().st_size
        simulated = measured + self.profile.write_seconds(size)
        policy = self._require_policy()
        policy.observe_checkpoint(simulated)
        self._last_cost_s = policy.checkpoint_cost_s
        self._steps_since_checkpoint = 0
        self._committed_step = step
        logger.debug("Device %s saved %s at step %d (%s): %d bytes", self.device_id, path.name, step, reason, size)
        return CheckpointCost(True, size, measured, simulated)

    def restore(self, model_version: str) -> RestoredState | None:
        """Load the newest readable file of ``model_version`` with ``torch.load(weights_only=True)``."""
        if self.model is None or self.optimizer is None:
            raise CheckpointError(f"device {self.device_id}: no model is attached; call attach() first")

        prefix = _file_prefix(model_version)
        candidates = sorted(self.folder.glob(f"{prefix}step*{FULL_CHECKPOINT_SUFFIX}"), reverse=True)
        for path in candidates:
            start = time.perf_counter()
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            # torch.load with weights_only=True never unpickles arbitrary objects, but it
            # reports a damaged file as pickle.UnpicklingError.
            except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as error:
                logger.warning("Device %s skipped unreadable full checkpoint %s: %s", self.device_id, path, error)
                continue
            measured = time.perf_counter() - start

            size = path.stat().st_size
            loss = state.get("loss")
            return RestoredState(
                step=int(state["step"]),
                loss=float(loss) if loss is not None and math.isfinite(loss) else None,
                source=f"full checkpoint {path.name}",
                measured_s=measured,
                bytes_read=size,
                simulated_s=measured + self.profile.read_seconds(size),
            )

        if candidates:
            logger.error(
                "Device %s has %d full checkpoint(s) of model version %r in %s and none is readable; "
                "it restarts from the global model",
                self.device_id, len(candidates), model_version, self.folder,
            )
        return None

    def store_bytes(self) -> int:
        """Return the bytes of the checkpoint files in the node's folder."""
        if not self.folder.is_dir():
            return 0
        return sum(path.stat().st_size for path in self.folder.glob(f"*{FULL_CHECKPOINT_SUFFIX}"))

    @property
    def checkpoint_cost_s(self) -> float | None:
        """Smoothed simulated checkpoint cost of the interval policy."""
        return self._last_cost_s


def _file_prefix(model_version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_version)
    return f"{safe}-"


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
