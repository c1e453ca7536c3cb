"""One node's local training round on a simulated device that fails, without Flower.

Contract
--------
:func:`run_round` plays one federated round on one node and returns a
:class:`RoundResult`: either a state_dict with the reply metrics of the message
contract, or an error reason, which the ClientApp turns into a Flower ``Error`` reply.
Everything that outlives the round (the device's clock and failure processes, a
pending recovery, the checkpoint cost estimate) sits in :class:`NodeMemory`, which the
ClientApp keeps in ``context.state`` as JSON.

Simulated time
--------------
Round ``r`` spans ``[(r - 1) * D, r * D)`` on every device clock, where ``D`` is the
round deadline in simulated seconds. A device idles up to the round's start. It may
fail while idle, which loses nothing because it keeps no training state then. Each
training step advances the clock by the profile's ``step_seconds``. Each checkpoint and
each recovery advances it by its measured seconds plus the bytes over the profile's
storage bandwidth. Failure times depend only on the seed, the node id and the clock, so the
three modes see the same failures until checkpoint and recovery time shifts a
checkpointing device's clock against the FedAvg one.

Failures
--------
A failure at local step ``s`` drops the model, the optimizer and the checkpoint
backend's in-memory objects. Only files on disk survive. When the device restarts
before the round's deadline, it rebuilds everything from scratch and resumes: FedAvg
from the round's global model (recomputing all ``s`` steps), CheckBullet from a min-loss
merge of its stored checkpoints, full-checkpoint from its newest ``torch.save`` file.
When the restart comes after the deadline, the node replies with an error. A
checkpointing node then remembers a pending recovery: at its next contact it restores
the stored state and replies with it as a partial state (``partial=1``, staleness =
rounds since the state's model version) instead of training, because the server weights
that state by its progress and staleness and the node's next round trains from the
new global model anyway.

The received global model counts as kept on flash with the download, so a restarted
device can always fall back to it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cb_mobile.dropout import DeviceProfile, FailureEvent, SimulatedDevice, make_device
from client_app.checkpointing import (
    CheckBulletCheckpoints,
    CheckpointBackend,
    CheckpointCost,
    FullCheckpoints,
    NoCheckpoints,
    RestoredState,
    full_state_bytes,
)
from server_app.config import MODES, OPTIMIZERS, RunSettings

logger = logging.getLogger(__name__)

NODE_MEMORY_FORMAT = "cb_mobile.node_memory"
NODE_MEMORY_VERSION = 1
RELIABLE_DEVICE_FORMAT = "cb_mobile.reliable_device"
# Idle span between two connectivity checks while a trained node waits to upload.
UPLOAD_RETRY_S = 10.0


@dataclass(frozen=True)
class RoundSettings:
    """Run config values a node needs for one round.

    Attributes
    ----------
    mode : str
        ``"checkbullet"``, ``"fedavg"`` or ``"full-checkpoint"``.
    seed : int
        Run seed; with the node id it fixes the device and the batch order.
    local_steps : int
        Optimizer steps per round.
    batch_size : int
        Windows per step.
    learning_rate : float
        Optimizer learning rate.
    optimizer : str
        ``"adam"`` or ``"sgd"``.
    handset_share : float
        Probability that a node is a handset rather than a base station.
    failure_scale : float
        Multiplier of the devices' random failure rates; 0 disables failures.
    codec, optimizer_codec : str
        CheckBullet codecs for model weights and optimizer buffers.
    merge_k : int
        Checkpoints CheckBullet merges on recovery.
    storage_cap_bytes : int
        CheckBullet storage cap per node in bytes; 0 means no cap.
    round_deadline_s : float
        Simulated seconds a round lasts on the device clock.
    prior_mtbf_s : float
        Prior mean time between failures of the interval policy, in seconds. It sets
        the interval on a device without a failure model (``failure_scale == 0``),
        blended with the restarts the node has observed.
    """

    # The defaults are the run config defaults of the ServerApp, kept in one place.
    mode: str = RunSettings.mode
    seed: int = RunSettings.seed
    local_steps: int = RunSettings.local_steps
    batch_size: int = RunSettings.batch_size
    learning_rate: float = RunSettings.learning_rate
    optimizer: str = RunSettings.optimizer
    handset_share: float = RunSettings.handset_share
    failure_scale: float = RunSettings.failure_scale
    codec: str = RunSettings.codec
    optimizer_codec: str = RunSettings.optimizer_codec
    merge_k: int = RunSettings.merge_k
    storage_cap_bytes: int = RunSettings.storage_cap_bytes
    round_deadline_s: float = RunSettings.round_deadline_s
    prior_mtbf_s: float = RunSettings.prior_mtbf_s

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is invalid; choose one of {MODES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is invalid; choose one of {OPTIMIZERS}")
        if self.local_steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"local_steps={self.local_steps} and batch_size={self.batch_size} must both be at least 1"
            )
        if not (math.isfinite(self.round_deadline_s) and self.round_deadline_s > 0.0):
            raise ValueError(f"round_deadline_s={self.round_deadline_s} is invalid; use seconds > 0")
        if not (math.isfinite(self.failure_scale) and self.failure_scale >= 0.0):
            raise ValueError(f"failure_scale={self.failure_scale} is invalid; use a number >= 0")
        if not (math.isfinite(self.prior_mtbf_s) and self.prior_mtbf_s > 0.0):
            raise ValueError(f"prior_mtbf_s={self.prior_mtbf_s} is invalid; use seconds > 0")


@dataclass(frozen=True)
class RoundRequest:
    """The server's train request for one round.

    Attributes
    ----------
    server_round : int
        The current round, from 1.
    model_version : str
        Version of the global model, for example ``"r3"``.
    global_state : Mapping[str, torch.Tensor]
        The global model's state_dict.
    """

    server_round: int
    model_version: str
    global_state: Mapping[str, torch.Tensor]


@dataclass
class PendingRecovery:
    """A checkpointed round the node could not finish before the deadline."""

    server_round: int
    model_version: str
    failed_step: int
    steps_planned: int
    cause: str


@dataclass
class RoundInProgress:
    """A round the node started training; cleared when the round ends.

    A node memory that still has it after a process restart means the process died
    during that round.
    """

    server_round: int
    model_version: str
    steps_planned: int
    started_unix_s: float


@dataclass
class NodeMemory:
    """Everything a node keeps between rounds, stored as JSON in ``context.state``.

    Attributes
    ----------
    device : dict or None
        The device's ``to_json()``; None before the first contact.
    pending : PendingRecovery or None
        A round whose checkpointed state still has to be reported.
    checkpoint_cost_s : float or None
        Smoothed simulated checkpoint cost, which warms the next round's interval policy.
    baseline_checkpoint_bytes : int or None
        Size of ``torch.save`` of the node's fp32 model and optimizer state.
    rounds_trained : int
        Rounds in which the node replied with a trained state.
    unreported_steps_lost : int
        Steps lost in rounds that ended with an error reply, reported in the next reply.
    in_progress : RoundInProgress or None
        The round being trained, set at round start and cleared at round end.
    up_since_unix_s : float or None
        Wall-clock time (Unix seconds) of the node's first contact or of its last
        observed restart.
    observed_uptimes_s : list of float
        Wall-clock seconds the node was up before each observed process restart. The
        interval policy counts each as one failure.
    """

    device: dict[str, Any] | None = None
    pending: PendingRecovery | None = None
    checkpoint_cost_s: float | None = None
    baseline_checkpoint_bytes: int | None = None
    rounds_trained: int = 0
    unreported_steps_lost: int = 0
    in_progress: RoundInProgress | None = None
    up_since_unix_s: float | None = None
    observed_uptimes_s: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the memory as a JSON string."""
        data = asdict(self)
        data["format"] = NODE_MEMORY_FORMAT
        data["version"] = NODE_MEMORY_VERSION
        return json.dumps(data, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> NodeMemory:
        """Rebuild the memory from :meth:`to_json` output.

        Raises
        ------
        ValueError
            If the text is not node memory of this version.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"node memory is not valid JSON ({error}); clear the node's context.state") from None
        if not isinstance(data, dict):
            raise ValueError(f"node memory is a JSON {type(data).__name__}, not an object")
        if data.get("format") != NODE_MEMORY_FORMAT or data.get("version") != NODE_MEMORY_VERSION:
            raise ValueError(
                f"node memory has format {data.get('format')!r} version {data.get('version')!r}; "
                f"expected {NODE_MEMORY_FORMAT!r} version {NODE_MEMORY_VERSION}"
            )
        pending = data.get("pending")
        in_progress = data.get("in_progress")
        up_since = data.get("up_since_unix_s")
        try:
            return cls(
                device=data.get("device"),
                pending=None if pending is None else PendingRecovery(**pending),
                checkpoint_cost_s=data.get("checkpoint_cost_s"),
                baseline_checkpoint_bytes=data.get("baseline_checkpoint_bytes"),
                rounds_trained=int(data.get("rounds_trained", 0)),
                unreported_steps_lost=int(data.get("unreported_steps_lost", 0)),
                in_progress=None if in_progress is None else RoundInProgress(**in_progress),
                up_since_unix_s=None if up_since is None else float(up_since),
                observed_uptimes_s=[float(value) for value in data.get("observed_uptimes_s", [])],
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"node memory has an invalid field: {error}") from None


@dataclass
class FailureRecord:
    """One failure during training and what became of it.

    ``outcome`` is one of:

    - ``"recovered"``: back before the deadline, and training resumed;
    - ``"pending"``: back after the deadline, so the stored state is reported at the
      node's next contact;
    - ``"lost"``: back after the deadline with nothing stored.
    """

    node: int
    server_round: int
    step: int
    cause: str
    clock_s: float
    downtime_s: float
    outcome: str = "lost"
    resumed_step: int = 0
    steps_lost: int = 0
    recovery_time_s: float = 0.0
    recovery_time_sim_s: float = 0.0
    recompute_time_sim_s: float = 0.0
    recovered_from: str = ""


@dataclass
class RoundResult:
    """The outcome of one round on one node.

    Attributes
    ----------
    state_dict : dict or None
        The float32 state_dict to send; None when the node replies with an error.
    metrics : dict
        Reply metrics of the message contract (also filled for an error reply).
    error : str or None
        Reason of the error reply; None for a normal reply.
    failures : list of FailureRecord
        Every failure during the round's training.
    """

    state_dict: dict[str, torch.Tensor] | None
    metrics: dict[str, int | float]
    error: str | None = None
    failures: list[FailureRecord] = field(default_factory=list)


class ReliableDevice:
    """A device with a clock and a hardware profile that never fails (failure scale 0).

    Parameters
    ----------
    node_id : int
        Node id.
    profile : DeviceProfile
        Step time and storage bandwidths.
    clock_s : float, default 0.0
        Initial clock in simulated seconds.
    """

    def __init__(self, node_id: int, profile: DeviceProfile, clock_s: float = 0.0) -> None:
        self.node_id = node_id
        self.profile = profile
        self.clock_s = float(clock_s)

    def advance(self, seconds: float, *, busy: bool) -> FailureEvent | None:
        """Move the clock forward by ``seconds``; never fails."""
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise ValueError(f"seconds={seconds} is invalid; advance by a finite, non-negative number of seconds")
        self.clock_s += seconds
        return None

    def advance_until(self, time_s: float, *, busy: bool) -> FailureEvent | None:
        """Move the clock to ``time_s``; a time in the past is a no-op."""
        return self.advance(max(time_s - self.clock_s, 0.0), busy=busy)

    def restart(self, failure: FailureEvent) -> None:
        """Raise RuntimeError: a reliable device never fails, so it never restarts."""
        raise RuntimeError(f"node {self.node_id} never fails, so it cannot restart from {failure}")

    def hazard_rate(self) -> float:
        """Return 0 failures per second."""
        return 0.0

    def battery_low(self) -> bool:
        """Return False: the device has no battery that runs low."""
        return False

    def can_upload(self) -> bool:
        """Return True: the device always has coverage."""
        return True

    def to_json(self) -> dict[str, Any]:
        """Return the device as JSON-serializable data."""
        return {
            "format": RELIABLE_DEVICE_FORMAT,
            "node_id": self.node_id,
            "clock_s": self.clock_s,
            "profile": asdict(self.profile),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReliableDevice:
        """Rebuild a device from :meth:`to_json` output."""
        return cls(int(data["node_id"]), DeviceProfile(**data["profile"]), float(data["clock_s"]))


Device = SimulatedDevice | ReliableDevice


def restore_device(memory: NodeMemory, node_id: int, settings: RoundSettings) -> Device:
    """Return the node's device from its memory, or make it on the node's first contact.

    With ``failure_scale == 0`` the device is a :class:`ReliableDevice` with the profile
    that :func:`~cb_mobile.dropout.make_device` assigns the node for the seed, so the
    failure-free run times its steps like the others.
    """
    if memory.device is not None:
        if memory.device.get("format") == RELIABLE_DEVICE_FORMAT:
            return ReliableDevice.from_json(memory.device)
        return SimulatedDevice.from_json(memory.device)

    if settings.failure_scale == 0.0:
        profile = make_device(node_id, seed=settings.seed, handset_share=settings.handset_share).profile
        return ReliableDevice(node_id, profile)
    return make_device(
        node_id, seed=settings.seed, handset_share=settings.handset_share, failure_scale=settings.failure_scale
    )


class LocalTrainer:
    """A model, its optimizer and a fixed batch order for one round.

    The batch of step ``k`` (from 0) depends only on the seed, node id and round, so a
    resumed run trains on the same batches as an uninterrupted one.

    Parameters
    ----------
    model : torch.nn.Module
        A freshly built model.
    global_state : Mapping[str, torch.Tensor]
        The round's global state_dict, loaded into ``model``.
    inputs, targets : torch.Tensor
        The node's windows ``[N, window, F]`` and targets ``[N]``.
    settings : RoundSettings
        Batch size, learning rate and optimizer.
    order_seed : sequence of int
        Seed of the batch order.
    """

    def __init__(
        self,
        model: nn.Module,
        global_state: Mapping[str, torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        settings: RoundSettings,
        order_seed: tuple[int, ...],
    ) -> None:
        start = time.perf_counter()
        model.load_state_dict(dict(global_state))
        self.load_seconds = time.perf_counter() - start

        self.model = model
        self.model.train()
        if settings.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        else:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
        self.inputs = inputs
        self.targets = targets
        self.batch_size = min(settings.batch_size, len(targets))
        self.order = np.random.default_rng(list(order_seed)).permutation(len(targets))

    def batch_indices(self, step: int) -> np.ndarray:
        """Return the sample indices of local step ``step`` (from 0), wrapping around the shard."""
        begin = (step * self.batch_size) % len(self.order)
        positions = (begin + np.arange(self.batch_size)) % len(self.order)
        return self.order[positions]

    def train_step(self, step: int) -> float:
        """Run one optimizer step on the batch of ``step`` and return its MSE loss."""
        indices = torch.from_numpy(self.batch_indices(step))
        inputs, targets = self.inputs[indices], self.targets[indices]

        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def batch_loss(self, step: int = 0) -> float:
        """Return the MSE loss of the model on the batch of ``step`` without training."""
        indices = torch.from_numpy(self.batch_indices(step))
        return float(nn.functional.mse_loss(self.model(self.inputs[indices]), self.targets[indices]))

    def float32_state(self) -> dict[str, torch.Tensor]:
        """Return a detached float32 copy of the model's state_dict."""
        return {key: value.detach().to(torch.float32).clone() for key, value in self.model.state_dict().items()}


class RoundLost(Exception):
    """The device came back after the round's deadline, so the round's reply is an error."""


@dataclass
class _Accounting:
    """Counters of one round that live outside the simulated device's memory."""

    failures_recovered: int = 0
    recoveries: int = 0
    steps_lost: int = 0
    recovery_time_s: float = 0.0
    recompute_time_sim_s: float = 0.0
    checkpoints: int = 0
    checkpoint_bytes_written: int = 0
    checkpoint_time_sim_s: float = 0.0
    checkpoint_time_measured_s: float = 0.0
    train_time_sim_s: float = 0.0
    train_time_measured_s: float = 0.0
    steps_trained: int = 0
    losses: dict[int, float] = field(default_factory=dict)


class DeviceRound:
    """One round of one node: idle until the round starts, train, fail, recover, reply.

    Parameters
    ----------
    settings : RoundSettings
        The run's settings.
    request : RoundRequest
        The server's train request.
    inputs, targets : torch.Tensor
        The node's shard.
    model_factory : callable
        Builds a new model of the run's architecture.
    node_id : int
        The node's partition id; the device, the batch order and the logs use it.
    store_dir : Path
        The node's checkpoint folder (unused by FedAvg).
    memory : NodeMemory
        The node's memory, updated in place.
    events_path : Path or None, default None
        A JSON Lines file that receives one line per failure, recovery and reply.
    device : SimulatedDevice, ReliableDevice or None, default None
        A device to use instead of the one in ``memory``, for example one driven by a
        failure trace; None restores or makes the node's own device.
    """

    def __init__(
        self,
        settings: RoundSettings,
        request: RoundRequest,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        model_factory: Callable[[], nn.Module],
        *,
        node_id: int,
        store_dir: Path,
        memory: NodeMemory,
        events_path: Path | None = None,
        device: Device | None = None,
    ) -> None:
        if len(targets) == 0:
            raise ValueError(f"node {node_id} has an empty shard; use fewer partitions than training windows")

        self.settings = settings
        self.request = request
        self.inputs = inputs
        self.targets = targets
        self.model_factory = model_factory
        self.node_id = node_id
        self.store_dir = Path(store_dir)
        self.memory = memory
        self.events_path = events_path

        self.device: Device = device if device is not None else restore_device(memory, node_id, settings)
        self.profile = self.device.profile
        self.backend = self._make_backend()
        self.trainer: LocalTrainer | None = None
        self.step = 0
        self.accounting = _Accounting()
        self.failures: list[FailureRecord] = []
        self.round_start_s = (request.server_round - 1) * settings.round_deadline_s
        self.deadline_s = request.server_round * settings.round_deadline_s

    def _make_backend(self) -> CheckpointBackend:
        device_id = f"node-{self.node_id}"
        if self.settings.mode == "checkbullet":
            return CheckBulletCheckpoints(
                self.profile,
                self.store_dir,
                device_id=device_id,
                codec=self.settings.codec,
                optimizer_codec=self.settings.optimizer_codec,
                merge_k=self.settings.merge_k,
                cap_bytes=self.settings.storage_cap_bytes or None,
            )
        if self.settings.mode == "full-checkpoint":
            return FullCheckpoints(self.profile, self.store_dir, device_id=device_id)
        return NoCheckpoints(self.profile)

    def _policy_hazard_rate(self) -> float | None:
        """Return the hazard rate passed to the interval policy, or None to let it estimate one.

        A simulated device takes its hazard rate from its failure model. A reliable
        device (failure scale 0) models a real one whose failures are unknown in
        advance, so its policy estimates the rate from ``prior_mtbf_s`` and the
        node's observed restarts.
        """
        if isinstance(self.device, ReliableDevice):
            return None
        return self.device.hazard_rate()

    # -- the round ----------------------------------------------------------

    def run(self) -> RoundResult:
        """Play the round and return the reply."""
        self._idle_until_round_start()
        try:
            if self.device.clock_s >= self.deadline_s:
                raise RoundLost(
                    f"node {self.node_id} is busy or down until t={self.device.clock_s:.0f} s, "
                    f"past round {self.request.server_round}'s deadline t={self.deadline_s:.0f} s"
                )
            if self.memory.pending is not None:
                partial = self._report_pending()
                if partial is not None:
                    return self._finish(partial)
            return self._finish(self._train())
        except RoundLost as lost:
            logger.warning("Node %d replies to round %d with an error: %s", self.node_id, self.request.server_round, lost)
            return self._finish(self._error_result(str(lost)))

    def _finish(self, result: RoundResult) -> RoundResult:
        self.memory.device = self.device.to_json()
        if self.backend.checkpoint_cost_s is not None:
            self.memory.checkpoint_cost_s = self.backend.checkpoint_cost_s
        result.failures = self.failures
        if result.error is None:
            self.memory.unreported_steps_lost = 0
        self._write_event({"event": "reply", **result.metrics, "error": result.error})
        return result

    def _idle_until_round_start(self) -> None:
        while self.device.clock_s < self.round_start_s:
            failure = self.device.advance_until(self.round_start_s, busy=False)
            if failure is None:
                break
            self._restart_idle(failure, "before the round")

    def _train(self) -> RoundResult:
        self.memory.pending = None
        if isinstance(self.backend, FullCheckpoints):
            self.backend.delete_other_versions(self.request.model_version)
        self._build(self.request.server_round, self.request.model_version)

        planned = self.settings.local_steps
        while True:
            while self.step < planned:
                self._one_step()
            if self._upload_window():
                break

        trainer = self._require_trainer()
        self.memory.rounds_trained += 1
        return RoundResult(trainer.float32_state(), self._metrics(partial=False, staleness=0))

    def _one_step(self) -> None:
        step_seconds = self.profile.step_seconds
        failure = self.device.advance(step_seconds, busy=True)
        if failure is not None:
            self._recover(failure)
            return

        trainer = self._require_trainer()
        start = time.perf_counter()
        loss = trainer.train_step(self.step)
        self.accounting.train_time_measured_s += time.perf_counter() - start
        self.accounting.train_time_sim_s += step_seconds
        self.accounting.steps_trained += 1
        self.step += 1
        self.accounting.losses[self.step] = loss

        cost = self.backend.after_step(
            self.step,
            loss,
            step_seconds=step_seconds,
            hazard_rate=self._policy_hazard_rate(),
            battery_low=self.device.battery_low(),
        )
        self._charge_checkpoint(cost)

    def _charge_checkpoint(self, cost: CheckpointCost | None) -> None:
        if cost is None:
            return
        self._count_checkpoint(cost)

        # NOTE: a failure inside the checkpoint's simulated write still counts the
        # checkpoint as committed, because the real commit already happened on disk.
        failure = self.device.advance(cost.simulated_s, busy=True)
        if failure is not None:
            self._recover(failure)

    def _count_checkpoint(self, cost: CheckpointCost) -> None:
        accounting = self.accounting
        accounting.checkpoint_time_sim_s += cost.simulated_s
        accounting.checkpoint_time_measured_s += cost.measured_s
        if cost.committed:
            accounting.checkpoints += 1
            accounting.checkpoint_bytes_written += cost.bytes_written
        if self.memory.baseline_checkpoint_bytes is None and self.trainer is not None:
            self.memory.baseline_checkpoint_bytes = full_state_bytes(self.trainer.model, self.trainer.optimizer)

    def _upload_window(self) -> bool:
        """Wait for coverage to send the reply; return False when a failure sent training back."""
        while not self.device.can_upload():
            if self.device.clock_s >= self.deadline_s:
                self._miss_deadline_with_state()
            failure = self.device.advance(min(UPLOAD_RETRY_S, self.deadline_s - self.device.clock_s), busy=False)
            if failure is not None:
                self._recover(failure)
                return False
        return True

    def _miss_deadline_with_state(self) -> None:
        loss = self.accounting.losses.get(self.step, math.nan)
        cost = self.backend.checkpoint_now(self.step, loss, "missed upload")
        if cost is not None:
            self._count_checkpoint(cost)
            # The write has already committed on disk, so a failure during its
            # simulated seconds loses nothing more: the device restarts and the
            # round is lost for want of coverage either way.
            failure = self.device.advance(cost.simulated_s, busy=False)
            if failure is not None:
                self._restart_idle(failure, "after its missed-upload checkpoint")
        self._lose_round(self.step, "no coverage to upload before the deadline", None)

    def _restart_idle(self, failure: FailureEvent, when: str) -> None:
        """Restart a device that failed outside training, where a failure loses no state."""
        logger.debug(
            "Node %d failed while idle %s at t=%.0f s (%s, down for %.0f s); nothing in memory is lost",
            self.node_id, when, failure.time_s, failure.cause, failure.downtime_s,
        )
        self.device.restart(failure)

    # -- failure and recovery -------------------------------------------------

    def _recover(self, failure: FailureEvent) -> None:
        """Drop memory, restart the device, and resume from disk if the deadline allows."""
        while failure is not None:
            record = FailureRecord(
                node=self.node_id,
                server_round=self.request.server_round,
                step=self.step,
                cause=failure.cause,
                clock_s=failure.time_s,
                downtime_s=failure.downtime_s,
            )
            self.failures.append(record)
            self._drop_memory()
            self.device.restart(failure)
            logger.warning(
                "Node %d failed after %d of %d steps in round %d: %s at t=%.0f s, down for %.0f s",
                self.node_id, record.step, self.settings.local_steps, self.request.server_round,
                failure.cause, failure.time_s, failure.downtime_s,
            )

            if self.device.clock_s >= self.deadline_s:
                self._lose_round(record.step, f"{failure.cause} at step {record.step}", record)

            failure = self._resume(record)

    def _drop_memory(self) -> None:
        # Only files on disk survive a failure: the model, the optimizer and every
        # checkpointing object are deleted and garbage-collected here.
        self.backend.detach()
        self.trainer = None
        gc.collect()

    def _resume(self, record: FailureRecord) -> FailureEvent | None:
        """Rebuild the trainer, restore from disk, charge the recovery; return a failure during it."""
        self._build(self.request.server_round, self.request.model_version)
        trainer = self._require_trainer()
        restored = self.backend.restore(self.request.model_version)
        if restored is None:
            restored = RestoredState(
                step=0,
                loss=None,
                source=f"global model {self.request.model_version}",
                measured_s=trainer.load_seconds,
                bytes_read=0,
                simulated_s=trainer.load_seconds,
            )

        record.outcome = "recovered"
        record.resumed_step = restored.step
        record.steps_lost = record.step - restored.step
        record.recovery_time_s = restored.measured_s
        record.recovery_time_sim_s = restored.simulated_s
        record.recompute_time_sim_s = record.steps_lost * self.profile.step_seconds
        record.recovered_from = restored.source
        self.step = restored.step

        accounting = self.accounting
        accounting.failures_recovered += 1
        accounting.recoveries += 1
        accounting.steps_lost += record.steps_lost
        accounting.recovery_time_s += record.recovery_time_s
        accounting.recompute_time_sim_s += record.recompute_time_sim_s
        logger.info(
            "Node %d recovered in round %d from %s: back at step %d of %d, %d steps lost, "
            "load+decode+merge %.4f s, recompute %.1f simulated s",
            self.node_id, self.request.server_round, restored.source, restored.step, record.step,
            record.steps_lost, restored.measured_s, record.recompute_time_sim_s,
        )
        self._write_event({"event": "failure", **asdict(record)})
        return self.device.advance(restored.simulated_s, busy=True)

    def _lose_round(self, failed_step: int, cause: str, record: FailureRecord | None) -> None:
        """Remember a pending recovery when something is stored, then raise RoundLost.

        The steps this loses are carried in the node's memory and reported in its
        next reply: all ``failed_step`` steps for FedAvg, the steps after the stored
        state for a checkpointing mode (counted when that state is restored).
        """
        backend_stores = not isinstance(self.backend, NoCheckpoints)
        if backend_stores and self.accounting.checkpoints > 0:
            self.memory.pending = PendingRecovery(
                server_round=self.request.server_round,
                model_version=self.request.model_version,
                failed_step=failed_step,
                steps_planned=self.settings.local_steps,
                cause=cause,
            )
            outcome = "pending"
            what = "its checkpoints stay on disk for the next contact"
        else:
            self.memory.unreported_steps_lost += failed_step
            outcome = "lost"
            what = "the round's local work is lost"

        if record is not None:
            record.outcome = outcome
            record.steps_lost = failed_step if outcome == "lost" else 0
            self._write_event({"event": "failure", **asdict(record)})
        self._drop_memory()

        reason = (
            f"node {self.node_id} missed round {self.request.server_round}'s deadline "
            f"t={self.deadline_s:.0f} s ({cause}; back at t={self.device.clock_s:.0f} s); {what}"
        )
        raise RoundLost(reason)

    def _report_pending(self) -> RoundResult | None:
        """Restore the pending round's stored state and return it as a partial reply."""
        pending = self.memory.pending
        assert pending is not None
        self.memory.pending = None

        self._build(pending.server_round, pending.model_version)
        restored = self.backend.restore(pending.model_version)
        if restored is None:
            logger.warning(
                "Node %d had a pending recovery of round %d but no checkpoint of model version %r; "
                "training round %d instead",
                self.node_id, pending.server_round, pending.model_version, self.request.server_round,
            )
            self._drop_memory()
            return None

        staleness = self.request.server_round - pending.server_round
        self.step = restored.step
        steps_lost = max(pending.failed_step - restored.step, 0)
        self.accounting.recoveries += 1
        self.accounting.recovery_time_s += restored.measured_s
        self.accounting.steps_lost += steps_lost
        logger.info(
            "Node %d recovered round %d's state at its next contact (round %d) from %s: step %d of %d, "
            "load+decode+merge %.4f s, staleness %d",
            self.node_id, pending.server_round, self.request.server_round, restored.source, restored.step,
            pending.steps_planned, restored.measured_s, staleness,
        )

        failure = self.device.advance(restored.simulated_s, busy=True)
        if failure is not None:
            # The recovery itself failed: keep the round pending for the next contact.
            self.memory.pending = pending
            self.accounting.recoveries -= 1
            self.accounting.recovery_time_s -= restored.measured_s
            self.accounting.steps_lost -= steps_lost
            self._drop_memory()
            self.device.restart(failure)
            raise RoundLost(
                f"node {self.node_id} failed while recovering round {pending.server_round}'s state "
                f"({failure.cause}); it retries at its next contact"
            )

        self._write_event(
            {
                "event": "recovery",
                "server_round": self.request.server_round,
                "from_round": pending.server_round,
                "step": pending.failed_step,
                "resumed_step": restored.step,
                "steps_lost": steps_lost,
                "recovery_time_s": restored.measured_s,
                "recovery_time_sim_s": restored.simulated_s,
                "recovered_from": restored.source,
            }
        )
        trainer = self._require_trainer()
        loss = restored.loss if restored.loss is not None and math.isfinite(restored.loss) else trainer.batch_loss()
        metrics = self._metrics(partial=True, staleness=staleness, steps_completed=restored.step, train_loss=loss)
        metrics["steps-planned"] = max(pending.steps_planned, restored.step, 1)
        return RoundResult(trainer.float32_state(), metrics)

    # -- helpers --------------------------------------------------------------

    def _build(self, server_round: int, model_version: str) -> None:
        order_seed = (self.settings.seed, self.node_id, server_round)
        self.trainer = LocalTrainer(
            self.model_factory(), self.request.global_state, self.inputs, self.targets, self.settings, order_seed
        )
        self.backend.attach(
            self.trainer.model,
            self.trainer.optimizer,
            server_round=server_round,
            model_version=model_version,
            hazard_rate=self._policy_hazard_rate(),
            checkpoint_cost_s=self.memory.checkpoint_cost_s,
            prior_mtbf_s=self.settings.prior_mtbf_s,
            observed_uptimes_s=tuple(self.memory.observed_uptimes_s),
        )

    def _require_trainer(self) -> LocalTrainer:
        if self.trainer is None:
            raise RuntimeError(f"node {self.node_id}: no trainer is built; this is a bug in the round's control flow")
        return self.trainer

    def _error_result(self, reason: str) -> RoundResult:
        metrics = self._metrics(partial=False, staleness=0, steps_completed=0, train_loss=0.0)
        metrics["failed"] = 1
        return RoundResult(None, metrics, error=reason)

    def _metrics(
        self,
        *,
        partial: bool,
        staleness: int,
        steps_completed: int | None = None,
        train_loss: float | None = None,
    ) -> dict[str, int | float]:
        accounting = self.accounting
        planned = self.settings.local_steps
        completed = self.step if steps_completed is None else steps_completed
        if train_loss is None:
            losses = [accounting.losses[step] for step in range(1, completed + 1) if step in accounting.losses]
            train_loss = float(np.mean(losses)) if losses else 0.0

        baseline_per_checkpoint = self.memory.baseline_checkpoint_bytes or 0
        return {
            "num-examples": int(len(self.targets)),
            "steps-completed": int(completed),
            "steps-planned": int(planned),
            "steps-lost": int(accounting.steps_lost + self.memory.unreported_steps_lost),
            "steps-trained": int(accounting.steps_trained),
            "failed": int(bool(self.failures)),
            "recovered": int(accounting.recoveries > 0),
            "partial": int(partial),
            "staleness": int(staleness),
            "train-loss": float(train_loss),
            "recovery-time-s": float(accounting.recovery_time_s),
            "recompute-time-sim-s": float(accounting.recompute_time_sim_s),
            "checkpoint-bytes-written": int(accounting.checkpoint_bytes_written),
            "baseline-checkpoint-bytes": int(baseline_per_checkpoint * accounting.checkpoints),
            "store-bytes": int(self.backend.store_bytes()),
            "checkpoint-time-s": float(accounting.checkpoint_time_sim_s),
            "checkpoint-time-measured-s": float(accounting.checkpoint_time_measured_s),
            "train-time-s": float(accounting.train_time_sim_s),
            "train-time-measured-s": float(accounting.train_time_measured_s),
            "checkpoints": int(accounting.checkpoints),
            "device-clock-s": float(self.device.clock_s),
            "server-round": int(self.request.server_round),
            "failures": int(accounting.failures_recovered),
            "recoveries": int(accounting.recoveries),
        }

    def _write_event(self, event: Mapping[str, Any]) -> None:
        if self.events_path is None:
            return
        line = json.dumps({"node": self.node_id, "mode": self.settings.mode, **event}, allow_nan=False) + "\n"
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        # One os.write of one short line to an O_APPEND file, so concurrent nodes in
        # other processes never interleave their lines.
        descriptor = os.open(self.events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, line.encode("utf-8"))
        finally:
            os.close(descriptor)


def run_round(
    settings: RoundSettings,
    request: RoundRequest,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    model_factory: Callable[[], nn.Module],
    *,
    node_id: int,
    store_dir: Path,
    memory: NodeMemory,
    events_path: Path | None = None,
    device: Device | None = None,
) -> RoundResult:
    """Play one round on one node; see the module docstring for the rules.

    Parameters
    ----------
    settings : RoundSettings
        The run's settings.
    request : RoundRequest
        The server's train request.
    inputs, targets : torch.Tensor
        The node's windows ``[N, window, F]`` and targets ``[N]``.
    model_factory : callable
        Builds a new model of the run's architecture.
    node_id : int
        The node's partition id.
    store_dir : Path
        The node's checkpoint folder.
    memory : NodeMemory
        The node's memory between rounds; updated in place.
    events_path : Path or None, default None
        JSON Lines file for failure, recovery and reply events.
    device : SimulatedDevice, ReliableDevice or None, default None
        A device to use instead of the one in ``memory``.

    Returns
    -------
    RoundResult
        A state_dict with metrics, or an error reason.
    """
    round_run = DeviceRound(
        settings,
        request,
        inputs,
        targets,
        model_factory,
        node_id=node_id,
        store_dir=store_dir,
        memory=memory,
        events_path=events_path,
        device=device,
    )
    return round_run.run()
