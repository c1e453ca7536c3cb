"""Tests of train reply validation and run config checks on the server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from server_app.config import RunConfigError, RunSettings
from server_app.validation import (
    ARRAY_HEADER_BYTES,
    InvalidReplyError,
    array_specs,
    check_train_reply,
    find_norm_outliers,
)

pytestmark = pytest.mark.usefixtures("server_identity")


def global_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "lstm.weight": rng.normal(size=(8, 4)).astype(np.float32),
        "head.bias": rng.normal(size=(3,)).astype(np.float32),
    }


@pytest.fixture
def specs():
    record = ArrayRecord({key: Array(value) for key, value in global_arrays().items()})
    return array_specs(record)


def rejection(reply, specs, server_round: int = 1) -> str:
    with pytest.raises(InvalidReplyError) as info:
        check_train_reply(reply, specs, server_round)
    return str(info.value)


def test_valid_reply_passes(train_reply, specs):
    checked = check_train_reply(train_reply(3, global_arrays()), specs, 1)

    assert checked.node_id == 3
    assert set(checked.arrays) == {"lstm.weight", "head.bias"}
    assert checked.metrics["num-examples"] == 100


def test_missing_array_rejected(train_reply, specs):
    arrays = global_arrays()
    del arrays["head.bias"]

    assert "missing arrays ['head.bias']" in rejection(train_reply(1, arrays), specs)


def test_extra_array_rejected(train_reply, specs):
    arrays = {**global_arrays(), "extra.weight": np.zeros(2, np.float32)}

    assert "unexpected arrays ['extra.weight']" in rejection(train_reply(1, arrays), specs)


def test_wrong_shape_rejected(train_reply, specs):
    arrays = {**global_arrays(), "head.bias": np.zeros(2, np.float32)}

    assert "'head.bias' has shape (2,), expected (3,)" in rejection(train_reply(1, arrays), specs)


def test_wrong_dtype_rejected(train_reply, specs):
    arrays = {**global_arrays(), "head.bias": np.zeros(3, np.float64)}

    reason = rejection(train_reply(1, arrays), specs)

    assert "'head.bias'" in reason
    assert "expected float32" in reason


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_array_rejected(train_reply, specs, bad_value):
    arrays = global_arrays()
    arrays["lstm.weight"][2, 1] = bad_value

    assert "'lstm.weight' has 1 non-finite values" in rejection(train_reply(1, arrays), specs)


def test_oversized_payload_rejected(train_reply, specs):
    # Declared shape and dtype match, but the payload is a much larger array.
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((8, 4 + ARRAY_HEADER_BYTES), np.float32), allow_pickle=False)
    oversized = Array(dtype="float32", shape=(8, 4), stype="numpy.ndarray", data=buffer.getvalue())
    record = ArrayRecord(
        {"lstm.weight": oversized, "head.bias": Array(global_arrays()["head.bias"])}
    )

    assert "more than the limit" in rejection(train_reply(1, record), specs)


def test_lying_metadata_rejected(train_reply, specs):
    # The Array claims shape (3,) but its .npy data contains 2 values.
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(2, np.float32), allow_pickle=False)
    lying = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=buffer.getvalue())
    record = ArrayRecord({"lstm.weight": Array(global_arrays()["lstm.weight"]), "head.bias": lying})

    assert "'head.bias' decodes to float32[2]" in rejection(train_reply(1, record), specs)


def test_undecodable_payload_rejected(train_reply, specs):
    garbage = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x00" * 12)
    record = ArrayRecord(
        {"lstm.weight": Array(global_arrays()["lstm.weight"]), "head.bias": garbage}
    )

    assert "does not decode" in rejection(train_reply(1, record), specs)


def test_future_round_rejected(train_reply, reply_metrics, specs):
    reply = train_reply(1, global_arrays(), reply_metrics(**{"server-round": 4}))

    assert "server-round 4, newer than the current round 3" in rejection(
        reply, specs, server_round=3
    )


def test_missing_metrics_rejected(train_reply, reply_metrics, specs):
    metrics = reply_metrics()
    del metrics["train-loss"]
    del metrics["staleness"]

    reason = rejection(train_reply(1, global_arrays(), metrics), specs)

    assert "missing metrics ['staleness', 'train-loss']" in reason


@pytest.mark.parametrize("key", ["failed", "steps-lost", "failures", "recoveries", "store-bytes", "device-clock-s"])
def test_result_metric_required(key, train_reply, reply_metrics, specs):
    metrics = reply_metrics()
    del metrics[key]

    assert f"missing metrics ['{key}']" in rejection(train_reply(1, global_arrays(), metrics), specs)


def test_measured_times_optional(train_reply, reply_metrics, specs):
    metrics = reply_metrics()

    assert "checkpoint-time-measured-s" not in metrics
    assert check_train_reply(train_reply(1, global_arrays(), metrics), specs, 1).node_id == 1


def test_no_array_record_rejected(train_reply, specs):
    reply = train_reply(1, global_arrays())
    del reply.content["arrays"]

    assert "no ArrayRecord under 'arrays'" in rejection(reply, specs)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train-loss", float("nan"), "'train-loss' is nan"),
        ("num-examples", 0, "'num-examples' is 0"),
        ("partial", 2, "'partial' is 2, expected 0 or 1"),
        ("staleness", -1, "'staleness' is -1, expected a count"),
        ("steps-completed", 25, "more than steps-planned=20"),
        ("staleness", 5, "more than the 2 rounds"),
        ("device-clock-s", -3.0, "'device-clock-s' is -3.0"),
    ],
)
def test_insane_metric_rejected(train_reply, reply_metrics, specs, key, value, expected):
    reply = train_reply(1, global_arrays(), reply_metrics(**{key: value}))

    assert expected in rejection(reply, specs, server_round=2)


def test_huge_norm_flagged(train_reply, specs):
    base = global_arrays()
    honest = [check_train_reply(train_reply(node, base), specs, 1) for node in (1, 2)]
    huge = {**base, "head.bias": base["head.bias"] * 1e4}
    wild = check_train_reply(train_reply(9, huge), specs, 1)

    outliers = find_norm_outliers([*honest, wild], base)

    assert list(outliers) == [2]
    assert "'head.bias' has L2 norm" in outliers[2]


def test_huge_norm_flagged_among_two(train_reply, specs):
    # With two replies the median alone would sit halfway to the wild one;
    # the global model's norm in the median keeps it anchored.
    base = global_arrays()
    honest = check_train_reply(train_reply(1, base), specs, 1)
    wild = check_train_reply(
        train_reply(2, {**base, "lstm.weight": base["lstm.weight"] * 1e3}), specs, 1
    )

    assert list(find_norm_outliers([honest, wild], base)) == [1]


def test_moderate_norm_accepted(train_reply, specs):
    base = global_arrays()
    grown = {key: value * 5 for key, value in base.items()}
    replies = [
        check_train_reply(train_reply(node, arrays), specs, 1)
        for node, arrays in ((1, base), (2, grown))
    ]

    assert find_norm_outliers(replies, base) == {}


def test_near_zero_median_uses_floor(train_reply, specs):
    # A zero global array and small honest updates must not be rejected.
    zero = {key: np.zeros_like(value) for key, value in global_arrays().items()}
    small = {key: np.full_like(value, 1e-3) for key, value in zero.items()}
    replies = [check_train_reply(train_reply(node, small), specs, 1) for node in (1, 2)]

    assert find_norm_outliers(replies, zero) == {}


def test_run_config_defaults_match_pyproject(repo_root):
    import tomllib

    with open(repo_root / "pyproject.toml", "rb") as handle:
        run_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]

    assert RunSettings.from_run_config(run_config) == RunSettings()
    assert set(run_config) == set(RunSettings().to_run_config())


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("data-dir", "data/lte", "relative path"),
        ("results-path", "out.json", "relative path"),
        ("store-root", "runs/store", "relative path"),
        ("mode", "fedprox", "one of checkbullet, fedavg, full-checkpoint"),
        ("fraction-train", 0.0, "a fraction in (0, 1]"),
        ("num-server-rounds", 2.5, "not an integer"),
        ("learning-rate", "fast", "not a finite number"),
        ("data-dir", "/nonexistent/cb-mobile-data", "not a directory"),
    ],
)
def test_run_config_rejects(key, value, expected):
    with pytest.raises(RunConfigError) as info:
        RunSettings.from_run_config({key: value})

    assert expected in str(info.value)
    assert key in str(info.value)


def test_default_results_path_uses_base_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CB_MOBILE_BASE_DIR", str(tmp_path))

    path = RunSettings.from_run_config({"mode": "fedavg", "seed": 7}).resolved_results_path()

    assert path == tmp_path / "results" / "fedavg-seed7.json"


def test_huge_norm_flagged_when_alone(train_reply, specs):
    base = global_arrays()
    wild = check_train_reply(
        train_reply(4, {key: value * 1e6 for key, value in base.items()}), specs, 1
    )

    assert list(find_norm_outliers([wild], base)) == [0]
