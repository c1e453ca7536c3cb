"""Tests of the LSTM, GRU and MLP forecasters."""

from __future__ import annotations

import pytest
import torch

from cb_mobile.data import TrafficDataset
from cb_mobile.models import MODEL_NAMES, build_model

FEATURES = 11
WINDOW = 12


@pytest.fixture(autouse=True)
def single_thread():
    """Run torch on one thread: small models train many times faster than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_output_shape(name):
    model = build_model(name, num_features=FEATURES, window=WINDOW)

    output = model(torch.randn(5, WINDOW, FEATURES))

    assert output.shape == (5,)
    assert output.dtype == torch.float32


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_rejects_wrong_features(name):
    model = build_model(name, num_features=FEATURES, window=WINDOW)

    with pytest.raises(ValueError, match=r"expected \[B, .*11\]"):
        model(torch.randn(5, WINDOW, FEATURES + 1))


def test_mlp_rejects_wrong_window():
    model = build_model("mlp", num_features=FEATURES, window=WINDOW)

    with pytest.raises(ValueError, match=r"expected \[B, 12, 11\]"):
        model(torch.randn(5, WINDOW + 1, FEATURES))


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'transformer'.*'lstm', 'gru', 'mlp'"):
        build_model("transformer", num_features=FEATURES, window=WINDOW)


def test_model_name_case_insensitive():
    model = build_model("GRU", num_features=FEATURES, window=WINDOW)

    assert isinstance(model.rnn, torch.nn.GRU)


def test_model_invalid_size():
    with pytest.raises(ValueError, match="hidden_size=0"):
        build_model("lstm", num_features=FEATURES, window=WINDOW, hidden_size=0)


def test_default_model_is_small_lstm():
    model = build_model(num_features=FEATURES, window=WINDOW)

    assert isinstance(model.rnn, torch.nn.LSTM)
    assert model.rnn.hidden_size == 32
    assert model.rnn.num_layers == 2


def test_seeded_build_is_reproducible():
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    first = build_model("lstm", num_features=FEATURES, window=WINDOW, seed=3)
    second = build_model("lstm", num_features=FEATURES, window=WINDOW, seed=3)

    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[key])
    assert torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_learns_partition(name):
    dataset = TrafficDataset(num_partitions=10, window=WINDOW)
    inputs, targets = dataset.partition(9)
    model = build_model(name, num_features=dataset.num_features, window=WINDOW, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)

    def loss_on_all() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(inputs), targets))

    before = loss_on_all()
    for _ in range(60):
        batch = torch.randint(0, len(targets), (64,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        loss.backward()
        optimizer.step()

    assert loss_on_all() < 0.5 * before
