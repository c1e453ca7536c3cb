"""Tests for flattening a TrainingState into named tensors and JSON metadata."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from cb_mobile.errors import CheckpointError, CorruptCheckpointError
from cb_mobile.state import (
    TrainingState,
    capture_rng_state,
    flatten_state,
    restore_rng_state,
    tensor_role,
    unflatten_state,
)


def _trained_model_and_adam() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _json_round_trip(meta: dict) -> dict:
    return json.loads(json.dumps(meta, allow_nan=False))


def _full_state() -> TrainingState:
    model, optimizer = _trained_model_and_adam()
    return TrainingState(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        step=3,
        epoch=1,
        data_position=17,
        loss=0.25,
        round=2,
        model_version="r2",
        rng=capture_rng_state(),
        extra={"note": "edge", "values": [1, 2.5]},
    )


def test_flatten_tensor_names():
    tensors, _ = flatten_state(_full_state())

    assert "model/0.weight" in tensors
    assert "model/1.num_batches_tracked" in tensors
    assert "optim/state/0/exp_avg" in tensors
    assert "optim/state/0/exp_avg_sq" in tensors
    assert "optim/state/0/step" in tensors
    assert "rng/torch" in tensors
    assert "rng/numpy" in tensors
    assert "rng/python" in tensors


def test_flatten_meta_is_strict_json():
    _, meta = flatten_state(_full_state())

    text = json.dumps(meta, allow_nan=False)

    assert json.loads(text)["loss"] == 0.25
    assert meta["model_version"] == "r2"


def test_round_trip_model_exact():
    state = _full_state()
    tensors, meta = flatten_state(state)

    restored = unflatten_state(tensors, _json_round_trip(meta))

    assert list(restored.model) == list(state.model)
    for key, value in state.model.items():
        assert torch.equal(restored.model[key], value), key


def test_round_trip_optimizer_exact():
    state = _full_state()
    tensors, meta = flatten_state(state)

    restored = unflatten_state(tensors, _json_round_trip(meta))

    assert restored.optimizer["param_groups"] == state.optimizer["param_groups"]
    assert isinstance(restored.optimizer["param_groups"][0]["betas"], tuple)
    assert set(restored.optimizer["state"]) == set(state.optimizer["state"])
    for index, buffers in state.optimizer["state"].items():
        for name, value in buffers.items():
            assert torch.equal(restored.optimizer["state"][index][name], value), (index, name)


def test_round_trip_counters():
    tensors, meta = flatten_state(_full_state())

    restored = unflatten_state(tensors, _json_round_trip(meta))

    assert (restored.step, restored.epoch, restored.data_position, restored.round) == (3, 1, 17, 2)
    assert restored.loss == 0.25
    assert restored.model_version == "r2"
    assert restored.extra == {"note": "edge", "values": [1, 2.5]}


def test_restored_optimizer_loads():
    state = _full_state()
    tensors, meta = flatten_state(state)
    restored = unflatten_state(tensors, _json_round_trip(meta))
    model, _ = _trained_model_and_adam()
    optimizer = torch.optim.Adam(model.parameters())

    optimizer.load_state_dict(restored.optimizer)

    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_sgd_momentum_round_trip():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = TrainingState(model=model.state_dict(), optimizer=optimizer.state_dict())
    tensors, meta = flatten_state(state)

    restored = unflatten_state(tensors, _json_round_trip(meta))

    expected = state.optimizer["state"][0]["momentum_buffer"]
    assert "optim/state/0/momentum_buffer" in tensors
    assert torch.equal(restored.optimizer["state"][0]["momentum_buffer"], expected)


def test_nonfinite_loss_round_trip():
    state = TrainingState(model={"w": torch.ones(2)}, optimizer=None, loss=math.nan)
    tensors, meta = flatten_state(state)

    restored = unflatten_state(tensors, _json_round_trip(meta))

    assert meta["loss"] is None
    assert math.isnan(restored.loss)


def test_global_rng_round_trip():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.standard_normal()  # leaves a cached gaussian in the legacy state
    saved = capture_rng_state()
    tensors, meta = flatten_state(TrainingState(model={}, optimizer=None, rng=saved))
    expected = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))

    restore_rng_state(unflatten_state(tensors, _json_round_trip(meta)).rng)

    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert random.random() == expected[2]
    assert random.gauss(0, 1) == expected[3]


def test_generator_round_trip():
    torch_generator = torch.Generator().manual_seed(7)
    numpy_generator = np.random.default_rng(7)
    generators = {"shuffle": torch_generator, "noise": numpy_generator}
    saved = capture_rng_state(generators)
    tensors, meta = flatten_state(TrainingState(model={}, optimizer=None, rng=saved))
    expected_torch = torch.randperm(10, generator=torch_generator)
    expected_numpy = numpy_generator.integers(0, 1000, 5)

    restore_rng_state(unflatten_state(tensors, _json_round_trip(meta)).rng, generators)

    assert "rng/generator/shuffle" in tensors
    assert torch.equal(torch.randperm(10, generator=torch_generator), expected_torch)
    assert np.array_equal(numpy_generator.integers(0, 1000, 5), expected_numpy)


def test_restore_unknown_generator():
    saved = capture_rng_state({"a": torch.Generator()})

    with pytest.raises(CheckpointError, match="'b'"):
        restore_rng_state(saved, {"b": torch.Generator()})


def test_missing_tensor_named():
    tensors, meta = flatten_state(_full_state())
    del tensors["optim/state/1/exp_avg"]

    with pytest.raises(CorruptCheckpointError, match="optim/state/1/exp_avg"):
        unflatten_state(tensors, meta)


def test_unexpected_tensor_named():
    tensors, meta = flatten_state(_full_state())
    tensors["model/stray"] = torch.zeros(1)

    with pytest.raises(CorruptCheckpointError, match="model/stray"):
        unflatten_state(tensors, meta)


def test_missing_meta_key_named():
    tensors, meta = flatten_state(_full_state())
    del meta["data_position"]

    with pytest.raises(CorruptCheckpointError, match="data_position"):
        unflatten_state(tensors, meta)


def test_wrong_meta_type_named():
    tensors, meta = flatten_state(_full_state())
    meta["step"] = "3"

    with pytest.raises(CorruptCheckpointError, match="'step'"):
        unflatten_state(tensors, meta)


def test_wrong_format_rejected():
    tensors, meta = flatten_state(_full_state())
    meta["format"] = "other"

    with pytest.raises(CorruptCheckpointError, match="format"):
        unflatten_state(tensors, meta)


def test_rng_tensor_dtype_checked():
    tensors, meta = flatten_state(_full_state())
    tensors["rng/torch"] = tensors["rng/torch"].to(torch.float32)

    with pytest.raises(CorruptCheckpointError, match="rng/torch"):
        unflatten_state(tensors, meta)


def test_rng_python_length_checked():
    tensors, meta = flatten_state(_full_state())
    tensors["rng/python"] = tensors["rng/python"][:10]

    with pytest.raises(CorruptCheckpointError, match="rng/python"):
        unflatten_state(tensors, meta)


def test_non_tensor_decoded_value_rejected():
    tensors, meta = flatten_state(_full_state())
    tensors["model/0.bias"] = [0.0, 0.0, 0.0]

    with pytest.raises(CorruptCheckpointError, match="model/0.bias"):
        unflatten_state(tensors, meta)


def test_extra_not_json_rejected():
    state = TrainingState(model={}, optimizer=None, extra={"bad": object()})

    with pytest.raises(CheckpointError, match="extra"):
        flatten_state(state)


def test_negative_counter_rejected():
    state = TrainingState(model={}, optimizer=None, step=-1)

    with pytest.raises(CheckpointError, match="step"):
        flatten_state(state)


def test_unstorable_value_rejected():
    state = TrainingState(model={"w": torch.ones(1)}, optimizer={"state": {0: {"f": object()}}, "param_groups": []})

    with pytest.raises(CheckpointError, match="optim/state/0/f"):
        flatten_state(state)


@pytest.mark.parametrize(
    ("name", "tensor", "role"),
    [
        ("model/fc.weight", torch.zeros(2, 2), "model"),
        ("model/bn.num_batches_tracked", torch.tensor(3), "exact"),
        ("optim/state/0/exp_avg", torch.zeros(2), "optimizer"),
        ("optim/state/0/step", torch.tensor(5.0), "exact"),
        ("optim/param_groups/0/lr", torch.tensor(0.1), "exact"),
        ("rng/torch", torch.zeros(4, dtype=torch.uint8), "exact"),
        ("rng/python", torch.zeros(4, dtype=torch.int64), "exact"),
    ],
)
def test_tensor_role_table(name, tensor, role):
    assert tensor_role(name, tensor) == role
