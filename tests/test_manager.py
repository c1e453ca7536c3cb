"""Tests for CheckpointManager against a real CheckpointStore on disk."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cb_mobile.codec import quantization_error_bound
from cb_mobile.errors import CheckpointError, NoValidCheckpointError
from cb_mobile.interval import IntervalPolicy
from cb_mobile.manager import CheckpointManager
from cb_mobile.manifest import parse_manifest
from cb_mobile.store import CheckpointStore

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_STORE = {"fsync": False}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def _every(steps: int) -> IntervalPolicy:
    return IntervalPolicy(min_steps=steps, max_steps=steps)


def _manager(path, model, optimizer=None, **kwargs) -> CheckpointManager:
    kwargs.setdefault("store_options", FAST_STORE)
    kwargs.setdefault("policy", _every(10_000))  # tests checkpoint explicitly unless they set a policy
    return CheckpointManager(path, model, optimizer, **kwargs)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    optimizer.zero_grad()
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


# ---------------------------------------------------------------------------
# Bit-exact resume
# ---------------------------------------------------------------------------

DATA_GENERATOR = torch.Generator().manual_seed(123)
INPUTS = torch.randn(64, 4, generator=DATA_GENERATOR)
TARGETS = torch.randn(64, generator=DATA_GENERATOR)
BATCH = 8
NUM_BATCHES = len(INPUTS) // BATCH


def _epoch_order(epoch: int) -> torch.Tensor:
    return torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(1000 + epoch))


def _run(manager: CheckpointManager, total_steps: int, crash_at: int | None = None) -> None:
    """Train with shuffled batches, dropout (torch RNG), numpy noise and Python random scaling."""
    model, optimizer = manager.model, manager.optimizer
    while manager.step_count < total_steps:
        order = _epoch_order(manager.epoch)
        for position in range(manager.data_position, NUM_BATCHES):
            if manager.step_count in (total_steps, crash_at):
                return
            rows = slice(int(order[position]) * BATCH, (int(order[position]) + 1) * BATCH)
            noise = torch.from_numpy(np.random.normal(0.0, 0.05, (BATCH, 4)).astype(np.float32))
            scale = random.uniform(0.9, 1.1)

            optimizer.zero_grad()
            prediction = model(INPUTS[rows] * scale + noise).squeeze(-1)
            loss = (prediction - TARGETS[rows]).pow(2).mean()
            loss.backward()
            optimizer.step()

            if position + 1 == NUM_BATCHES:
                manager.step(loss.item(), data_position=0, epoch=manager.epoch + 1)
            else:
                manager.step(loss.item(), data_position=position + 1)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_lossless_resume_bit_exact(tmp_path):
    total, interval, crash_at = 30, 7, 17

    _seed_everything(5)
    model = _model(1)
    reference = _manager(tmp_path / "reference", model, torch.optim.Adam(model.parameters(), lr=0.01),
                         codec="lossless", policy=_every(1000))
    _run(reference, total)

    _seed_everything(5)
    model = _model(1)
    first = _manager(tmp_path / "store", model, torch.optim.Adam(model.parameters(), lr=0.01),
                     codec="lossless", optimizer_codec="lossless", policy=_every(interval))
    _run(first, total, crash_at=crash_at)
    assert first.step_count == crash_at

    _seed_everything(99)  # the restarted process starts from other RNG states
    model = _model(2)
    second = _manager(tmp_path / "store", model, torch.optim.Adam(model.parameters(), lr=0.01),
                      codec="lossless", optimizer_codec="lossless", policy=_every(interval))
    report = second.recover()
    assert report.state.step == 14
    _run(second, total)

    for (name, expected), actual in zip(reference.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(actual, expected), name
    expected_optim = reference.optimizer.state_dict()["state"]
    actual_optim = second.optimizer.state_dict()["state"]
    for index, buffers in expected_optim.items():
        for name, value in buffers.items():
            assert torch.equal(actual_optim[index][name], value), (index, name)


# ---------------------------------------------------------------------------
# Checkpointing
# ---------------------------------------------------------------------------


def test_step_checkpoints_on_interval(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    manager = _manager(tmp_path, model, optimizer, policy=_every(5))

    results = [manager.step(_train_step(model, optimizer)) for _ in range(12)]

    committed = [index + 1 for index, result in enumerate(results) if result is not None]
    assert committed == [5, 10]
    assert len(manager.store.checkpoints()) == 2
    assert manager.stats.checkpoints == 2


def test_step_seconds_device_clock(tmp_path):
    manager = _manager(tmp_path, _model(), policy=_every(100))

    for _ in range(4):
        manager.step(0.5, step_seconds=2.5)

    assert manager.stats.train_seconds == pytest.approx(10.0)
    assert manager.policy.step_seconds == pytest.approx(2.5)


def test_cost_hook_feeds_policy(tmp_path):
    def bytes_to_seconds(result):
        return result.bytes_written / 1_000.0  # a 1 kB/s flash write

    manager = _manager(tmp_path, _model(), policy=_every(3), checkpoint_cost_hook=bytes_to_seconds)
    for _ in range(3):
        manager.step(0.5, step_seconds=1.0)

    expected = manager.last_result.bytes_written / 1_000.0
    assert manager.stats.checkpoint_seconds == pytest.approx(expected)
    assert manager.policy.checkpoint_cost_s == pytest.approx(expected)
    assert manager.stats.measured_checkpoint_seconds > 0.0


def test_policy_interval_from_measurements(tmp_path):
    # C = 2 s (hook), step = 0.5 s, hazard 1/3600: Young 120 s -> 240 steps.
    policy = IntervalPolicy(1 / 3600, min_steps=1, max_steps=10_000)
    manager = _manager(tmp_path, _model(), policy=policy, checkpoint_cost_hook=lambda result: 2.0)

    first = manager.step(0.5, step_seconds=0.5)

    assert first is not None  # warm-up: the first checkpoint measures its cost
    assert manager.policy.interval_steps() == 240


def test_stats_bytes_written(tmp_path):
    manager = _manager(tmp_path, _model())

    result = manager.checkpoint()

    assert result.committed
    assert manager.stats.bytes_written == result.bytes_written
    assert manager.stats.logical_bytes == result.logical_bytes


def test_codec_per_tensor_role(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    _train_step(model, optimizer)
    manager = _manager(tmp_path, model, optimizer, codec="int8", optimizer_codec="lossless")

    result = manager.checkpoint()
    encoded, _ = manager.store.read(result.checkpoint_id)

    assert encoded["model/0.weight"].codec["id"] == "int8"
    assert encoded["optim/state/0/exp_avg"].codec["id"] == "lossless"
    assert encoded["optim/state/0/step"].codec["id"] == "lossless"
    assert encoded["rng/torch"].codec["id"] == "lossless"


def test_optimizer_codec_quantizes_moments(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    _train_step(model, optimizer)
    manager = _manager(tmp_path, model, optimizer, codec="int8", optimizer_codec="int8")

    result = manager.checkpoint()
    encoded, _ = manager.store.read(result.checkpoint_id)

    assert encoded["optim/state/0/exp_avg"].codec["id"] == "int8"
    assert encoded["optim/state/0/step"].codec["id"] == "lossless"


def test_meta_records_reason(tmp_path):
    manager = _manager(tmp_path, _model(), device_id="phone-7")
    manager.begin_round(3, "g3")

    manager.checkpoint("manual")
    info = manager.store.checkpoints()[-1]

    assert info.meta["checkpoint_reason"] == "manual"
    assert info.meta["device_id"] == "phone-7"
    assert info.meta["round"] == 3
    assert info.meta["model_version"] == "g3"


def test_commit_logged_with_device(tmp_path, caplog):
    manager = _manager(tmp_path, _model(), device_id="phone-7")

    with caplog.at_level(logging.INFO, logger="cb_mobile.manager"):
        manager.checkpoint("manual")

    assert any("phone-7" in record.message and "committed" in record.message for record in caplog.records)


def test_cap_skip_counted(tmp_path, caplog):
    manager = _manager(tmp_path, _model(), cap_bytes=64)

    with caplog.at_level(logging.WARNING, logger="cb_mobile.manager"):
        result = manager.checkpoint()

    assert not result.committed
    assert manager.stats.skipped == 1
    assert manager.stats.checkpoints == 0
    assert any("skipped" in record.message and "device-0" in record.message for record in caplog.records)


WRITE_ERROR_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys, torch
    from cb_mobile.manager import CheckpointManager
    from cb_mobile.interval import IntervalPolicy
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    manager = CheckpointManager(sys.argv[1], model, codec="lossless",
                                policy=IntervalPolicy(min_steps=2, max_steps=2))
    manager.checkpoint()
    with torch.no_grad():
        model.weight.add_(1.0)
    # Files may not grow past 4 KiB from here on: writes fail with EFBIG, like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    results = [manager.step(0.5) for _ in range(4)]
    print(json.dumps({"results": [r is None for r in results], "write_errors": manager.stats.write_errors,
                      "steps": manager.step_count}))
    """
)


def test_write_error_training_continues(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", WRITE_ERROR_CHILD, str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    restarted = _manager(tmp_path, nn.Linear(64, 64), codec="lossless")
    report = restarted.recover()

    assert outcome["results"] == [True, True, True, True]
    assert outcome["write_errors"] == 2
    assert outcome["steps"] == 4
    assert report.state.step == 0


def test_nan_weights_skipped(tmp_path):
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    manager = _manager(tmp_path, model, codec="int8", policy=_every(1))

    result = manager.step(0.5)

    assert result is None
    assert manager.stats.skipped == 1


def test_manual_checkpoint_raises_codec_error(tmp_path):
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    manager = _manager(tmp_path, model, codec="int8")

    with pytest.raises(CheckpointError, match="model/0.weight"):
        manager.checkpoint()


def test_unknown_codec_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="int3"):
        _manager(tmp_path, _model(), codec="int3")


def test_loss_smoothing_records_average(tmp_path):
    manager = _manager(tmp_path, _model(), loss_smoothing=0.5, policy=_every(100))

    for loss in (1.0, 3.0, 5.0):
        manager.step(loss)

    # 1.0, then 0.5 * 1 + 0.5 * 3 = 2.0, then 0.5 * 2 + 0.5 * 5 = 3.5
    assert manager.loss == pytest.approx(3.5)


# ---------------------------------------------------------------------------
# Hazard signals
# ---------------------------------------------------------------------------


def test_hazard_rate_updates_policy(tmp_path):
    manager = _manager(tmp_path, _model())

    result = manager.signal_hazard(0.25)

    assert result is None
    assert manager.policy.hazard_rate == 0.25


def test_imminent_hazard_checkpoints(tmp_path):
    manager = _manager(tmp_path, _model(), policy=_every(100))
    manager.step(0.5)

    result = manager.signal_hazard(imminent=True)

    assert result.committed
    assert manager.store.checkpoints()[-1].meta["checkpoint_reason"] == "imminent failure"


def test_imminent_hazard_not_repeated(tmp_path):
    manager = _manager(tmp_path, _model(), policy=_every(100))
    manager.step(0.5)
    manager.signal_hazard(imminent=True)

    again = manager.signal_hazard(imminent=True)

    assert again is None
    assert len(manager.store.checkpoints()) == 1


# ---------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------


def _commit_with_weights(manager: CheckpointManager, value: float, loss: float) -> None:
    with torch.no_grad():
        for parameter in manager.model.parameters():
            parameter.fill_(value)
    manager.step(loss)
    manager.checkpoint()


def test_recover_lossless_restores_weights(tmp_path):
    model = _model(1)
    manager = _manager(tmp_path, model, codec="lossless")
    manager.step(0.3, data_position=9, epoch=2)
    manager.checkpoint()
    restarted = _manager(tmp_path, _model(2), codec="lossless")

    report = restarted.recover()

    for key, value in model.state_dict().items():
        assert torch.equal(restarted.model.state_dict()[key], value), key
    assert (restarted.step_count, restarted.data_position, restarted.epoch) == (1, 9, 2)
    assert report.applied


def test_recover_int8_within_bound(tmp_path):
    model = _model(1)
    manager = _manager(tmp_path, model, codec="int8")
    result = manager.checkpoint()
    encoded, _ = manager.store.read(result.checkpoint_id)
    restarted = _manager(tmp_path, _model(2))

    restarted.recover()

    for key, value in model.state_dict().items():
        bound = quantization_error_bound(encoded[f"model/{key}"])
        error = (restarted.model.state_dict()[key] - value).abs().max().item()
        assert error <= bound, key


def test_recover_merges_lowest_loss(tmp_path):
    manager = _manager(tmp_path, _model(), codec="lossless")
    _commit_with_weights(manager, 1.0, loss=0.1)
    _commit_with_weights(manager, 9.0, loss=0.9)
    _commit_with_weights(manager, 3.0, loss=0.3)
    restarted = _manager(tmp_path, _model(), codec="lossless")

    report = restarted.recover(k=2)

    # weights 1/0.1 : 1/0.3 = 10 : 3.33 -> 0.75 and 0.25 (eps 1e-8 is negligible)
    assert report.weights == pytest.approx((0.75, 0.25))
    assert report.losses == pytest.approx((0.1, 0.3))
    expected = 0.75 * 1.0 + 0.25 * 3.0
    assert restarted.model[0].weight[0, 0].item() == pytest.approx(expected)


def test_recover_counters_from_newest(tmp_path):
    manager = _manager(tmp_path, _model(), codec="lossless")
    _commit_with_weights(manager, 1.0, loss=0.1)
    _commit_with_weights(manager, 3.0, loss=0.3)
    restarted = _manager(tmp_path, _model(), codec="lossless")

    report = restarted.recover(k=2)

    assert report.state.step == 2
    assert restarted.step_count == 2


def test_recover_apply_false(tmp_path):
    manager = _manager(tmp_path, _model(1), codec="lossless")
    manager.checkpoint()
    model = _model(2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    restarted = _manager(tmp_path, model, codec="lossless")

    report = restarted.recover(apply=False)

    assert not report.applied
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert restarted.step_count == 0


def _damage_checkpoint_only_chunks(store: CheckpointStore, damaged_id: str, intact_id: str) -> None:
    infos = {info.checkpoint_id: info for info in store.checkpoints()}
    damaged_chunks = set(parse_manifest(Path(infos[damaged_id].path).read_bytes(), damaged_id).chunks)
    intact_chunks = set(parse_manifest(Path(infos[intact_id].path).read_bytes(), intact_id).chunks)
    chunk_id = sorted(damaged_chunks - intact_chunks)[0]
    path = store.root / "chunks" / chunk_id[:2] / chunk_id
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_recover_skips_damaged(tmp_path, caplog):
    options = {"fsync": False, "max_delta_chain": 0}
    manager = _manager(tmp_path, _model(), codec="lossless", store_options=options)
    _commit_with_weights(manager, 1.0, loss=0.5)
    _commit_with_weights(manager, 2.0, loss=0.1)
    older, newer = (info.checkpoint_id for info in manager.store.checkpoints())
    _damage_checkpoint_only_chunks(manager.store, newer, older)
    restarted = _manager(tmp_path, _model(), codec="lossless", store_options=options)

    with caplog.at_level(logging.WARNING, logger="cb_mobile.manager"):
        report = restarted.recover(k=1)

    assert report.selected == (older,)
    assert any(checkpoint_id == newer for checkpoint_id, _ in report.skipped)
    assert "damaged" in report.reason
    assert restarted.model[0].weight[0, 0].item() == 1.0
    assert any(newer in record.message for record in caplog.records)


def test_recover_version_filter(tmp_path):
    manager = _manager(tmp_path, _model(), codec="lossless")
    manager.begin_round(1, "g1")
    _commit_with_weights(manager, 1.0, loss=0.1)
    manager.begin_round(2, "g2")
    _commit_with_weights(manager, 2.0, loss=0.5)
    restarted = _manager(tmp_path, _model(), codec="lossless")

    report = restarted.recover(model_version="g1")

    assert report.model_version == "g1"
    assert restarted.round == 1
    assert restarted.model[0].weight[0, 0].item() == 1.0


def test_recover_default_version_newest(tmp_path):
    manager = _manager(tmp_path, _model(), codec="lossless")
    manager.begin_round(1, "g1")
    _commit_with_weights(manager, 1.0, loss=0.1)
    manager.begin_round(2, "g2")
    _commit_with_weights(manager, 2.0, loss=0.5)
    restarted = _manager(tmp_path, _model(), codec="lossless")

    report = restarted.recover()

    assert report.model_version == "g2"


def test_recover_empty_store(tmp_path):
    manager = _manager(tmp_path, _model())

    with pytest.raises(NoValidCheckpointError, match="device-0"):
        manager.recover()


def test_recover_wrong_architecture(tmp_path):
    _manager(tmp_path, _model(), codec="lossless").checkpoint()
    restarted = _manager(tmp_path, nn.Linear(4, 1), codec="lossless")

    with pytest.raises(CheckpointError, match="does not fit the model"):
        restarted.recover()


def test_recover_times_reported(tmp_path):
    _manager(tmp_path, _model()).checkpoint()

    report = _manager(tmp_path, _model()).recover()

    assert report.load_seconds > 0.0
    assert report.decode_seconds > 0.0
    assert report.merge_seconds >= 0.0


# ---------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------


def test_sigterm_chains_previous_handler(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        manager = _manager(tmp_path, _model(), policy=_every(100))
        manager.step(0.5)
        with manager.failure_signals():
            signal.raise_signal(signal.SIGTERM)
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert calls == [signal.SIGTERM]
    assert manager.store.checkpoints()[-1].meta["checkpoint_reason"] == "signal SIGTERM"
    assert restored is not manager._on_signal


def test_sigterm_deferred_mid_step(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        manager = _manager(tmp_path, model, optimizer, policy=_every(100))
        with manager.failure_signals():
            loss = _train_step(model, optimizer)
            signal.raise_signal(signal.SIGTERM)  # weights updated, counters not yet
            deferred = len(manager.store.checkpoints())
            manager.step(loss)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert deferred == 0
    assert manager.store.checkpoints()[-1].meta["step"] == 1


def test_sigterm_mid_step_at_exit(tmp_path, caplog):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        manager = _manager(tmp_path, model, optimizer)
        with caplog.at_level(logging.ERROR, logger="cb_mobile.manager"), manager.failure_signals():
            _train_step(model, optimizer)
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert manager.store.checkpoints() == []
    assert any("mid-step" in record.message for record in caplog.records)


def test_signals_outside_main_thread(tmp_path, caplog):
    manager = _manager(tmp_path, _model())
    handlers = []

    def enter_context():
        with manager.failure_signals():
            handlers.append(signal.getsignal(signal.SIGTERM))

    with caplog.at_level(logging.WARNING, logger="cb_mobile.manager"):
        worker = threading.Thread(target=enter_context)
        worker.start()
        worker.join()

    assert handlers == [signal.getsignal(signal.SIGTERM)]
    assert any("main thread" in record.message for record in caplog.records)


def test_store_argument_conflict(tmp_path):
    store = CheckpointStore(tmp_path, device_id="phone-1", fsync=False)

    with pytest.raises(CheckpointError, match="phone-2"):
        CheckpointManager(store, _model(), device_id="phone-2")


SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from cb_mobile.manager import CheckpointManager
    from cb_mobile.interval import IntervalPolicy
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(sys.argv[1], model, optimizer,
                                policy=IntervalPolicy(min_steps=10_000, max_steps=10_000))
    with manager.failure_signals():
        for step in range(100_000):
            optimizer.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            manager.step(0.1)
            if step == 3:
                print("ready", flush=True)
            time.sleep(0.001)
    """
)


def test_sigterm_subprocess_checkpoints(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(tmp_path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()

    infos = CheckpointStore(tmp_path).checkpoints()
    assert code == 128 + signal.SIGTERM
    assert len(infos) == 1
    assert infos[0].meta["checkpoint_reason"] == "signal SIGTERM"
    assert infos[0].meta["step"] >= 4


def test_grid_reused_between_checkpoints(tmp_path):
    model = _model()
    with torch.no_grad():
        model[0].weight[:, 0], model[0].weight[:, 1] = -1.0, 1.0
    manager = _manager(tmp_path, model)
    manager.checkpoint()
    with torch.no_grad():
        model[0].weight[:, 2:].mul_(0.999)
    manager.checkpoint()
    store = manager.store
    first, second = (store.read(info.checkpoint_id)[0] for info in store.checkpoints())

    assert np.array_equal(second["model/0.weight"].buffers["scale"], first["model/0.weight"].buffers["scale"])


def test_grid_reused_codes_unchanged(tmp_path):
    model = _model()
    with torch.no_grad():
        model[0].weight[:, 0], model[0].weight[:, 1] = -1.0, 1.0
    manager = _manager(tmp_path, model)
    manager.checkpoint()
    with torch.no_grad():
        model[0].weight[:, 2:].mul_(0.999)
    manager.checkpoint()
    store = manager.store
    first, second = (store.read(info.checkpoint_id)[0] for info in store.checkpoints())
    moved = np.abs(second["model/0.weight"].buffers["codes"].astype(int) - first["model/0.weight"].buffers["codes"])

    assert moved.max() <= 1
