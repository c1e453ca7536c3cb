"""The Flower ClientApp: each node is one simulated handset or base station that may fail.

The train handler reads the node's shard and the global model from the message and
plays the round with :func:`client_app.device_run.run_round`. It keeps the node's memory
in ``context.state`` and in ``node-memory.json`` in the node's store folder. The file is
written atomically at round start, with the round marked as in progress, and again at
round end without the mark. A SuperNode process that was killed and restarted has an
empty ``context.state``, so the node reads the file instead. A round still marked as in
progress there becomes a pending recovery, which the node reports from its checkpoints
at this contact. The reply carries the local state_dict and metrics, or an
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
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import ConsoleHandler

from cb_mobile.data import cached_dataset
from cb_mobile.models import build_model
from client_app.checkpointing import FULL_CHECKPOINT_SUFFIX
from client_app.device_run import NodeMemory, PendingRecovery, RoundInProgress, RoundRequest, RoundSettings, run_round
from server_app.config import RunSettings

logger = logging.getLogger(__name__)

app = ClientApp()

STATE_KEY = "cb-mobile"
STATE_FIELD = "node-memory"
EVENTS_FILE = "events.jsonl"
DEFAULT_STORE_DIR = "cb-mobile-stores"
MEMORY_FILE = "node-memory.json"
MEMORY_FILE_FORMAT = "cb_mobile.node_memory_file"
MEMORY_FILE_VERSION = 1


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
    store_dir = run_dir / f"node-{partition_id}"
    memory_path = store_dir / MEMORY_FILE
    memory = load_memory(context, memory_path, run_id=context.run_id, node_id=partition_id)

    memory.in_progress = RoundInProgress(
        server_round=server_round,
        model_version=request.model_version,
        steps_planned=settings.local_steps,
        started_unix_s=time.time(),
    )
    save_memory(context, memory, memory_path, run_id=context.run_id, node_id=partition_id)
    result = run_round(
        settings,
        request,
        inputs,
        targets,
        model_factory,
        node_id=partition_id,
        store_dir=store_dir,
        memory=memory,
        events_path=run_dir / EVENTS_FILE,
    )
    memory.in_progress = None
    save_memory(context, memory, memory_path, run_id=context.run_id, node_id=partition_id)

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
        prior_mtbf_s=run_settings.prior_mtbf_s,
    )


def run_folder(store_root: str, run_id: int) -> Path:
    """Return the run's folder under ``store_root`` (see the module docstring)."""
    root = Path(store_root) if store_root else Path(tempfile.gettempdir()) / DEFAULT_STORE_DIR
    return root / f"run-{run_id}"


def load_memory(
    context: Context, memory_path: Path | None = None, *, run_id: int = 0, node_id: int = 0
) -> NodeMemory:
    """Return the node's memory from ``context.state``, else from its memory file, else a fresh one.

    Parameters
    ----------
    context : Context
        The node's Flower context; its ``state`` wins when it contains the memory.
    memory_path : Path or None, default None
        The node's ``node-memory.json``, read when ``context.state`` is empty, as after
        a SuperNode restart. None reads only ``context.state``.
    run_id, node_id : int, default 0
        The run and partition the file must belong to.

    Returns
    -------
    NodeMemory
        A memory read from the file that still has a round in progress comes back
        with that round as a pending recovery (see :func:`resume_interrupted_round`).
    """
    record = context.state.get(STATE_KEY)
    if isinstance(record, ConfigRecord) and STATE_FIELD in record:
        return NodeMemory.from_json(str(record[STATE_FIELD]))
    if memory_path is None:
        return NodeMemory(up_since_unix_s=time.time())

    memory = read_memory_file(memory_path, run_id=run_id, node_id=node_id)
    if memory is None:
        return NodeMemory(up_since_unix_s=time.time())
    if memory.in_progress is not None:
        resume_interrupted_round(memory, node_id=node_id, died_after_unix_s=_newest_mtime(memory_path.parent))
    return memory


def save_memory(
    context: Context, memory: NodeMemory, memory_path: Path | None = None, *, run_id: int = 0, node_id: int = 0
) -> None:
    """Store the node's memory in ``context.state`` and, when given, in its memory file.

    A failed file write is logged and the round goes on, because ``context.state``
    still holds the memory while the process lives.
    """
    context.state[STATE_KEY] = ConfigRecord({STATE_FIELD: memory.to_json()})
    if memory_path is None:
        return
    try:
        write_memory_file(memory_path, memory, run_id=run_id, node_id=node_id)
    except OSError as error:
        logger.error(
            "Node %d could not write its memory file %s (%s); a restart of its process would "
            "train from the global model instead of its checkpoints. Free space or fix the "
            "permissions of store-root",
            node_id, memory_path, error,
        )


def write_memory_file(path: Path, memory: NodeMemory, *, run_id: int, node_id: int) -> None:
    """Write the node memory to ``path`` atomically: temporary file, fsync, rename, fsync of the folder.

    Raises
    ------
    OSError
        When the folder cannot be created or the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "format": MEMORY_FILE_FORMAT,
        "version": MEMORY_FILE_VERSION,
        "run_id": run_id,
        "node_id": node_id,
        "memory": json.loads(memory.to_json()),
    }
    text = json.dumps(document, allow_nan=False) + "\n"
    temp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise

    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_memory_file(path: Path, *, run_id: int, node_id: int) -> NodeMemory | None:
    """Return the node memory stored in ``path``, or None when there is none to use.

    A missing file returns None. An unreadable, corrupt or foreign file (another
    format, run or node) is logged with its path and returns None too, so the node
    starts fresh instead of failing.
    """
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != MEMORY_FILE_FORMAT:
            raise ValueError(f"it is not a {MEMORY_FILE_FORMAT!r} file")
        if data.get("version") != MEMORY_FILE_VERSION:
            raise ValueError(f"its version is {data.get('version')!r}, expected {MEMORY_FILE_VERSION}")
        if data.get("run_id") != run_id or data.get("node_id") != node_id:
            raise ValueError(
                f"it belongs to run {data.get('run_id')!r} node {data.get('node_id')!r}, not run {run_id} node {node_id}"
            )
        return NodeMemory.from_json(json.dumps(data["memory"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        logger.error(
            "Node %d ignores its memory file %s and starts with a fresh memory: %s. "
            "Its checkpoints stay on disk; delete the file to silence this message",
            node_id, path, error,
        )
        return None


def resume_interrupted_round(memory: NodeMemory, *, node_id: int, died_after_unix_s: float | None = None) -> None:
    """Turn the round a killed process left in progress into a pending recovery.

    The uptime before the restart is added to ``memory.observed_uptimes_s``, so the
    interval policy counts the restart as a failure. An older pending recovery stays,
    because that round's state has not been reported yet and the interrupted round
    never trained past it.

    Parameters
    ----------
    memory : NodeMemory
        Memory read from the node's file, with ``in_progress`` set; updated in place.
    node_id : int
        The node's partition id, for the log.
    died_after_unix_s : float or None, default None
        A time the process was still alive, such as the newest file it wrote. The
        round's start time is used when it is None or earlier.
    """
    interrupted = memory.in_progress
    assert interrupted is not None
    memory.in_progress = None
    now = time.time()

    alive_until = max(interrupted.started_unix_s, died_after_unix_s or 0.0)
    up_since = memory.up_since_unix_s if memory.up_since_unix_s is not None else interrupted.started_unix_s
    uptime_s = max(alive_until - up_since, 0.0)
    memory.observed_uptimes_s.append(uptime_s)
    memory.up_since_unix_s = now

    if memory.pending is not None:
        logger.warning(
            "Node %d restarted during round %d; it reports round %d's stored state first (up %.0f s before the restart)",
            node_id, interrupted.server_round, memory.pending.server_round, uptime_s,
        )
        return

    # NOTE: the killed process's last step is not on disk, so steps lost after its
    # newest checkpoint are not counted: failed_step 0 counts none.
    memory.pending = PendingRecovery(
        server_round=interrupted.server_round,
        model_version=interrupted.model_version,
        failed_step=0,
        steps_planned=interrupted.steps_planned,
        cause="node process restarted",
    )
    logger.warning(
        "Node %d restarted during round %d (model version %r, up %.0f s before the restart); "
        "it reports that round's stored state at this contact",
        node_id, interrupted.server_round, interrupted.model_version, uptime_s,
    )


def _newest_mtime(store_dir: Path) -> float | None:
    """Return the newest modification time of a checkpoint in ``store_dir``, or None."""
    paths = [*store_dir.glob("devices/*/manifests/*"), *store_dir.glob(f"*{FULL_CHECKPOINT_SUFFIX}")]
    times = []
    for path in paths:
        try:
            times.append(path.stat().st_mtime)
        except FileNotFoundError:
            continue  # evicted or replaced while being listed
    return max(times, default=None)


def _configure_logging() -> None:
    # A simulation worker process has no handler for the project's loggers, so
    # they get Flower's console handler here, once per process. client_app logs
    # each failure and recovery at INFO. cb_mobile logs every commit and eviction
    # at INFO, too many lines for hundreds of nodes, so only its warnings (skipped
    # checkpoints, damaged files, write errors) reach the run's log.
    for name, level in (("client_app", logging.INFO), ("cb_mobile", logging.WARNING)):
        package_logger = logging.getLogger(name)
        if package_logger.handlers:
            continue
        package_logger.setLevel(level)
        package_logger.addHandler(ConsoleHandler(timestamps=False, json=False, colored=False))
        package_logger.propagate = False
