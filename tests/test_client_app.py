"""Tests of the simulated node's round (failures, recovery, memory) and of the ClientApp handler."""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path

import pytest
import torch

from cb_mobile.dropout import CAUSES, DeviceProfile, FailureEvent
from cb_mobile.models import build_model
from client_app import device_run
from client_app.checkpointing import CheckBulletCheckpoints
from client_app.device_run import (
    NodeMemory,
    PendingRecovery,
    ReliableDevice,
    RoundRequest,
    RoundSettings,
    run_round,
)

PROFILE = DeviceProfile("handset", "test", step_seconds=0.25, write_bytes_per_s=100e6, read_bytes_per_s=400e6)
STEPS = 10
WINDOW = 12
FEATURES = 11


class ScriptedDevice:
    """A device that fails during chosen training steps, with chosen downtimes.

    ``failures`` maps a step number ``s`` (from 1) to ``(cause, downtime_s)``: the
    device fails while running step ``s``, so ``s - 1`` steps are complete.
    Only clock advances of exactly one training step count as steps.
    """

    def __init__(self, failures: dict[int, tuple[str, float]] | None = None, clock_s: float = 0.0) -> None:
        self.profile = PROFILE
        self.clock_s = clock_s
        self.failures = dict(failures or {})
        self.step_calls = 0
        self.down: FailureEvent | None = None

    def advance(self, seconds: float, *, busy: bool) -> FailureEvent | None:
        assert self.down is None, "advanced while down"
        if busy and seconds == PROFILE.step_seconds:
            self.step_calls += 1
            if self.step_calls in self.failures:
                cause, downtime = self.failures.pop(self.step_calls)
                self.down = FailureEvent(self.clock_s + seconds / 2, cause, downtime)
                self.clock_s = self.down.time_s
                return self.down
        self.clock_s += seconds
        return None

    def advance_until(self, time_s: float, *, busy: bool) -> FailureEvent | None:
        return self.advance(max(time_s - self.clock_s, 0.0), busy=busy)

    def restart(self, failure: FailureEvent) -> None:
        assert failure == self.down
        self.clock_s = failure.time_s + failure.downtime_s
        self.down = None

    def hazard_rate(self) -> float:
        return 0.05

    def battery_low(self) -> bool:
        return False

    def can_upload(self) -> bool:
        return True

    def to_json(self) -> dict[str, object]:
        return {"format": "scripted", "clock_s": self.clock_s}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # On a loaded machine, two intra-op threads make these tiny LSTM steps ten times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def shard() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, WINDOW, FEATURES, generator=generator)
    targets = inputs[:, -1, 0] * 0.5 + 0.1 * torch.randn(256, generator=generator)
    return inputs, targets


@pytest.fixture(scope="module")
def factory() -> functools.partial:
    return functools.partial(build_model, "lstm", num_features=FEATURES, window=WINDOW, hidden_size=8, num_layers=1)


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    return build_model("lstm", num_features=FEATURES, window=WINDOW, hidden_size=8, num_layers=1, seed=7).state_dict()


def settings_for(mode: str, **overrides: object) -> RoundSettings:
    values: dict[str, object] = {"mode": mode, "local_steps": STEPS, "batch_size": 16, "seed": 3}
    values.update(overrides)
    return RoundSettings(**values)


def play(
    mode: str,
    device: ScriptedDevice,
    shard: tuple[torch.Tensor, torch.Tensor],
    factory: functools.partial,
    global_state: dict[str, torch.Tensor],
    tmp_path: Path,
    *,
    server_round: int = 1,
    memory: NodeMemory | None = None,
    **overrides: object,
) -> tuple[device_run.RoundResult, NodeMemory]:
    memory = memory if memory is not None else NodeMemory()
    result = run_round(
        settings_for(mode, **overrides),
        RoundRequest(server_round, f"r{server_round}", global_state),
        *shard,
        factory,
        node_id=4,
        store_dir=tmp_path / "node-4",
        memory=memory,
        events_path=tmp_path / "events.jsonl",
        device=device,
    )
    return result, memory


# -- recovery within the round ------------------------------------------------


def test_fedavg_failure_recomputes_round(shard, factory, global_state, tmp_path):
    result, _ = play("fedavg", ScriptedDevice({7: ("os-kill", 30.0)}), shard, factory, global_state, tmp_path)

    assert result.error is None
    assert result.metrics["steps-completed"] == STEPS
    assert result.metrics["steps-lost"] == 6
    assert result.metrics["recompute-time-sim-s"] == pytest.approx(6 * PROFILE.step_seconds)
    assert result.metrics["failures"] == 1
    assert result.metrics["recoveries"] == 1
    assert result.metrics["checkpoint-bytes-written"] == 0
    assert result.failures[0].resumed_step == 0
    assert result.failures[0].recovered_from == "global model r1"


@pytest.mark.parametrize("mode, source", [("checkbullet", "merged checkpoint"), ("full-checkpoint", "full checkpoint")])
def test_checkpoint_failure_resumes_from_disk(mode, source, shard, factory, global_state, tmp_path):
    result, _ = play(mode, ScriptedDevice({7: ("os-kill", 30.0)}), shard, factory, global_state, tmp_path)
    failure = result.failures[0]

    assert result.error is None
    assert result.metrics["steps-completed"] == STEPS
    assert failure.outcome == "recovered"
    assert failure.step == 6
    assert 1 <= failure.resumed_step <= 6
    assert source in failure.recovered_from
    assert result.metrics["steps-lost"] == 6 - failure.resumed_step
    assert result.metrics["recovery-time-s"] > 0.0
    assert result.metrics["recovered"] == 1
    assert result.metrics["checkpoint-bytes-written"] > 0
    assert result.metrics["baseline-checkpoint-bytes"] > 0
    assert result.metrics["store-bytes"] > 0


def test_lossless_resume_matches_uninterrupted(shard, factory, global_state, tmp_path):
    lossless = {"codec": "lossless", "optimizer_codec": "lossless", "merge_k": 1}
    clean, _ = play("checkbullet", ScriptedDevice(), shard, factory, global_state, tmp_path / "clean", **lossless)
    resumed, _ = play(
        "checkbullet", ScriptedDevice({7: ("os-kill", 5.0)}), shard, factory, global_state, tmp_path / "resumed", **lossless
    )

    assert resumed.metrics["failures"] == 1
    for key, value in clean.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key


def test_failure_drops_memory(shard, factory, global_state, tmp_path, monkeypatch):
    trainers: list[tuple[weakref.ref, weakref.ref]] = []
    managers: list[weakref.ref] = []
    build_trainer = device_run.LocalTrainer.__init__
    attach = CheckBulletCheckpoints.attach

    def spy_trainer(self, *args, **kwargs):
        build_trainer(self, *args, **kwargs)
        trainers.append((weakref.ref(self.model), weakref.ref(self.optimizer)))

    def spy_attach(self, *args, **kwargs):
        attach(self, *args, **kwargs)
        managers.append(weakref.ref(self.manager))

    monkeypatch.setattr(device_run.LocalTrainer, "__init__", spy_trainer)
    monkeypatch.setattr(CheckBulletCheckpoints, "attach", spy_attach)
    result, _ = play("checkbullet", ScriptedDevice({5: ("os-kill", 5.0)}), shard, factory, global_state, tmp_path)

    assert result.metrics["failures"] == 1
    assert len(trainers) == 2
    assert trainers[0][0]() is None
    assert trainers[0][1]() is None
    assert managers[0]() is None


# -- missing the deadline -------------------------------------------------------


@pytest.mark.parametrize("mode", ["checkbullet", "full-checkpoint"])
def test_missed_deadline_reports_partial_next_contact(mode, shard, factory, global_state, tmp_path):
    device = ScriptedDevice({7: ("battery-depleted", 700.0)})
    lost, memory = play(mode, device, shard, factory, global_state, tmp_path)

    assert lost.error is not None
    assert lost.metrics["failed"] == 1
    assert memory.pending is not None
    assert memory.pending.failed_step == 6
    assert lost.failures[0].outcome == "pending"

    partial, memory = play(mode, device, shard, factory, global_state, tmp_path, server_round=2, memory=memory)

    assert partial.error is None
    assert partial.metrics["partial"] == 1
    assert partial.metrics["staleness"] == 1
    assert partial.metrics["recoveries"] == 1
    assert partial.metrics["failures"] == 0
    assert 1 <= partial.metrics["steps-completed"] <= 6
    assert partial.metrics["steps-lost"] == 6 - partial.metrics["steps-completed"]
    assert partial.metrics["server-round"] == 2
    assert memory.pending is None
    assert any(not torch.equal(value, global_state[key]) for key, value in partial.state_dict.items())


def test_fedavg_missed_deadline_loses_round(shard, factory, global_state, tmp_path):
    device = ScriptedDevice({7: ("battery-depleted", 700.0)})
    lost, memory = play("fedavg", device, shard, factory, global_state, tmp_path)

    assert lost.error is not None
    assert memory.pending is None
    assert lost.failures[0].outcome == "lost"

    fresh, memory = play("fedavg", device, shard, factory, global_state, tmp_path, server_round=2, memory=memory)

    assert fresh.metrics["partial"] == 0
    assert fresh.metrics["steps-completed"] == STEPS
    assert fresh.metrics["steps-lost"] == 6
    assert memory.unreported_steps_lost == 0


def test_device_down_past_deadline_replies_error(shard, factory, global_state, tmp_path):
    result, _ = play("checkbullet", ScriptedDevice(clock_s=5000.0), shard, factory, global_state, tmp_path)

    assert result.error is not None
    assert "past round 1's deadline" in result.error


def test_events_file_records_failure_and_reply(shard, factory, global_state, tmp_path):
    play("fedavg", ScriptedDevice({3: ("connectivity-lost", 1.0)}), shard, factory, global_state, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]

    assert [event["event"] for event in events] == ["failure", "reply"]
    assert events[0]["cause"] == "connectivity-lost"
    assert events[0]["step"] == 2


# -- devices and memory ---------------------------------------------------------


def test_zero_failure_scale_uses_reliable_device(shard, factory, global_state, tmp_path):
    memory = NodeMemory()
    result = run_round(
        settings_for("fedavg", failure_scale=0.0),
        RoundRequest(1, "r1", global_state),
        *shard,
        factory,
        node_id=2,
        store_dir=tmp_path / "node-2",
        memory=memory,
    )

    assert result.error is None
    assert memory.device["format"] == device_run.RELIABLE_DEVICE_FORMAT
    assert ReliableDevice.from_json(memory.device).clock_s == pytest.approx(result.metrics["device-clock-s"])


def test_real_device_fails_at_high_scale(shard, factory, global_state, tmp_path):
    memory = NodeMemory()
    result = run_round(
        settings_for("fedavg", local_steps=40, failure_scale=3000.0, seed=42, handset_share=1.0),
        RoundRequest(1, "r1", global_state),
        *shard,
        factory,
        node_id=2,
        store_dir=tmp_path / "node-2",
        memory=memory,
    )

    assert result.failures
    assert all(failure.cause in CAUSES for failure in result.failures)
    assert memory.device["clock_s"] == pytest.approx(result.metrics["device-clock-s"])


class NoCoverageDevice(ScriptedDevice):
    """A device without coverage until ``coverage_back_s`` that fails once while idle after ``idle_failure_s``."""

    def __init__(self, coverage_back_s: float, idle_failure_s: float) -> None:
        super().__init__()
        self.coverage_back_s = coverage_back_s
        self.idle_failure_s = idle_failure_s
        self.idle_failures = 0

    def advance(self, seconds: float, *, busy: bool) -> FailureEvent | None:
        assert self.down is None, "advanced while down"
        if not busy and self.clock_s >= self.idle_failure_s and self.idle_failures == 0:
            self.idle_failures += 1
            self.down = FailureEvent(self.clock_s, "os-kill", 5.0)
            return self.down
        return super().advance(seconds, busy=busy)

    def can_upload(self) -> bool:
        return self.clock_s >= self.coverage_back_s

    def hazard_rate(self) -> float:
        # Rare failures space the interval checkpoints out, so the last step is not
        # stored yet and the missed upload writes one more checkpoint.
        return 1e-7


@pytest.mark.parametrize("mode", ["checkbullet", "full-checkpoint"])
def test_idle_failure_after_missed_upload_restarts(mode, shard, factory, global_state, tmp_path):
    deadline = 60.0
    device = NoCoverageDevice(coverage_back_s=1e9, idle_failure_s=deadline)

    result, memory = play(mode, device, shard, factory, global_state, tmp_path, round_deadline_s=deadline)

    assert device.idle_failures == 1
    assert device.down is None
    assert "no coverage to upload" in str(result.error)


def test_next_round_runs_after_idle_failure(shard, factory, global_state, tmp_path):
    deadline = 60.0
    device = NoCoverageDevice(coverage_back_s=2 * deadline, idle_failure_s=deadline)
    _, memory = play("checkbullet", device, shard, factory, global_state, tmp_path, round_deadline_s=deadline)

    result, _ = play(
        "checkbullet", device, shard, factory, global_state, tmp_path,
        server_round=3, memory=memory, round_deadline_s=deadline,
    )

    assert result.error is None


def test_node_memory_json_round_trip():
    memory = NodeMemory(
        device={"format": "x"},
        pending=PendingRecovery(3, "r3", 7, 20, "battery-depleted at step 7"),
        checkpoint_cost_s=0.2,
        baseline_checkpoint_bytes=1234,
        rounds_trained=2,
        unreported_steps_lost=5,
    )

    assert NodeMemory.from_json(memory.to_json()) == memory


def test_node_memory_rejects_other_format():
    with pytest.raises(ValueError, match="format"):
        NodeMemory.from_json('{"format": "something-else", "version": 1}')


def test_round_settings_reject_unknown_mode():
    with pytest.raises(ValueError, match="mode='sync'"):
        RoundSettings(mode="sync")


# -- the Flower ClientApp -------------------------------------------------------


def train_message(global_state: dict[str, torch.Tensor], server_round: int):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    content = RecordDict(
        {
            "arrays": ArrayRecord(global_state),
            "config": ConfigRecord({"server-round": server_round, "model-version": f"r{server_round}"}),
        }
    )
    return Message(content, dst_node_id=11, message_type=MessageType.TRAIN)


def node_context(run_config: dict[str, object], partition_id: int = 1):
    from flwr.app import Context, RecordDict

    return Context(
        run_id=5,
        node_id=11,
        node_config={"partition-id": partition_id, "num-partitions": 6},
        state=RecordDict(),
        run_config=run_config,
    )


@pytest.fixture
def app_global_state() -> dict[str, torch.Tensor]:
    return build_model("lstm", num_features=FEATURES, window=WINDOW, hidden_size=8, seed=1).state_dict()


def test_app_reply_passes_server_checks(server_identity, app_global_state, tmp_path):
    from flwr.app import ArrayRecord

    from client_app.app import STATE_KEY, app
    from server_app.validation import array_specs, check_train_reply

    context = node_context({"store-root": str(tmp_path), "local-steps": 4, "hidden-size": 8, "failure-scale": 0.0})
    reply = app(train_message(app_global_state, 1), context)
    checked = check_train_reply(reply, array_specs(ArrayRecord(app_global_state)), 1)

    assert checked.metrics["steps-completed"] == 4
    assert checked.metrics["partial"] == 0
    assert STATE_KEY in context.state
    assert (tmp_path / "run-5" / "events.jsonl").is_file()


def test_app_keeps_device_clock_across_rounds(server_identity, app_global_state, tmp_path):
    from client_app.app import app, load_memory

    context = node_context({"store-root": str(tmp_path), "local-steps": 2, "hidden-size": 8, "failure-scale": 0.0})
    app(train_message(app_global_state, 1), context)
    first_clock = load_memory(context).device["clock_s"]
    reply = app(train_message(app_global_state, 2), context)

    assert first_clock < 600.0
    assert reply.content["metrics"]["device-clock-s"] >= 600.0


def test_app_error_reply_when_round_lost(server_identity, app_global_state, tmp_path):
    from flwr.common.constant import ErrorCode

    from client_app.app import app, load_memory

    run_config = {
        "store-root": str(tmp_path),
        "mode": "checkbullet",
        "local-steps": 40,
        "hidden-size": 8,
        "failure-scale": 3000.0,
        "handset-share": 1.0,
        "round-deadline-s": 20.0,
    }
    context = node_context(run_config, partition_id=2)
    reply = app(train_message(app_global_state, 1), context)

    assert reply.has_error()
    assert reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert "missed round 1's deadline" in reply.error.reason
    assert load_memory(context).device is not None


def test_unreadable_full_checkpoint_falls_back(shard, factory, global_state, tmp_path, monkeypatch):
    from client_app.checkpointing import FullCheckpoints

    save = FullCheckpoints._save

    def save_then_damage(self, *args, **kwargs):
        cost = save(self, *args, **kwargs)
        for path in self.folder.glob("*.pt"):
            path.write_bytes(b"not a torch file")
        return cost

    monkeypatch.setattr(FullCheckpoints, "_save", save_then_damage)
    result, _ = play("full-checkpoint", ScriptedDevice({7: ("os-kill", 5.0)}), shard, factory, global_state, tmp_path)

    assert result.error is None
    assert result.failures[0].resumed_step == 0
    assert result.failures[0].recovered_from == "global model r1"


def test_app_rejects_message_without_arrays(server_identity, tmp_path):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from client_app.app import app

    message = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=11, message_type=MessageType.TRAIN
    )

    with pytest.raises(ValueError, match="no ArrayRecord under 'arrays'"):
        app(message, node_context({"store-root": str(tmp_path)}))


# -- node memory file and process restarts ----------------------------------------


def memory_file(tmp_path: Path, partition_id: int = 1) -> Path:
    return tmp_path / "run-5" / f"node-{partition_id}" / "node-memory.json"


def checkbullet_config(tmp_path: Path) -> dict[str, object]:
    return {"store-root": str(tmp_path), "mode": "checkbullet", "local-steps": 6, "hidden-size": 8, "failure-scale": 0.0}


def test_app_writes_memory_file(server_identity, app_global_state, tmp_path):
    from client_app.app import app

    app(train_message(app_global_state, 1), node_context(checkbullet_config(tmp_path)))
    document = json.loads(memory_file(tmp_path).read_text(encoding="utf-8"))

    assert document["run_id"] == 5
    assert document["node_id"] == 1
    assert document["memory"]["in_progress"] is None
    assert document["memory"]["device"]["clock_s"] > 0.0


def test_app_memory_file_marks_round_in_progress(server_identity, app_global_state, tmp_path, monkeypatch):
    from client_app import app as app_module

    seen: list[dict[str, object]] = []

    def spy_run_round(*args, **kwargs):
        seen.append(json.loads(memory_file(tmp_path).read_text(encoding="utf-8"))["memory"]["in_progress"])
        return device_run.run_round(*args, **kwargs)

    monkeypatch.setattr(app_module, "run_round", spy_run_round)
    app_module.app(train_message(app_global_state, 1), node_context(checkbullet_config(tmp_path)))

    assert seen[0]["server_round"] == 1
    assert seen[0]["model_version"] == "r1"
    assert seen[0]["steps_planned"] == 6


def test_memory_restored_when_state_empty(server_identity, app_global_state, tmp_path):
    from client_app.app import app, load_memory

    first = node_context(checkbullet_config(tmp_path))
    app(train_message(app_global_state, 1), first)
    restored = load_memory(node_context({}), memory_file(tmp_path), run_id=5, node_id=1)

    assert restored.device == load_memory(first).device
    assert restored.rounds_trained == 1
    assert restored.pending is None


def test_interrupted_round_reported_from_store(server_identity, app_global_state, tmp_path, monkeypatch):
    from client_app import app as app_module

    class ProcessKilled(BaseException):
        pass

    def train_then_die(*args, **kwargs):
        device_run.run_round(*args, **kwargs)
        raise ProcessKilled

    # The first process trains round 1 and dies before it replies, so its memory
    # file still marks the round as in progress.
    monkeypatch.setattr(app_module, "run_round", train_then_die)
    with pytest.raises(ProcessKilled):
        app_module.app(train_message(app_global_state, 1), node_context(checkbullet_config(tmp_path)))
    monkeypatch.setattr(app_module, "run_round", device_run.run_round)
    store_dir = memory_file(tmp_path).parent
    committed = {
        json.loads(path.read_text(encoding="utf-8"))["meta"]["step"]
        for path in store_dir.glob("devices/*/manifests/*.json")
    }

    reply = app_module.app(train_message(app_global_state, 2), node_context(checkbullet_config(tmp_path)))
    metrics = reply.content["metrics"]
    events = [json.loads(line) for line in (tmp_path / "run-5" / "events.jsonl").read_text().splitlines()]

    assert metrics["partial"] == 1
    assert metrics["recovered"] == 1
    assert metrics["staleness"] >= 1
    assert metrics["steps-completed"] in committed
    assert any(event["event"] == "recovery" and event["from_round"] == 1 for event in events)


@pytest.mark.parametrize("content", ["{not json", '{"format": "other"}', "[1, 2]"])
def test_corrupt_memory_file_starts_fresh(server_identity, app_global_state, tmp_path, caplog, content):
    from client_app.app import app

    path = memory_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="utf-8")

    with caplog.at_level("ERROR", logger="client_app.app"):
        reply = app(train_message(app_global_state, 1), node_context(checkbullet_config(tmp_path)))

    assert not reply.has_error()
    assert reply.content["metrics"]["partial"] == 0
    assert str(path) in caplog.text


def test_foreign_memory_file_starts_fresh(tmp_path, caplog):
    from client_app.app import read_memory_file, write_memory_file

    path = memory_file(tmp_path)
    write_memory_file(path, NodeMemory(rounds_trained=3), run_id=9, node_id=1)

    with caplog.at_level("ERROR", logger="client_app.app"):
        memory = read_memory_file(path, run_id=5, node_id=1)

    assert memory is None
    assert "run 9" in caplog.text


def test_restart_counts_uptime_as_failure():
    from client_app.app import resume_interrupted_round
    from client_app.device_run import RoundInProgress

    memory = NodeMemory(up_since_unix_s=1000.0, in_progress=RoundInProgress(2, "r2", 20, 1100.0))
    resume_interrupted_round(memory, node_id=1, died_after_unix_s=1150.0)

    assert memory.observed_uptimes_s == [150.0]
    assert memory.in_progress is None
    assert memory.pending.server_round == 2
    assert memory.pending.model_version == "r2"


def test_restart_keeps_older_pending(tmp_path):
    from client_app.app import resume_interrupted_round
    from client_app.device_run import RoundInProgress

    older = PendingRecovery(1, "r1", 5, 20, "battery-depleted")
    memory = NodeMemory(pending=older, up_since_unix_s=0.0, in_progress=RoundInProgress(2, "r2", 20, 50.0))
    resume_interrupted_round(memory, node_id=1)

    assert memory.pending == older


def test_policy_observes_restarts():
    from client_app.checkpointing import build_interval_policy

    policy = build_interval_policy(PROFILE, None, 0.01, 100.0, [40.0, 60.0], device_id="node-1")

    assert policy.failures == 2
    assert policy.hazard_rate == pytest.approx(3 / 200.0)


def test_policy_keeps_model_hazard_rate():
    from client_app.checkpointing import build_interval_policy

    policy = build_interval_policy(PROFILE, 0.5, 0.01, 100.0, [40.0], device_id="node-1")

    assert policy.hazard_rate == 0.5


def test_reliable_device_interval_follows_prior_mtbf(shard, factory, global_state, tmp_path):
    device_short = ReliableDevice(4, PROFILE)
    device_long = ReliableDevice(4, PROFILE)
    cost = NodeMemory(checkpoint_cost_s=0.001)
    short, _ = play(
        "checkbullet", device_short, shard, factory, global_state, tmp_path / "short", memory=cost, prior_mtbf_s=0.01
    )
    long, _ = play(
        "checkbullet", device_long, shard, factory, global_state, tmp_path / "long",
        memory=NodeMemory(checkpoint_cost_s=0.001), prior_mtbf_s=1e9,
    )

    assert short.metrics["checkpoints"] > long.metrics["checkpoints"]
    assert long.metrics["checkpoints"] == 0


def test_round_settings_reject_zero_prior_mtbf():
    with pytest.raises(ValueError, match="prior_mtbf_s=0.0"):
        RoundSettings(prior_mtbf_s=0.0)
