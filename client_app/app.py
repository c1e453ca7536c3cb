"""The Flower ClientApp: each node is one simulated handset or base station that may fail.

The train handler reads the node's shard and the global model from the message and
plays the round with :func:`client_app.device_run.run_round`. It keeps the node's memory
in ``context.state``. The reply carries the local state_dict and metrics, or an
``Error`` with code ``NODE_UNAVAILABLE`` when the device missed the round's deadline.

Files on disk: every run gets ``<store-root>/run-<run id>/``. A node's checkpoints live
in its own folder ``node-<partition id>/`` below it, so one node's chunk garbage
collection never races another node's commit in a parallel worker process. The price is
that identical chunks, such as those of the shared global model, are not deduplicated
across nodes. ``events.jsonl`` in the run folder gets one line per failure and per reply, which
`simulations.compare` reads. An empty ``store-root`` uses
``<system temp dir>/cb-mobile-stores``.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import ConsoleHandler

from cb_mobile.data import cached_dataset
from cb_mobile.models import build_model
from client_app.device_run import NodeMemory, RoundRequest, RoundSettings, run_round
from server_app.config import RunSettings

logger = logging.getLogger(__name__)

app = ClientApp()

STATE_KEY = "cb-mobile"
STATE_FIELD = "node-memory"
EVENTS_FILE = "events.jsonl"
DEFAULT_STORE_DIR = "cb-mobile-stores"


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the node's model for one round on its simulated device and reply."""
    _configure_logging()
    # A simulation runs several nodes in parallel worker processes, so each node's
    # tiny model trains on one intra-op thread instead of competing for every core.
    torch.set_num_threads(1)
    run_settings = RunSettings.from_run_config(context.run_config)
    _check_train_message(message)
    train_config = message.content["config"]
    settings = round_settings(run_settings, train_config, optimizer=str(context.run_config.get("optimizer", "adam")))

    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    dataset = cached_dataset(
        run_settings.data_dir or None,
        num_partitions,
        window=run_settings.window,
        target=run_settings.target,
        seed=run_settings.seed,
    )
    inputs, targets = dataset.partition(partition_id)

    server_round = int(train_config["server-round"])
    request = RoundRequest(
        server_round=server_round,
        model_version=str(train_config.get("model-version", f"r{server_round}")),
        global_state=message.content["arrays"].to_torch_state_dict(),
    )
    model_factory = functools.partial(
        build_model,
        run_settings.model,
        num_features=dataset.num_features,
        window=run_settings.window,
        hidden_size=run_settings.hidden_size,
    )

    run_dir = run_folder(run_settings.store_root, context.run_id)
    memory = load_memory(context)
    result = run_round(
        settings,
        request,
        inputs,
        targets,
        model_factory,
        node_id=partition_id,
        store_dir=run_dir / f"node-{partition_id}",
        memory=memory,
        events_path=run_dir / EVENTS_FILE,
    )
    save_memory(context, memory)

    if result.error is not None:
        return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=result.error), reply_to=message)
    content = RecordDict(
        {
            "arrays": ArrayRecord(result.state_dict),
            "metrics": MetricRecord(result.metrics),
        }
    )
    return Message(content, reply_to=message)


def _check_train_message(message: Message) -> None:
    content = message.content
    if not isinstance(content.get("arrays"), ArrayRecord):
        raise ValueError("train message has no ArrayRecord under 'arrays'; the server must send the global model there")
    config = content.get("config")
    if not isinstance(config, ConfigRecord) or "server-round" not in config:
        raise ValueError("train message has no ConfigRecord 'config' with 'server-round'; the server must send both")


def round_settings(run_settings: RunSettings, train_config: ConfigRecord, *, optimizer: str = "adam") -> RoundSettings:
    """Return the node's round settings; the server's train config wins over the run config.

    Parameters
    ----------
    run_settings : RunSettings
        The checked run config.
    train_config : ConfigRecord
        The train request's config; ``mode``, ``local-steps`` and ``round-deadline-s``
        override the run config when present.
    optimizer : str, default "adam"
        ``"adam"`` or ``"sgd"``.

    Returns
    -------
    RoundSettings
    """
    return RoundSettings(
        mode=str(train_config.get("mode", run_settings.mode)),
        seed=run_settings.seed,
        local_steps=int(train_config.get("local-steps", run_settings.local_steps)),
        batch_size=run_settings.batch_size,
        learning_rate=run_settings.learning_rate,
        optimizer=optimizer,
        handset_share=run_settings.handset_share,
        failure_scale=run_settings.failure_scale,
        codec=run_settings.codec,
        optimizer_codec=run_settings.optimizer_codec,
        merge_k=run_settings.merge_k,
        storage_cap_bytes=run_settings.storage_cap_bytes,
        round_deadline_s=float(train_config.get("round-deadline-s", run_settings.round_deadline_s)),
    )


def run_folder(store_root: str, run_id: int) -> Path:
    """Return the run's folder under ``store_root`` (see the module docstring)."""
    root = Path(store_root) if store_root else Path(tempfile.gettempdir()) / DEFAULT_STORE_DIR
    return root / f"run-{run_id}"


def load_memory(context: Context) -> NodeMemory:
    """Return the node's memory from ``context.state``, or a fresh one on the first contact."""
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ConfigRecord) or STATE_FIELD not in record:
        return NodeMemory()
    return NodeMemory.from_json(str(record[STATE_FIELD]))


def save_memory(context: Context, memory: NodeMemory) -> None:
    """Store the node's memory in ``context.state`` as a JSON string."""
    context.state[STATE_KEY] = ConfigRecord({STATE_FIELD: memory.to_json()})


def _configure_logging() -> None:
    # A simulation worker process has no handler for the project's loggers, and
    # Python drops their INFO records, so the failure and recovery lines get
    # Flower's console handler here, once per process.
    package_logger = logging.getLogger("client_app")
    if package_logger.handlers:
        return
    package_logger.setLevel(logging.INFO)
    package_logger.addHandler(ConsoleHandler(timestamps=False, json=False, colored=False))
    package_logger.propagate = False
