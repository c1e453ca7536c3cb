"""Traffic forecasters: LSTM, GRU and MLP models that map ``[B, window, F]`` inputs to ``[B]``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = ("lstm", "gru", "mlp")


def _check_input(x: torch.Tensor, window: int | None, num_features: int, model: str) -> None:
    if x.dim() != 3 or x.shape[2] != num_features or (window is not None and x.shape[1] != window):
        expected = f"[B, {window if window is not None else 'window'}, {num_features}]"
        raise ValueError(f"{model} input has shape {tuple(x.shape)}, expected {expected}")


class RecurrentForecaster(nn.Module):
    """A stacked LSTM or GRU whose last hidden state feeds a linear head.

    Parameters
    ----------
    cell : {"lstm", "gru"}
        Recurrent cell type.
    num_features : int
        Input features per time step.
    hidden_size : int, default 32
        Hidden units per layer.
    num_layers : int, default 2
        Stacked recurrent layers.
    dropout : float, default 0.0
        Dropout between recurrent layers (ignored with one layer).
    """

    def __init__(
        self,
        cell: str,
        num_features: int,
        hidden_size: int = 32,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        recurrent_types: dict[str, type[nn.LSTM] | type[nn.GRU]] = {"lstm": nn.LSTM, "gru": nn.GRU}
        self.cell = cell
        self.num_features = num_features
        self.rnn = recurrent_types[cell](
            input_size=num_features,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast one value per sequence of ``x`` ``[B, window, F]``; return ``[B]``."""
        _check_input(x, None, self.num_features, self.cell)
        outputs, _ = self.rnn(x)
        return self.head(outputs[:, -1, :]).squeeze(-1)


class MLPForecaster(nn.Module):
    """A multilayer perceptron on the flattened window.

    Parameters
    ----------
    num_features : int
        Input features per time step.
    window : int
        Input time steps.
    hidden_size : int, default 32
        Units per hidden layer.
    num_layers : int, default 2
        Hidden layers, each Linear then ReLU.
    dropout : float, default 0.0
        Dropout after each hidden layer.
    """

    def __init__(
        self,
        num_features: int,
        window: int,
        hidden_size: int = 32,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.window = window

        layers: list[nn.Module] = []
        width = num_features * window
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
            width = hidden_size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forecast one value per window of ``x`` ``[B, window, F]``; return ``[B]``."""
        _check_input(x, self.window, self.num_features, "mlp")
        return self.net(x.flatten(start_dim=1)).squeeze(-1)


def build_model(
    name: str = "lstm",
    *,
    num_features: int,
    window: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    dropout: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """Build a forecaster by name.

    Parameters
    ----------
    name : {"lstm", "gru", "mlp"}, default "lstm"
        Model family; case-insensitive.
    num_features : int
        Input features per time step.
    window : int
        Input time steps.
    hidden_size : int, default 32
        Hidden units per layer.
    num_layers : int, default 2
        Recurrent or hidden layers.
    dropout : float, default 0.0
        Dropout probability between layers.
    seed : int or None, default None
        When given, the initial weights depend only on this seed; the global torch RNG
        is left as it was. When None, initialization draws from the global torch RNG.

    Returns
    -------
    torch.nn.Module
        A float32 CPU model whose ``forward(x [B, window, F])`` returns ``[B]``.

    Raises
    ------
    ValueError
        If ``name`` is unknown or a size is not positive.
    """
    key = name.strip().lower()
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    for label, value in (("num_features", num_features), ("window", window), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if value < 1:
            raise ValueError(f"{label}={value} is invalid; it must be at least 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} is invalid; it must be in [0, 1)")

    def construct() -> nn.Module:
        if key == "mlp":
            return MLPForecaster(num_features, window, hidden_size, num_layers, dropout)
        return RecurrentForecaster(key, num_features, hidden_size, num_layers, dropout)

    return _with_seed(construct, seed)


def _with_seed(construct: Callable[[], nn.Module], seed: int | None) -> nn.Module:
    if seed is None:
        return construct()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return construct()
