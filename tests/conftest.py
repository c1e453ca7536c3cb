"""Shared pytest fixtures: Flower environment, the LTE traces, Flower messages, a SuperLink."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Set before any test module imports flwr, and inherited by every `flwr run` or
# SuperLink a test starts: no telemetry, no update check, no `uv sync` per run.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
os.environ.update(FLWR_ENV)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """Run every test's torch work on one intra-op thread.

    The tests train tiny models on a machine whose cores other jobs share; there two
    threads make a small LSTM step several times slower than one.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Root folder of the repository."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def lte_data_dir() -> Path:
    """Folder of the Barcelona LTE traces beside the repository; skips when absent."""
    path = (REPO_ROOT.parent / "shared" / "data" / "barcelona-lte").resolve()
    if not path.is_dir():
        pytest.skip(f"LTE traces not found at {path}")
    return path


@pytest.fixture
def server_identity() -> Iterator[None]:
    """Give this process the task identity a ServerApp process has, so Messages can be built."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def complete_metrics(**overrides: float) -> dict[str, float]:
    """Metrics of a complete, fresh round-1 train reply, with ``overrides`` applied."""
    metrics: dict[str, float] = {
        "num-examples": 100,
        "steps-completed": 20,
        "steps-planned": 20,
        "steps-lost": 0,
        "failed": 0,
        "recovered": 0,
        "partial": 0,
        "staleness": 0,
        "train-loss": 0.5,
        "recovery-time-s": 0.0,
        "recompute-time-sim-s": 0.0,
        "checkpoint-bytes-written": 1000,
        "baseline-checkpoint-bytes": 4000,
        "store-bytes": 800,
        "checkpoint-time-s": 0.1,
        "train-time-s": 2.0,
        "device-clock-s": 30.0,
        "server-round": 1,
        "failures": 0,
        "recoveries": 0,
    }
    metrics.update(overrides)
    return metrics


@pytest.fixture
def reply_metrics() -> Callable[..., dict[str, float]]:
    """Factory of train reply metrics; see `complete_metrics`."""
    return complete_metrics


@pytest.fixture
def train_reply(server_identity: None) -> Callable[..., object]:
    """Factory of real Flower train replies from a node, as a ClientApp sends them."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    def build(
        node_id: int,
        arrays: Mapping[str, np.ndarray] | ArrayRecord,
        metrics: Mapping[str, float] | None = None,
    ) -> Message:
        instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
        record = (
            arrays
            if isinstance(arrays, ArrayRecord)
            else ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
        )
        content = RecordDict(
            {"arrays": record, "metrics": MetricRecord(dict(metrics or complete_metrics()))}
        )
        return Message(content, reply_to=instruction)

    return build


@pytest.fixture
def error_reply(server_identity: None) -> Callable[[int, str], object]:
    """Factory of Flower error replies, as a failed node sends them."""
    from flwr.app import Error, Message, MessageType, RecordDict

    def build(node_id: int, reason: str) -> Message:
        instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
        return Message(Error(code=0, reason=reason), reply_to=instruction)

    return build


@pytest.fixture
def local_superlink(tmp_path: Path) -> Iterator[object]:
    """A simulation SuperLink on free ports with its own FLWR_HOME, stopped after the test.

    Run ``flwr run`` with ``env={**os.environ, **local_superlink.env()}`` to use it.
    """
    from server_app.local_superlink import LocalSuperLink

    with LocalSuperLink(tmp_path / "flwr-home") as superlink:
        yield superlink
