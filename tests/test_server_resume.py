"""Server checkpoints and resume: unit cases, and a run whose ServerApp process is SIGKILLed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from cb_mobile.codec import LosslessCodec
from cb_mobile.errors import CheckpointError, CorruptCheckpointError
from cb_mobile.state import restore_rng_state
from cb_mobile.store import CheckpointStore
from server_app.config import RunConfigError, RunSettings
from server_app.results import RunRecorder
from server_app.resume import (
    SERVER_DEVICE_ID,
    ResumedRounds,
    ServerCheckpointer,
    arrays_digest,
    restore_recorder,
    run_with_checkpoints,
    server_store_path,
)
from simulations.compare import format_run_config

RUN_CONFIG = {"seed": 7, "model": "lstm", "hidden-size": 8, "num-server-rounds": 4, "resume": False}


def _arrays(seed: int) -> ArrayRecord:
    generator = torch.Generator().manual_seed(seed)
    return ArrayRecord(
        {
            "lstm.weight": torch.randn(8, 3, generator=generator),
            "head.bias": torch.randn(1, generator=generator, dtype=torch.float64),
            "steps": torch.tensor(seed, dtype=torch.int64),
        }
    )


def _recorder(tmp_path: Path, rounds: int) -> RunRecorder:
    recorder = RunRecorder(tmp_path / "results.json", {"mode": "checkbullet"})
    recorder.record_evaluation(0, {"mse": 2.0, "mae": 1.0})
    for server_round in range(1, rounds + 1):
        recorder.record_sampling(server_round, 4, 4)
        metrics = {"train-loss": 0.5, "recoveries": 1, "recovery-time-s": 0.25, "store-bytes": 900}
        recorder.record_replies(server_round, [(11, metrics)], rejected=0, errors=1)
        recorder.record_evaluation(server_round, {"mse": 1.0 / server_round, "mae": 0.5})
    return recorder


def _save_rounds(checkpointer: ServerCheckpointer, tmp_path: Path, rounds: int) -> None:
    for server_round in range(1, rounds + 1):
        recorder = _recorder(tmp_path, server_round)
        checkpointer.save(checkpointer.capture(server_round, _arrays(server_round), recorder))


def test_round_trip_keeps_arrays_bit_exact(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False)
    _save_rounds(checkpointer, tmp_path, 2)

    state = checkpointer.load_latest()

    assert arrays_digest(state.arrays) == arrays_digest(_arrays(2))


def test_round_trip_keeps_round_and_results(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False)
    _save_rounds(checkpointer, tmp_path, 2)
    restored = RunRecorder(tmp_path / "restored.json", {"mode": "checkbullet"})

    state = checkpointer.load_latest()
    restore_recorder(restored, state.results)

    assert state.round == 2
    assert restored.to_dict() == _recorder(tmp_path, 2).to_dict()


def test_round_trip_restores_python_rng(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False)
    random.seed(3)
    checkpointer.save(checkpointer.capture(1, _arrays(1), _recorder(tmp_path, 1)))
    expected = [random.random() for _ in range(3)]

    random.seed(99)
    restore_rng_state(checkpointer.load_latest().rng)

    assert [random.random() for _ in range(3)] == expected


def test_meta_has_round_loss_version(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False)
    _save_rounds(checkpointer, tmp_path, 2)

    info = checkpointer.store.checkpoints()[-1]

    assert info.meta["round"] == 2
    assert info.loss == 0.5
    assert info.model_version == "r3"


def test_old_checkpoints_are_pruned(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, keep=2, fsync=False)
    _save_rounds(checkpointer, tmp_path, 4)

    rounds = [info.meta["round"] for info in checkpointer.store.checkpoints()]

    assert rounds == [3, 4]


def test_fingerprint_mismatch_names_the_key(tmp_path: Path):
    _save_rounds(ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False), tmp_path, 1)
    other = ServerCheckpointer(tmp_path / "store", {**RUN_CONFIG, "model": "gru"}, fsync=False)

    with pytest.raises(CheckpointError, match="model: checkpoint 'lstm', this run 'gru'"):
        other.load_latest()


def test_round_count_change_is_accepted(tmp_path: Path):
    _save_rounds(ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False), tmp_path, 1)
    longer = {**RUN_CONFIG, "num-server-rounds": 9, "resume": True}

    state = ServerCheckpointer(tmp_path / "store", longer, fsync=False).load_latest()

    assert state.round == 1


def test_empty_store_returns_none(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "missing", RUN_CONFIG, fsync=False)

    assert checkpointer.load_latest() is None


def test_damaged_latest_falls_back(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False)
    _save_rounds(checkpointer, tmp_path, 2)
    newest = Path(checkpointer.store.checkpoints()[-1].path)
    newest.write_bytes(newest.read_bytes()[:-40])

    state = checkpointer.load_latest()

    assert state.round == 1
    assert arrays_digest(state.arrays) == arrays_digest(_arrays(1))


def test_damaged_metadata_falls_back(tmp_path: Path):
    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False)
    _save_rounds(checkpointer, tmp_path, 1)
    foreign = {"weights": LosslessCodec().encode(torch.zeros(4))}
    checkpointer.store.commit(foreign, {"loss": None, "model_version": "r9"})

    assert checkpointer.load_latest().round == 1


class _FakeStrategy:
    """Records the round numbers each step gets; trains nothing."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def summary(self) -> None:
        pass

    def configure_train(self, server_round, arrays, config, grid):
        self.rounds.append(server_round)
        return []

    def aggregate_train(self, server_round, replies):
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def start(self, **kwargs):
        return ResumedRounds(self, 0).start(**kwargs)


class _FakeGrid:
    def send_and_receive(self, messages, timeout):
        return []


def _run(tmp_path: Path, strategy: _FakeStrategy, *, resume: bool, num_rounds: int = 4):
    recorder = RunRecorder(tmp_path / "results.json", {"mode": "checkbullet"})
    evaluated: list[int] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated.append(server_round)
        recorder.record_evaluation(server_round, {"mse": 0.1, "mae": 0.1})
        return MetricRecord({"mse": 0.1})

    checkpointer = ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False)
    first = run_with_checkpoints(
        strategy,
        grid=_FakeGrid(),
        initial_arrays=_arrays(0),
        num_rounds=num_rounds,
        timeout=1.0,
        train_config=None,
        evaluate_fn=evaluate,
        recorder=recorder,
        checkpointer=checkpointer,
        resume=resume,
    )
    return first, evaluated, recorder


def test_resume_uses_real_round_numbers(tmp_path: Path):
    _save_rounds(ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False), tmp_path, 2)
    strategy = _FakeStrategy()

    first, evaluated, recorder = _run(tmp_path, strategy, resume=True)

    assert first == 3
    assert strategy.rounds == [3, 4]
    assert evaluated == [3, 4]
    assert sorted(recorder.rounds) == [1, 2, 3, 4]
    assert recorder.header["resumed_from_round"] == 2


def test_resume_on_empty_store_starts_at_round_one(tmp_path: Path):
    strategy = _FakeStrategy()

    first, evaluated, _ = _run(tmp_path, strategy, resume=True, num_rounds=2)

    assert first == 1
    assert evaluated == [0, 1, 2]


def test_fresh_run_clears_earlier_checkpoints(tmp_path: Path):
    _save_rounds(ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False), tmp_path, 3)

    _run(tmp_path, _FakeStrategy(), resume=False, num_rounds=1)
    store = CheckpointStore(tmp_path / "store", device_id=SERVER_DEVICE_ID, create=False)

    assert [info.meta["round"] for info in store.checkpoints()] == [1]


def test_resume_of_finished_run_runs_nothing(tmp_path: Path):
    _save_rounds(ServerCheckpointer(tmp_path / "store", RUN_CONFIG, fsync=False), tmp_path, 4)
    strategy = _FakeStrategy()

    first, _, _ = _run(tmp_path, strategy, resume=True)

    assert first == 5
    assert strategy.rounds == []


def test_resume_key_takes_a_boolean():
    assert RunSettings.from_run_config({"resume": True}).resume is True


def test_resume_key_rejects_an_integer():
    with pytest.raises(RunConfigError, match="resume=1 is not a boolean"):
        RunSettings.from_run_config({"resume": 1})


def test_relative_server_store_is_rejected():
    with pytest.raises(RunConfigError, match="server-store"):
        RunSettings.from_run_config({"server-store": "server-store"})


def test_default_server_store_named_after_results(tmp_path: Path):
    settings = RunSettings(results_path=str(tmp_path / "out" / "run.json"))

    assert server_store_path(settings) == tmp_path / "out" / "run.server-store"


def test_default_server_store_differs_per_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("CB_MOBILE_BASE_DIR", str(tmp_path))

    checkbullet = server_store_path(RunSettings(mode="checkbullet"))
    fedavg = server_store_path(RunSettings(mode="fedavg"))

    assert checkbullet == tmp_path / "results" / "checkbullet-seed42.server-store"
    assert fedavg != checkbullet


def test_recorder_state_dict_round_trip(tmp_path: Path):
    original = _recorder(tmp_path, 3)
    restored = RunRecorder(tmp_path / "restored.json", {"mode": "checkbullet"})

    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))

    assert restored.to_dict() == original.to_dict()


def test_recorder_load_state_dict_rejects_missing_field(tmp_path: Path):
    state = _recorder(tmp_path, 1).state_dict()
    del state["sums"]
    recorder = RunRecorder(tmp_path / "restored.json", {"mode": "checkbullet"})

    with pytest.raises(ValueError, match="sums"):
        recorder.load_state_dict(state)

    assert recorder.rounds == {}


def test_restore_recorder_reports_corrupt_results(tmp_path: Path):
    state = _recorder(tmp_path, 1).state_dict()
    state["rounds"][0]["unknown_field"] = 1
    recorder = RunRecorder(tmp_path / "restored.json", {"mode": "checkbullet"})

    with pytest.raises(CorruptCheckpointError, match="resume=false"):
        restore_recorder(recorder, state)


# End to end: a real run on a local SuperLink, its ServerApp process SIGKILLed.

NUM_SUPERNODES = 4
NUM_ROUNDS = 4
SERVER_PROCESS_NAMES = ("flwr-simulation", "flwr-serverapp")


def _children_table() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        parent = int(text[text.rfind(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def _descendants(root_pid: int) -> list[int]:
    children = _children_table()
    found, pending = [], list(children.get(root_pid, []))
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _server_app_pid(superlink_pid: int) -> int | None:
    for pid in _descendants(superlink_pid):
        if any(name in _command_line(pid) for name in SERVER_PROCESS_NAMES):
            return pid
    return None


def _checkpoint_rounds(store_root: Path) -> list[tuple[int, int]]:
    if not (store_root / "devices" / SERVER_DEVICE_ID / "manifests").is_dir():
        return []
    store = CheckpointStore(store_root, device_id=SERVER_DEVICE_ID, create=False, fsync=False)
    return [(info.seq, info.meta["round"]) for info in store.checkpoints()]


def _flwr_run(repo_root: Path, env: dict[str, str], run_config: dict[str, object], output: Path):
    command = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(repo_root),
        "--stream",
        "--run-config",
        format_run_config(run_config),
        "--federation-config",
        f"num-supernodes={NUM_SUPERNODES}",
    ]
    with open(output, "wb") as handle:
        return subprocess.Popen(
            command, env=env, cwd=repo_root, stdout=handle, stderr=subprocess.STDOUT
        )


def _wait_for_round(store_root: Path, server_round: int, process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(done >= server_round for _, done in _checkpoint_rounds(store_root)):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no server checkpoint of round {server_round} appeared")
        time.sleep(0.05)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_killed_server_resumes_at_next_round(local_superlink, repo_root: Path, tmp_path: Path):
    results_path = tmp_path / "results.json"
    server_store = tmp_path / "server-store"
    run_config = {
        "num-server-rounds": NUM_ROUNDS,
        "fraction-train": 1.0,
        "min-train-nodes": NUM_SUPERNODES,
        "local-steps": 30,
        "hidden-size": 8,
        "failure-scale": 0.0,
        "results-path": str(results_path),
        "store-root": str(tmp_path / "stores"),
        "server-store": str(server_store),
    }
    env = {**os.environ, **local_superlink.env()}
    started: list[int] = []
    try:
        killed_run = _flwr_run(repo_root, env, run_config, tmp_path / "killed.log")
        _wait_for_round(server_store, 2, killed_run, timeout_s=120)
        server_pid = _server_app_pid(local_superlink.process.pid)
        assert server_pid is not None
        started.extend(_descendants(local_superlink.process.pid))
        os.kill(server_pid, signal.SIGKILL)
        at_kill = _checkpoint_rounds(server_store)
        _stop(killed_run)

        killed_results = json.loads(results_path.read_text())
        resumed_run = _flwr_run(
            repo_root, env, {**run_config, "resume": True}, tmp_path / "resumed.log"
        )
        resumed_run.wait(timeout=180)
    finally:
        for pid in started:
            if pid != local_superlink.process.pid and Path(f"/proc/{pid}").exists():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    results = json.loads(results_path.read_text())
    log = (tmp_path / "resumed.log").read_text(errors="replace")
    last_seq, last_round = at_kill[-1]
    store = CheckpointStore(server_store, device_id=SERVER_DEVICE_ID, create=False)
    resumed_rounds = [
        info.meta["round"] for info in store.checkpoints() if info.seq > last_seq
    ]
    checkpointed = ServerCheckpointer(server_store, {}, fsync=False)

    assert last_round == 2
    assert killed_results["complete"] is False
    assert results["complete"] is True
    assert [record["round"] for record in results["rounds"]] == [1, 2, 3, 4]
    assert results["resumed_from_round"] == 2
    assert resumed_rounds == [3, 4]
    assert results["rounds"][1] == killed_results["rounds"][1]
    assert "Resuming from server checkpoint" in log
    assert _digest_of_round(checkpointed, 2) in log


def _digest_of_round(checkpointer: ServerCheckpointer, server_round: int) -> str:
    for info in checkpointer.store.checkpoints():
        if info.meta["round"] == server_round:
            return arrays_digest(checkpointer.read(info.checkpoint_id).arrays)
    raise AssertionError(f"no checkpoint of round {server_round} is left in the store")
