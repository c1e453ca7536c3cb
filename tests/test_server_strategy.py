"""Tests of the server strategy: weights, aggregation, sampling, the round loop and results."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server_app.results import RunRecorder, write_json_atomic
from server_app.strategy import CheckBulletFedAvg, aggregation_weight

pytestmark = pytest.mark.usefixtures("server_identity")

Handler = Callable[[int, int, Message], RecordDict | Error | None]


class InProcessGrid(Grid):
    """A Grid whose nodes are Python callables in this process.

    ``handler(node_id, server_round, message)`` returns the reply content, an
    Error, or None for a node that never replies.
    """

    def __init__(self, node_ids: Iterable[int], handler: Handler | None = None) -> None:
        self.node_ids = list(node_ids)
        self.handler = handler
        self.sent: list[Message] = []

    def set_run(self, run):  # pragma: no cover - not used by the strategy
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - not used by the strategy
        raise NotImplementedError

    def create_message(
        self, content, message_type, dst_node_id, group_id, ttl=None
    ):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - send_and_receive is used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            server_round = int(message.content["config"]["server-round"])
            outcome = self.handler(message.metadata.dst_node_id, server_round, message)
            if outcome is not None:
                replies.append(Message(outcome, reply_to=message))
        return replies


def model_arrays(scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "layer.weight": (rng.normal(size=(4, 3)) * scale).astype(np.float32),
        "layer.bias": (rng.normal(size=(3,)) * scale).astype(np.float32),
    }


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def decoded(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def test_weight_complete_reply(reply_metrics):
    assert aggregation_weight(reply_metrics(**{"num-examples": 80})) == 80.0


def test_weight_partial_stale_reply(reply_metrics):
    metrics = reply_metrics(**{"partial": 1, "steps-completed": 10, "staleness": 1})

    # 100 examples * 10/20 steps / (1 + 1 round stale)
    assert aggregation_weight(metrics) == pytest.approx(25.0)


def test_weight_recovered_fresh_reply(reply_metrics):
    metrics = reply_metrics(**{"recovered": 1, "steps-completed": 15, "staleness": 0})

    assert aggregation_weight(metrics) == pytest.approx(75.0)


def test_aggregate_matches_hand_average(train_reply, reply_metrics):
    base = model_arrays()
    updates = [model_arrays(scale) for scale in (1.1, 0.9, 1.3)]
    metrics = [
        reply_metrics(**{"num-examples": 100}),
        reply_metrics(**{"num-examples": 200, "partial": 1, "steps-completed": 10, "staleness": 1}),
        reply_metrics(**{"num-examples": 50, "recovered": 1}),
    ]
    replies = [
        train_reply(node, arrays, m) for node, (arrays, m) in enumerate(zip(updates, metrics), 1)
    ]
    strategy = CheckBulletFedAvg(as_record(base))

    arrays, aggregated_metrics = strategy.aggregate_train(1, replies)

    weights = np.array([100.0, 200.0 * 0.5 / 2.0, 50.0])
    for key in base:
        expected = sum(w * update[key] for w, update in zip(weights, updates)) / weights.sum()
        np.testing.assert_allclose(decoded(arrays)[key], expected, rtol=1e-6)
    assert decoded(arrays)["layer.weight"].dtype == np.float32
    assert aggregated_metrics["train-loss"] == pytest.approx(0.5)


def test_bad_replies_left_out_of_average(train_reply, error_reply, reply_metrics):
    base = model_arrays()
    good = [model_arrays(1.1), model_arrays(0.8)]
    poisoned = model_arrays()
    poisoned["layer.bias"][0] = np.nan
    replies = [
        train_reply(1, good[0]),
        train_reply(2, good[1], reply_metrics(**{"num-examples": 300})),
        train_reply(3, poisoned),
        error_reply(4, "battery-depleted at step 7"),
    ]
    strategy = CheckBulletFedAvg(as_record(base))

    arrays, _ = strategy.aggregate_train(1, replies)

    expected = (100 * good[0]["layer.weight"] + 300 * good[1]["layer.weight"]) / 400
    np.testing.assert_allclose(decoded(arrays)["layer.weight"], expected, rtol=1e-6)


def test_reply_log_lines(train_reply, error_reply, caplog):
    poisoned = model_arrays()
    poisoned["layer.weight"][0, 0] = np.inf
    replies = [
        train_reply(1, model_arrays()),
        train_reply(2, model_arrays()),
        train_reply(9, poisoned),
        error_reply(5, "connectivity-lost"),
    ]
    strategy = CheckBulletFedAvg(as_record(model_arrays()))

    with caplog.at_level(logging.INFO, logger="server_app"):
        strategy.aggregate_train(1, replies)

    assert "Received 4 replies: 2 valid, 1 rejected, 1 failures" in caplog.text
    assert (
        "Rejected reply from node 9 in round 1: array 'layer.weight' has 1 non-finite"
        in caplog.text
    )
    assert "Received error in reply from node 5: connectivity-lost" in caplog.text


def test_all_rejected_keeps_model(train_reply, error_reply, reply_metrics, caplog):
    huge = {key: value * 1e6 for key, value in model_arrays().items()}
    replies = [
        train_reply(1, huge),
        train_reply(2, model_arrays(), reply_metrics(**{"server-round": 7})),
        error_reply(3, "power-outage"),
    ]
    strategy = CheckBulletFedAvg(as_record(model_arrays()))

    with caplog.at_level(logging.INFO, logger="server_app"):
        result = strategy.aggregate_train(1, replies)

    assert result == (None, None)
    assert "global model stays as it was" in caplog.text


def test_no_replies_keeps_model():
    strategy = CheckBulletFedAvg(as_record(model_arrays()))

    assert strategy.aggregate_train(1, []) == (None, None)


def test_zero_step_partial_rejected(train_reply, reply_metrics, caplog):
    replies = [
        train_reply(1, model_arrays()),
        train_reply(
            2, model_arrays(), reply_metrics(**{"partial": 1, "steps-completed": 0, "staleness": 1})
        ),
    ]
    strategy = CheckBulletFedAvg(as_record(model_arrays()))

    with caplog.at_level(logging.INFO, logger="server_app"):
        arrays, _ = strategy.aggregate_train(2, replies)

    assert arrays is not None
    assert "node 2 in round 2: partial reply completed 0 of 20 steps" in caplog.text


def test_integer_buffer_keeps_dtype(train_reply):
    base = {**model_arrays(), "norm.num_batches_tracked": np.array(4, dtype=np.int64)}
    other = {**model_arrays(), "norm.num_batches_tracked": np.array(6, dtype=np.int64)}
    strategy = CheckBulletFedAvg(as_record(base))

    arrays, _ = strategy.aggregate_train(1, [train_reply(1, base), train_reply(2, other)])
    counter = decoded(arrays)["norm.num_batches_tracked"]

    assert counter.dtype == np.int64
    assert counter == 5


def test_configure_clamps_to_connected_nodes():
    grid = InProcessGrid([11])
    strategy = CheckBulletFedAvg(
        as_record(model_arrays()), min_train_nodes=3, min_available_nodes=3, node_wait_s=0.2
    )

    messages = list(
        strategy.configure_train(
            2, as_record(model_arrays()), ConfigRecord({"mode": "fedavg"}), grid
        )
    )

    assert [message.metadata.dst_node_id for message in messages] == [11]
    config = messages[0].content["config"]
    assert config["model-version"] == "r2"
    assert config["server-round"] == 2
    assert config["mode"] == "fedavg"
    assert (strategy.min_train_nodes, strategy.min_available_nodes) == (3, 3)


def test_configure_without_nodes_samples_none():
    strategy = CheckBulletFedAvg(as_record(model_arrays()), node_wait_s=0.1)

    messages = strategy.configure_train(
        1, as_record(model_arrays()), ConfigRecord(), InProcessGrid([])
    )

    assert list(messages) == []


def test_configure_samples_fraction():
    grid = InProcessGrid(range(1, 21))
    strategy = CheckBulletFedAvg(as_record(model_arrays()), fraction_train=0.25, min_train_nodes=2)

    messages = list(strategy.configure_train(1, as_record(model_arrays()), ConfigRecord(), grid))

    assert len(messages) == 5


def nudging_node(failing_round: int) -> Handler:
    """A node that moves every weight 10% toward zero, and misbehaves in one round.

    In ``failing_round`` even nodes reply with an error and odd nodes send NaN.
    Node 4 never replies in round 1, as if it missed the timeout.
    """

    def handle(node_id: int, server_round: int, message: Message) -> RecordDict | Error | None:
        if node_id == 4 and server_round == 1:
            return None
        if server_round == failing_round and node_id % 2 == 0:
            return Error(code=0, reason="battery-depleted")

        arrays = {
            key: value * np.float32(0.9)
            for key, value in decoded(message.content["arrays"]).items()
        }
        if server_round == failing_round:
            first_key = next(iter(arrays))
            arrays[first_key][...] = np.nan
        recovered = int(node_id == 3 and server_round == 3)
        metrics = {
            "num-examples": 10 * node_id,
            "steps-completed": 20,
            "steps-planned": 20,
            "steps-lost": 5 * recovered,
            "failed": recovered,
            "partial": 0,
            "recovered": recovered,
            "staleness": 0,
            "train-loss": 0.1 * node_id,
            "server-round": server_round,
            "failures": recovered,
            "recoveries": recovered,
            "recovery-time-s": 0.2 * recovered,
            "recompute-time-sim-s": 40.0 * recovered,
            "checkpoint-bytes-written": 100,
            "baseline-checkpoint-bytes": 400,
            "store-bytes": 50 * server_round,
            "checkpoint-time-s": 0.05,
            "train-time-s": 1.0,
            "device-clock-s": 60.0 * server_round + node_id,
        }
        return RecordDict({"arrays": as_record(arrays), "metrics": MetricRecord(metrics)})

    return handle


def test_round_loop_survives_failed_round(tmp_path):
    base = model_arrays()
    recorder = RunRecorder(
        tmp_path / "results.json", {"mode": "checkbullet", "num_rounds": 3, "seed": 0}
    )
    grid = InProcessGrid([1, 2, 3, 4], nudging_node(failing_round=2))
    strategy = CheckBulletFedAvg(
        as_record(base), fraction_train=1.0, node_wait_s=0.1, recorder=recorder
    )
    global_norms: dict[int, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        norm = float(np.linalg.norm(decoded(arrays)["layer.weight"]))
        global_norms[server_round] = norm
        recorder.record_evaluation(server_round, {"mse": norm, "mae": norm / 2})
        return MetricRecord({"mse": norm})

    strategy.start(grid=grid, initial_arrays=as_record(base), num_rounds=3, evaluate_fn=evaluate)
    results = recorder.to_dict()

    assert global_norms[1] == pytest.approx(0.9 * global_norms[0], rel=1e-5)
    assert global_norms[2] == pytest.approx(global_norms[1])
    assert global_norms[3] == pytest.approx(0.9 * global_norms[2], rel=1e-5)
    assert [r["failed"] for r in results["rounds"]] == [1, 2, 0]
    assert [r["rejected"] for r in results["rounds"]] == [0, 2, 0]
    assert [r["accepted"] for r in results["rounds"]] == [3, 0, 4]
    assert results["rounds"][2]["recovered"] == 1
    assert results["failures"] == 4
    assert results["median_recovery_time_s"] == pytest.approx(0.2)
    assert [r["simulated_time_s"] for r in results["rounds"]] == [63.0, 63.0, 184.0]
    assert results["final_test_mse"] == pytest.approx(global_norms[3])


def test_recorder_totals(tmp_path, reply_metrics):
    recorder = RunRecorder(tmp_path / "r.json", {"mode": "checkbullet", "num_rounds": 2, "seed": 1})
    recorder.record_sampling(1, sampled=3, connected=5)
    recorder.record_replies(
        1,
        [
            (1, reply_metrics(**{"recoveries": 2, "recovery-time-s": 1.0, "failures": 2})),
            (2, reply_metrics(**{"recoveries": 1, "recovery-time-s": 3.0, "failures": 1})),
        ],
        rejected=0,
        errors=1,
    )
    recorder.record_sampling(2, sampled=2, connected=5)
    recorder.record_replies(
        2, [(1, reply_metrics(**{"store-bytes": 900, "device-clock-s": 10.0}))], 0, 0
    )
    recorder.record_evaluation(2, {"mse": 0.4, "mae": 0.3, "mse/ElBorn": 0.5, "mae/ElBorn": 0.35})

    results = recorder.to_dict()

    assert results["failures"] == 3 + 1 + 1
    assert results["recoveries"] == 3
    # Per-recovery times 0.5 (1.0 over 2 recoveries) and 3.0.
    assert results["median_recovery_time_s"] == pytest.approx(1.75)
    assert results["storage_bytes"] == 3000
    assert results["baseline_storage_bytes"] == 12000
    assert results["storage_ratio"] == pytest.approx(0.25)
    assert results["store_bytes"] == 900 + 800
    assert results["checkpoint_overhead"] == pytest.approx(0.05)
    assert results["checkpoint_overhead_measured"] is None
    assert results["num_nodes"] == 5
    assert results["rounds"][1]["failed"] == 1
    assert results["rounds"][1]["simulated_time_s"] == 30.0
    assert results["final_test_by_site"] == {"ElBorn": {"mse": 0.5, "mae": 0.35}}


def test_results_file_complete(tmp_path, reply_metrics):
    path = tmp_path / "out" / "results.json"
    recorder = RunRecorder(path, {"mode": "fedavg", "num_rounds": 1, "seed": 3})
    recorder.record_sampling(1, 2, 2)
    recorder.record_replies(1, [(1, reply_metrics())], rejected=1, errors=0)
    recorder.record_evaluation(1, {"mse": float("nan"), "mae": 0.2})

    recorder.write()
    results = json.loads(path.read_text())

    expected = {
        "mode",
        "num_nodes",
        "num_rounds",
        "seed",
        "rounds",
        "failures",
        "recoveries",
        "median_recovery_time_s",
        "lost_steps",
        "storage_bytes",
        "baseline_storage_bytes",
        "checkpoint_overhead",
        "final_test_mse",
        "final_test_mae",
    }
    assert expected <= set(results)
    assert {
        "round",
        "sampled",
        "replied",
        "failed",
        "recovered",
        "lost_steps",
        "test_mse",
        "test_mae",
        "simulated_time_s",
    } <= set(results["rounds"][0])
    assert results["final_test_mse"] is None
    assert results["rounds"][0]["replied"] == 2


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})

    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})

    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})

    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_server_app_writes_results(tmp_path):
    from flwr.app import Context

    from server_app.app import main

    results_path = tmp_path / "results" / "run.json"
    run_config = {
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "model": "mlp",
        "hidden-size": 8,
        "results-path": str(results_path),
    }
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    grid = InProcessGrid([1, 2, 3], nudging_node(failing_round=2))

    main(grid, context)
    results = json.loads(results_path.read_text())

    assert results["complete"] is True
    assert results["mode"] == "checkbullet"
    assert [r["accepted"] for r in results["rounds"]] == [3, 0]
    assert results["final_test_mse"] == pytest.approx(results["rounds"][0]["test_mse"])
    assert set(results["final_test_by_site"]) == {"ElBorn", "LesCorts", "PobleSec"}
    assert grid.sent[0].content["config"]["model-version"] == "r1"


def test_local_superlink_stops_by_pid(tmp_path):
    import os
    import urllib.request

    from server_app.local_superlink import LocalSuperLink

    superlink = LocalSuperLink(tmp_path / "flwr-home")
    with superlink:
        pid = superlink.process.pid
        with urllib.request.urlopen(
            f"http://127.0.0.1:{superlink.port}/health", timeout=5
        ) as response:
            assert response.status == 200

    assert superlink.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_flwr_run_end_to_end(tmp_path, monkeypatch, repo_root):
    from server_app.local_superlink import run_flwr

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    results_path = tmp_path / "results.json"
    run_config = (
        f'num-server-rounds=2 local-steps=3 model="mlp" hidden-size=8 '
        f'store-root="{tmp_path / "stores"}" results-path="{results_path}"'
    )

    status = run_flwr(
        ["--run-config", run_config, "--federation-config", "num-supernodes=3"], app_dir=repo_root
    )
    results = json.loads(results_path.read_text())

    assert status == 0
    assert results["complete"] is True
    assert results["num_nodes"] == 3
    assert len(results["rounds"]) == 2
    assert results["final_test_mse"] is not None


@pytest.mark.slow
def test_flwr_run_reports_failed_run(tmp_path, monkeypatch, repo_root):
    from server_app.local_superlink import run_flwr

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))

    status = run_flwr(
        ["--run-config", 'data-dir="relative/traces"', "--federation-config", "num-supernodes=2"],
        app_dir=repo_root,
    )

    assert status == 1
