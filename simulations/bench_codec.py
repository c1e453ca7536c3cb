"""Checkpoint benchmark: cb_mobile checkpoints against torch.save and torch.load on the same disk.

The benchmark trains the traffic-forecasting LSTM on one site's traces and takes a
checkpoint every few steps through :class:`CheckpointManager`. In the same run it
writes ``torch.save`` files of the same fp32 state to the same directory, so every
figure is a ratio of two measurements taken side by side:

- storage of the whole checkpoint series against the sum of the ``torch.save`` files;
- encode throughput (snapshot, encode and durable commit) against ``torch.save`` with
  and without fsync;
- decode throughput (read, verify and decode) against ``torch.load(weights_only=True)``,
  cold (both sides' files evicted from the page cache with ``posix_fadvise``, as after
  the reboot or power loss that precedes a recovery) and warm;
- the empirical entropy of the int8 code deltas between consecutive checkpoints, the
  bound on what any order-0 coder of those deltas can store them in;
- the test MSE of training resumed from a quantized checkpoint against the
  uninterrupted run.

The throughput figures are repeated for a large state (a stack of Linear layers of
about 100 MB by default). Run it from the repository root::

    python -m simulations.bench_codec --json results/bench_codec.json
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import logging
import math
import os
import platform
import pstats
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lz4.frame
import numpy as np
import torch
from torch import nn

from cb_mobile.codec import EncodedTensor, codec_from_config, decode_tensors, get_codec
from cb_mobile.data import SITES, TrafficDataset
from cb_mobile.errors import CheckpointError
from cb_mobile.interval import IntervalPolicy
from cb_mobile.manager import CheckpointManager
from cb_mobile.models import build_model
from cb_mobile.state import (
    TrainingState,
    capture_rng_state,
    flatten_state,
    unflatten_state,
)
from cb_mobile.store import CheckpointStore, CommitResult

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "barcelona-lte"
MB = 1_000_000
DEVICE_ID = "bench"

# Interval, in steps, that the policy never reaches: the benchmark calls
# CheckpointManager.checkpoint() itself so that every checkpoint is timed alone.
NEVER_STEPS = 2**31

STORAGE_TARGET = 10.0
THROUGHPUT_TARGET = 1.0
RESUME_MSE_TARGET = 0.01

# The LSTM's tensors are tiny: torch runs its ops faster on one thread, and on a shared
# 2-core machine two threads spend most of a step waiting for each other.
LSTM_THREADS = 1

BIG_LAYERS = 6
BIG_WARMUP_STEPS = 3
BIG_LEARNING_RATE = 1e-3
BIG_BATCH_SIZE = 32


# ---------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class BenchOptions:
    """Settings of one benchmark run; see :func:`parse_args` for each option."""

    steps: int = 300
    interval: int = 5
    codec: str = "int8"
    data_dir: str = ""
    site: str = "PobleSec"
    json_path: str | None = None
    big_mb: float = 100.0
    repeats: int = 5
    seed: int = 0
    workdir: str | None = None
    window: int = 12
    hidden_size: int = 32
    batch_size: int = 32
    learning_rate: float = 0.005
    profile: bool = False


def default_data_dir() -> str:
    """Return the trace folder beside the repository, or "" (synthetic) when it is absent."""
    if DEFAULT_DATA_DIR.is_dir():
        return str(DEFAULT_DATA_DIR)
    return ""


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of the benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench_codec",
        description=(
            "Measure cb_mobile checkpoints against torch.save/torch.load of the same "
            "fp32 state on the same disk: storage of a checkpoint series, encode and "
            "decode throughput, and the test MSE of training resumed from a quantized "
            "checkpoint."
        ),
    )
    series = parser.add_argument_group("checkpoint series")
    series.add_argument("--steps", type=int, default=300, help="training steps of the LSTM run (default 300)")
    series.add_argument("--interval", type=int, default=5, help="steps between two checkpoints (default 5)")
    series.add_argument(
        "--codec", default="int8", help="codec of the model weights: int8, int4, fp16 or lossless (default int8)"
    )
    series.add_argument(
        "--seed", type=int, default=0, help="seed of model init, batches and the large state (default 0)"
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=None,
        help=(
            "folder with SITE.csv and SITE_test.csv traces; default: ../shared/data/barcelona-lte "
            "beside the repository when it exists; an empty string selects synthetic traces"
        ),
    )
    data.add_argument(
        "--site", default="PobleSec", help=f"site to train on, one of {', '.join(SITES)} (default PobleSec)"
    )

    model = parser.add_argument_group("LSTM training")
    model.add_argument("--batch-size", type=int, default=32, help="LSTM batch size (default 32)")
    model.add_argument(
        "--learning-rate", type=float, default=0.005, help="Adam learning rate of the LSTM (default 0.005)"
    )
    model.add_argument("--hidden-size", type=int, default=32, help="LSTM hidden size (default 32)")
    model.add_argument("--window", type=int, default=12, help="input window in time steps (default 12)")

    throughput = parser.add_argument_group("throughput")
    throughput.add_argument(
        "--big-mb",
        type=float,
        default=100.0,
        help="size in MB (10^6 bytes) of the large fp32 state for the throughput figures; 0 skips it (default 100)",
    )
    throughput.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="repetitions of each throughput measurement; the median is reported (default 5)",
    )
    throughput.add_argument(
        "--profile",
        action="store_true",
        help="run cProfile over one large-state checkpoint and one decode, and print the top functions",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", dest="json_path", default=None, help="write every figure and detail to this JSON file"
    )
    output.add_argument(
        "--workdir",
        default=None,
        help=(
            "folder for stores and torch.save files; a fresh subfolder is made and kept; "
            "default: a temporary folder that is removed"
        ),
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    """Parse and validate the command line into :class:`BenchOptions`."""
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.steps < 2:
        parser.error(f"--steps must be at least 2 to checkpoint halfway, got {args.steps}")
    if not 1 <= args.interval <= args.steps:
        parser.error(f"--interval must be between 1 and --steps ({args.steps}), got {args.interval}")
    if args.big_mb < 0:
        parser.error(f"--big-mb must be 0 (skip) or a positive size in MB, got {args.big_mb}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    try:
        get_codec(args.codec)
    except (CheckpointError, ValueError) as error:
        parser.error(f"--codec {args.codec!r} is invalid: {error}")
    if args.site not in SITES:
        parser.error(f"--site must be one of {', '.join(SITES)}, got {args.site!r}")
    if args.batch_size < 1 or args.hidden_size < 1 or args.window < 1:
        parser.error("--batch-size, --hidden-size and --window must be positive")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        parser.error(f"--learning-rate must be a positive number, got {args.learning_rate}")

    data_dir = default_data_dir() if args.data_dir is None else args.data_dir
    if data_dir and not Path(data_dir).is_dir():
        parser.error(f"--data-dir {data_dir!r} is not a folder; pass an existing folder or '' for synthetic traces")

    return BenchOptions(
        steps=args.steps,
        interval=args.interval,
        codec=args.codec,
        data_dir=data_dir,
        site=args.site,
        json_path=args.json_path,
        big_mb=args.big_mb,
        repeats=args.repeats,
        seed=args.seed,
        workdir=args.workdir,
        window=args.window,
        hidden_size=args.hidden_size,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        profile=args.profile,
    )


# ---------------------------------------------------------------------------
# Measuring helpers


def tensor_bytes(obj: Any) -> int:
    """Return the bytes of every tensor inside ``obj`` (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def directory_bytes(path: Path) -> int:
    """Return the sum of the file sizes (st_size) under ``path``."""
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def fsync_directory(path: Path) -> None:
    """Flush the directory entry of ``path`` so that a new file name survives a crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_torch(obj: Any, path: Path, *, durable: bool) -> float:
    """Write ``obj`` with torch.save and return the seconds it took.

    Parameters
    ----------
    obj : Any
        A state_dict or a dict of state_dicts.
    path : pathlib.Path
        Destination file.
    durable : bool
        When True the timed part includes fsync of the file and of its directory, the
        same guarantee the checkpoint store gives. When False the file is fsynced after
        the clock stops, so that its dirty pages do not slow the next timed write.

    Returns
    -------
    float
        Seconds spent in the timed part.
    """
    start = time.perf_counter()
    with open(path, "wb") as file:
        torch.save(obj, file)
        if durable:
            file.flush()
            os.fsync(file.fileno())
    if durable:
        fsync_directory(path.parent)
    seconds = time.perf_counter() - start

    if not durable:
        with open(path, "rb+") as file:
            os.fsync(file.fileno())
    return seconds


def load_torch(path: Path) -> tuple[float, dict[str, Any]]:
    """Read ``path`` with torch.load(weights_only=True) and return (seconds, object)."""
    start = time.perf_counter()
    loaded = torch.load(path, weights_only=True)
    return time.perf_counter() - start, loaded


def open_manager(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    codec: str,
    optimizer_codec: str = "lossless",
) -> CheckpointManager:
    """Open a manager on an uncapped store whose policy never checkpoints by itself."""
    store = CheckpointStore(root, device_id=DEVICE_ID)
    policy = IntervalPolicy(min_steps=NEVER_STEPS, max_steps=NEVER_STEPS)
    return CheckpointManager(
        store,
        model,
        optimizer,
        codec=codec,
        optimizer_codec=optimizer_codec,
        policy=policy,
        device_id=DEVICE_ID,
    )


def timed_checkpoint(manager: CheckpointManager) -> tuple[float, CommitResult]:
    """Take one checkpoint and return (seconds, result); raise when it was not committed."""
    start = time.perf_counter()
    result = manager.checkpoint(reason="benchmark")
    seconds = time.perf_counter() - start

    if not result.committed:
        raise RuntimeError(f"checkpoint was not committed on an uncapped store: {result.reason}")
    return seconds, result


def read_and_decode(root: Path) -> tuple[float, TrainingState]:
    """Open the store at ``root`` as a restarted process would, read, verify and decode its newest checkpoint.

    Returns
    -------
    tuple of (float, TrainingState)
        Seconds from opening the store to the rebuilt state, and the state.
    """
    start = time.perf_counter()
    store = CheckpointStore(root, device_id=DEVICE_ID)
    newest = store.checkpoints()[-1]
    encoded, meta = store.read(newest.checkpoint_id)
    state = unflatten_state(decode_tensors(encoded), meta)
    return time.perf_counter() - start, state


def evict_from_page_cache(path: Path) -> None:
    """Drop the cached pages of ``path``, or of every file under it, as a reboot or power loss would.

    The files must have been fsynced: ``POSIX_FADV_DONTNEED`` drops clean pages only.
    """
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
    for item in files:
        descriptor = os.open(item, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def code_delta_entropy(root: Path) -> dict[str, float]:
    """Measure the empirical entropy of the code deltas between consecutive checkpoints of a store.

    For each model tensor stored with a one-byte-per-code codec, the delta is the new
    codes minus the previous checkpoint's codes, mod 256. Its order-0 empirical entropy,
    in bits per code, times the number of codes, is what any compressor of the deltas
    that treats codes as independent symbols needs at least.

    Returns
    -------
    dict
        ``bits_per_code`` (averaged over all codes of all pairs), ``bound_bytes_per_checkpoint``
        and ``zero_share`` (share of codes that did not move).
    """
    store = CheckpointStore(root, device_id=DEVICE_ID, create=False)
    previous: dict[str, np.ndarray] | None = None
    bits = codes_total = zeros = 0.0
    pairs = 0
    for info in store.checkpoints():
        encoded, _ = store.read(info.checkpoint_id)
        current = {
            name: item.buffers["codes"]
            for name, item in encoded.items()
            if name.startswith("model/") and item.codec.get("id") == "int8"
        }
        if previous is not None:
            pairs += 1
            for name, codes in current.items():
                if name not in previous or previous[name].shape != codes.shape:
                    continue
                delta = np.subtract(codes, previous[name])
                counts = np.bincount(delta, minlength=256).astype(np.float64)
                probabilities = counts[counts > 0] / delta.size
                bits += float(-(probabilities * np.log2(probabilities)).sum()) * delta.size
                codes_total += delta.size
                zeros += float(counts[0])
        previous = current
    if not codes_total:
        return {"bits_per_code": float("nan"), "bound_bytes_per_checkpoint": float("nan"), "zero_share": float("nan")}
    return {
        "bits_per_code": bits / codes_total,
        "bound_bytes_per_checkpoint": bits / 8 / pairs,
        "zero_share": zeros / codes_total,
    }


def max_relative_error(decoded: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """Return max over tensors of max|decoded - reference| / max|reference|.

    Raises
    ------
    RuntimeError
        When the decoded state_dict is missing a key or a tensor has another shape.
    """
    missing = sorted(set(reference) - set(decoded))
    if missing:
        raise RuntimeError(f"decoded state_dict is missing keys {missing[:5]}")

    worst = 0.0
    for name, expected in reference.items():
        actual = decoded[name]
        if tuple(actual.shape) != tuple(expected.shape):
            raise RuntimeError(f"decoded {name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        if not expected.is_floating_point():
            continue
        scale = float(expected.abs().max().clamp_min(1e-30))
        error = float((actual.float() - expected.float()).abs().max())
        worst = max(worst, error / scale)
    return worst


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``."""
    return float(statistics.median(values))


def throughput(nbytes: int, seconds: float) -> float:
    """Return MB (10^6 bytes) per second."""
    return nbytes / MB / max(seconds, 1e-9)


# ---------------------------------------------------------------------------
# Traffic forecasting task


@dataclass(frozen=True)
class TraceTask:
    """Training and test windows of one site, scaled as cb_mobile.data scales them."""

    source: str
    site: str
    window: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        """Number of input features per time step."""
        return int(self.x_train.shape[-1])


def load_task(options: BenchOptions) -> TraceTask:
    """Load the train and test windows of ``options.site`` (synthetic traces when no data dir is set)."""
    dataset = TrafficDataset(
        options.data_dir or None,
        num_partitions=len(SITES),
        window=options.window,
        target="down",
        seed=options.seed,
    )

    # With one partition per site every site's train series is a single shard.
    partition_id = next(
        (pid for pid in range(len(SITES)) if dataset.shard(pid).site == options.site),
        None,
    )
    if partition_id is None:
        shards = [dataset.shard(pid) for pid in range(len(SITES))]
        raise ValueError(f"site {options.site!r} not found in any partition; shards: {shards}")

    x_train, y_train = dataset.partition(partition_id)
    x_test, y_test = dataset.test_sets()[options.site]
    source = options.data_dir or "synthetic"
    logger.info(
        "Loaded site %s from %s: %d train windows, %d test windows, %d features",
        options.site,
        source,
        len(y_train),
        len(y_test),
        x_train.shape[-1],
    )
    return TraceTask(source, options.site, options.window, x_train, y_train, x_test, y_test)


def build_lstm(task: TraceTask, options: BenchOptions, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Build the LSTM forecaster with weights from ``seed`` and its Adam optimizer."""
    torch.manual_seed(seed)
    model = build_model("lstm", num_features=task.num_features, window=task.window, hidden_size=options.hidden_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    return model, optimizer


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> torch.Tensor:
    """Return the batch of ``step``; it depends on (seed, step) only, so a resumed run draws the same batches."""
    generator = np.random.default_rng([seed, step])
    return torch.from_numpy(generator.integers(0, num_examples, size=batch_size))


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: TraceTask, step: int, options: BenchOptions
) -> float:
    """Run one Adam step on the batch of ``step`` and return its training loss."""
    index = batch_indices(options.seed, step, len(task.y_train), options.batch_size)

    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(task.x_train[index]), task.y_train[index])
    loss.backward()
    optimizer.step()
    return float(loss.item())


def test_mse(model: nn.Module, task: TraceTask) -> float:
    """Return the MSE of ``model`` on the site's scaled test windows."""
    model.eval()
    with torch.no_grad():
        predictions = model(task.x_test)
    model.train()
    return float(nn.functional.mse_loss(predictions, task.y_test))


# ---------------------------------------------------------------------------
# LSTM checkpoint series and resume


@dataclass
class SeriesConfig:
    """One checkpoint configuration of the series and its torch.save baseline."""

    name: str
    label: str
    root: Path
    manager: CheckpointManager
    includes_optimizer: bool
    seconds: list[float] = field(default_factory=list)
    bytes_written: int = 0
    error: str | None = None


@dataclass
class SeriesResult:
    """Measurements of the LSTM checkpoint series and the reference run."""

    checkpoints: int
    model_bytes: int
    full_bytes: int
    configs: dict[str, dict[str, Any]]
    torch_bytes: dict[str, int]
    torch_save_fsync_seconds: dict[str, list[float]]
    torch_save_seconds: dict[str, list[float]]
    torch_load_seconds: dict[str, list[float]]
    decode_seconds: dict[str, list[float]]
    torch_load_cold_seconds: dict[str, list[float]]
    decode_cold_seconds: dict[str, list[float]]
    reference_mse: float
    reference_mse_half: float
    reference_state: dict[str, torch.Tensor]
    train_seconds: float


def series_configs(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, codec: str) -> list[SeriesConfig]:
    """Open one store per checkpoint configuration of the series."""
    configs = [
        SeriesConfig(
            "model",
            f"model ({codec})",
            root / "store-model",
            open_manager(root / "store-model", model, None, codec=codec),
            includes_optimizer=False,
        ),
        SeriesConfig(
            "full-lossless",
            f"model ({codec}) + Adam (lossless)",
            root / "store-full-lossless",
            open_manager(root / "store-full-lossless", model, optimizer, codec=codec, optimizer_codec="lossless"),
            includes_optimizer=True,
        ),
    ]

    try:
        manager = open_manager(root / "store-full-int8", model, optimizer, codec=codec, optimizer_codec="int8")
    except (CheckpointError, ValueError) as error:
        logger.warning("optimizer_codec='int8' is not supported, skipping that configuration: %s", error)
    else:
        configs.append(
            SeriesConfig(
                "full-int8",
                f"model ({codec}) + Adam (int8)",
                root / "store-full-int8",
                manager,
                includes_optimizer=True,
            )
        )
    return configs


def checkpoint_series_step(
    configs: list[SeriesConfig],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    root: Path,
    step: int,
    result: dict[str, Any],
) -> None:
    """Take one checkpoint per configuration and the matching torch.save files at ``step``."""
    for config in configs:
        if config.error is not None:
            continue
        try:
            seconds, commit = timed_checkpoint(config.manager)
        except (CheckpointError, ValueError, TypeError, RuntimeError) as error:
            if config.name != "full-int8":
                raise
            config.error = f"{type(error).__name__}: {error}"
            logger.warning("configuration %s failed at step %d and is dropped: %s", config.name, step, config.error)
            continue
        config.seconds.append(seconds)
        config.bytes_written += commit.bytes_written

    baselines = {
        "model": model.state_dict(),
        "full": {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
    }
    for name, obj in baselines.items():
        durable_path = root / "torch-save" / f"{name}-{step:06d}.pt"
        result["torch_save_fsync_seconds"][name].append(save_torch(obj, durable_path, durable=True))
        result["torch_bytes"][name] += durable_path.stat().st_size

        scratch_path = root / "torch-save-nofsync" / f"{name}.pt"
        result["torch_save_seconds"][name].append(save_torch(obj, scratch_path, durable=False))


def describe_config(config: SeriesConfig) -> dict[str, Any]:
    """Summarize one configuration of the series: timings, bytes on disk and their split."""
    report: dict[str, Any] = {
        "label": config.label,
        "includes_optimizer": config.includes_optimizer,
        "error": config.error,
        "checkpoint_seconds": config.seconds,
        "bytes_written": config.bytes_written,
    }
    if config.error is not None:
        return report

    # The first and last quarter of the series show whether commit time grows with history.
    quarter = max(1, len(config.seconds) // 4)
    manifests = config.root / "devices"
    store = config.manager.store
    newest = store.checkpoints()[-1]
    report.update(
        store_bytes_on_disk=directory_bytes(config.root),
        manifest_bytes_on_disk=directory_bytes(manifests) if manifests.is_dir() else 0,
        store_size_bytes=store.size_bytes(),
        checkpoints_listed=len(store.checkpoints()),
        checkpoint_seconds_first_quarter=median(config.seconds[:quarter]),
        checkpoint_seconds_last_quarter=median(config.seconds[-quarter:]),
        newest_buffer_bytes=buffer_bytes_by_role(store.read(newest.checkpoint_id)[0]),
        code_delta_entropy=code_delta_entropy(config.root),
    )
    return report


def buffer_bytes_by_role(encoded: Mapping[str, EncodedTensor]) -> dict[str, int]:
    """Sum encoded buffer bytes (before chunking and compression) by role.

    Roles are the bulk ``codes`` of model tensors, their side buffers (scales, zero
    points), optimizer tensors, RNG states and anything else.
    """
    totals = {"model_codes": 0, "model_side_buffers": 0, "optimizer": 0, "rng": 0, "other": 0}
    for name, item in encoded.items():
        for buffer_name, array in item.buffers.items():
            if name.startswith("model/"):
                role = "model_codes" if buffer_name == "codes" else "model_side_buffers"
            elif name.startswith("optim/"):
                role = "optimizer"
            elif name.startswith("rng/"):
                role = "rng"
            else:
                role = "other"
            totals[role] += int(array.nbytes)
    return totals


def run_series(task: TraceTask, options: BenchOptions, root: Path) -> tuple[SeriesResult, dict[str, Path]]:
    """Train the LSTM for ``options.steps`` steps with a checkpoint every ``options.interval`` steps.

    The same run takes the two checkpoints the resume comparison starts from (one with
    ``options.codec``, one lossless) at half of the steps, and keeps the final
    state_dict and test MSE as the uninterrupted reference.

    Returns
    -------
    tuple of (SeriesResult, dict of str to pathlib.Path)
        The measurements, and the store roots of the halfway checkpoints by codec name.
    """
    model, optimizer = build_lstm(task, options, options.seed)
    (root / "torch-save").mkdir(parents=True)
    (root / "torch-save-nofsync").mkdir(parents=True)

    configs = series_configs(root, model, optimizer, options.codec)
    resume_roots = {options.codec: root / "resume-quantized", "lossless": root / "resume-lossless"}
    resume_managers = {
        options.codec: open_manager(resume_roots[options.codec], model, optimizer, codec=options.codec),
        "lossless": open_manager(resume_roots["lossless"], model, optimizer, codec="lossless"),
    }
    every_manager = [config.manager for config in configs] + list(resume_managers.values())

    collected: dict[str, Any] = {
        "torch_save_fsync_seconds": {"model": [], "full": []},
        "torch_save_seconds": {"model": [], "full": []},
        "torch_bytes": {"model": 0, "full": 0},
    }
    half = options.steps // 2
    reference_mse_half = float("nan")
    train_seconds = 0.0

    for step in range(options.steps):
        start = time.perf_counter()
        loss = train_step(model, optimizer, task, step, options)
        train_seconds += time.perf_counter() - start

        done = step + 1
        for manager in every_manager:
            manager.step(loss, data_position=done)

        if done % options.interval == 0:
            checkpoint_series_step(configs, model, optimizer, root, done, collected)
        if done == half:
            for manager in resume_managers.values():
                timed_checkpoint(manager)
            reference_mse_half = test_mse(model, task)
            logger.info("Step %d: halfway checkpoints taken, test MSE %.6f", done, reference_mse_half)

    # Decode the newest checkpoint of each configuration against torch.load of the newest file.
    last_step = (options.steps // options.interval) * options.interval
    decode_seconds: dict[str, list[float]] = {}
    decode_cold_seconds: dict[str, list[float]] = {}
    load_seconds: dict[str, list[float]] = {"model": [], "full": []}
    load_cold_seconds: dict[str, list[float]] = {"model": [], "full": []}
    for _ in range(options.repeats):
        for config in configs:
            if config.error is None:
                decode_seconds.setdefault(config.name, []).append(read_and_decode(config.root)[0])
                evict_from_page_cache(config.root)
                decode_cold_seconds.setdefault(config.name, []).append(read_and_decode(config.root)[0])
        for name in load_seconds:
            torch_path = root / "torch-save" / f"{name}-{last_step:06d}.pt"
            load_seconds[name].append(load_torch(torch_path)[0])
            evict_from_page_cache(torch_path)
            load_cold_seconds[name].append(load_torch(torch_path)[0])

    config_report = {config.name: describe_config(config) for config in configs}

    result = SeriesResult(
        checkpoints=options.steps // options.interval,
        model_bytes=tensor_bytes(model.state_dict()),
        full_bytes=tensor_bytes(model.state_dict()) + tensor_bytes(optimizer.state_dict()),
        configs=config_report,
        torch_bytes=collected["torch_bytes"],
        torch_save_fsync_seconds=collected["torch_save_fsync_seconds"],
        torch_save_seconds=collected["torch_save_seconds"],
        torch_load_seconds=load_seconds,
        decode_seconds=decode_seconds,
        torch_load_cold_seconds=load_cold_seconds,
        decode_cold_seconds=decode_cold_seconds,
        reference_mse=test_mse(model, task),
        reference_mse_half=reference_mse_half,
        reference_state={key: value.detach().clone() for key, value in model.state_dict().items()},
        train_seconds=train_seconds,
    )
    return result, resume_roots


@dataclass(frozen=True)
class ResumeResult:
    """Training resumed from a halfway checkpoint, compared with the uninterrupted run."""

    codec: str
    recovered_step: int
    mse_after_recovery: float
    final_mse: float
    reference_mse: float
    relative_difference: float
    identical_to_reference: bool
    max_abs_weight_difference: float
    recover_seconds: float


def run_resume(
    task: TraceTask, options: BenchOptions, store_root: Path, codec: str, series: SeriesResult
) -> ResumeResult:
    """Recover a fresh model and optimizer from the halfway checkpoint and train to ``options.steps``."""
    model, optimizer = build_lstm(task, options, options.seed + 1)
    manager = open_manager(store_root, model, optimizer, codec=codec)

    start = time.perf_counter()
    report = manager.recover(apply=True)
    recover_seconds = time.perf_counter() - start

    half = options.steps // 2
    if report.state.step != half:
        logger.warning("recovered step counter is %d, expected %d; resuming at step %d", report.state.step, half, half)
    mse_after_recovery = test_mse(model, task)

    for step in range(half, options.steps):
        train_step(model, optimizer, task, step, options)

    final_mse = test_mse(model, task)
    final_state = model.state_dict()
    differences = [float((final_state[key] - value).abs().max()) for key, value in series.reference_state.items()]
    identical = all(torch.equal(final_state[key], value) for key, value in series.reference_state.items())

    return ResumeResult(
        codec=codec,
        recovered_step=int(report.state.step),
        mse_after_recovery=mse_after_recovery,
        final_mse=final_mse,
        reference_mse=series.reference_mse,
        relative_difference=abs(final_mse - series.reference_mse) / series.reference_mse,
        identical_to_reference=identical,
        max_abs_weight_difference=max(differences),
        recover_seconds=recover_seconds,
    )


# ---------------------------------------------------------------------------
# Large state


def build_wide_mlp(target_mb: float, seed: int) -> nn.Sequential:
    """Build a stack of square Linear layers holding about ``target_mb`` MB of fp32 parameters.

    Weights are drawn from N(0, 1/width) and biases from N(0, 0.01^2), a spread close to
    trained dense layers; the caller then trains a few steps.
    """
    params_per_layer = target_mb * MB / 4 / BIG_LAYERS
    width = max(16, int(round(math.sqrt(params_per_layer) / 16)) * 16)

    generator = torch.Generator().manual_seed(seed)
    modules: list[nn.Module] = []
    for index in range(BIG_LAYERS):
        linear = nn.Linear(width, width)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(width, width, generator=generator) / math.sqrt(width))
            linear.bias.copy_(torch.randn(width, generator=generator) * 0.01)
        modules.append(linear)
        if index < BIG_LAYERS - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def big_train_step(model: nn.Sequential, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> float:
    """Run one Adam step on random regression data so that every weight changes a little; return the loss."""
    width = model[0].in_features
    inputs = torch.randn(BIG_BATCH_SIZE, width, generator=generator)
    targets = torch.randn(BIG_BATCH_SIZE, width, generator=generator)

    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached copy of the model's state_dict."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def warm_up(root: Path, codec: str) -> None:
    """Run both paths once on a small model so that imports and first-call costs stay out of the timings."""
    model = nn.Linear(64, 64)
    timed_checkpoint(open_manager(root / "store", model, None, codec=codec))
    read_and_decode(root / "store")
    save_torch(model.state_dict(), root / "warm.pt", durable=True)
    load_torch(root / "warm.pt")
    shutil.rmtree(root)


def run_big_state(options: BenchOptions, root: Path) -> dict[str, Any]:
    """Measure encode and decode throughput on a large state, ``options.repeats`` times.

    Each repetition first trains one step, so that every checkpoint contains new content.
    It then checkpoints into a fresh store (no earlier chunk to deduplicate against or
    delta-encode from) and into one store that keeps every repetition (incremental),
    writes torch.save with and without fsync, and reads everything back.
    """
    root.mkdir(parents=True)
    warm_up(root / "warm-up", options.codec)

    model = build_wide_mlp(options.big_mb, options.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=BIG_LEARNING_RATE)
    generator = torch.Generator().manual_seed(options.seed)
    for _ in range(BIG_WARMUP_STEPS):
        loss = big_train_step(model, optimizer, generator)

    state_bytes = tensor_bytes(model.state_dict())
    logger.info(
        "Large state: %d Linear layers of width %d, %.1f MB of fp32", BIG_LAYERS, model[0].in_features, state_bytes / MB
    )

    incremental_root = root / "store-incremental"
    incremental = open_manager(incremental_root, model, None, codec=options.codec)
    incremental.step(loss)
    timed_checkpoint(incremental)

    samples: dict[str, list[float]] = {
        key: []
        for key in (
            "encode_fresh",
            "encode_incremental",
            "torch_save_fsync",
            "torch_save",
            "decode_fresh",
            "decode_incremental",
            "torch_load",
            "decode_fresh_cold",
            "decode_incremental_cold",
            "torch_load_cold",
            "recover_fresh",
        )
    }
    errors: dict[str, list[float]] = {"fresh": [], "incremental": [], "torch_load": []}
    commits: list[dict[str, Any]] = []

    for repeat in range(options.repeats):
        loss = big_train_step(model, optimizer, generator)
        reference = snapshot(model)
        fresh_root = root / f"store-fresh-{repeat}"
        fresh = open_manager(fresh_root, model, None, codec=options.codec)
        for manager in (fresh, incremental):
            manager.step(loss)

        seconds, commit = timed_checkpoint(fresh)
        samples["encode_fresh"].append(seconds)
        commits.append({"kind": "fresh", **asdict(commit)})

        seconds, commit = timed_checkpoint(incremental)
        samples["encode_incremental"].append(seconds)
        commits.append({"kind": "incremental", **asdict(commit)})

        samples["torch_save_fsync"].append(save_torch(model.state_dict(), root / "torch-fsync.pt", durable=True))
        samples["torch_save"].append(save_torch(model.state_dict(), root / "torch-nofsync.pt", durable=False))

        seconds, state = read_and_decode(fresh_root)
        samples["decode_fresh"].append(seconds)
        errors["fresh"].append(max_relative_error(state.model, reference))
        del state

        seconds, state = read_and_decode(incremental_root)
        samples["decode_incremental"].append(seconds)
        errors["incremental"].append(max_relative_error(state.model, reference))
        del state

        seconds, loaded = load_torch(root / "torch-fsync.pt")
        samples["torch_load"].append(seconds)
        errors["torch_load"].append(max_relative_error(loaded, reference))
        del loaded

        # Cold reads: the page cache is gone after a reboot or power loss.
        evict_from_page_cache(fresh_root)
        seconds, state = read_and_decode(fresh_root)
        samples["decode_fresh_cold"].append(seconds)
        del state
        evict_from_page_cache(incremental_root)
        seconds, state = read_and_decode(incremental_root)
        samples["decode_incremental_cold"].append(seconds)
        del state
        evict_from_page_cache(root / "torch-fsync.pt")
        seconds, loaded = load_torch(root / "torch-fsync.pt")
        samples["torch_load_cold"].append(seconds)
        del loaded

        recover_manager = open_manager(fresh_root, model, None, codec=options.codec)
        start = time.perf_counter()
        recover_manager.recover(apply=False)
        samples["recover_fresh"].append(time.perf_counter() - start)

        logger.info(
            "Large state repeat %d: encode fresh %.3f s, torch.save+fsync %.3f s, "
            "decode fresh %.3f s, torch.load %.3f s",
            repeat,
            samples["encode_fresh"][-1],
            samples["torch_save_fsync"][-1],
            samples["decode_fresh"][-1],
            samples["torch_load"][-1],
        )
        if repeat < options.repeats - 1:
            shutil.rmtree(fresh_root)

    breakdown = measure_commit_stages(model, root, root / f"store-fresh-{options.repeats - 1}", options.repeats)
    profile = profile_checkpoint(model, root, options.codec) if options.profile else None

    return {
        "layers": BIG_LAYERS,
        "width": model[0].in_features,
        "state_bytes": state_bytes,
        "samples_seconds": samples,
        "max_relative_error": errors,
        "commits": commits,
        "incremental_store_bytes_on_disk": directory_bytes(incremental_root),
        "incremental_checkpoints": options.repeats + 1,
        "torch_file_bytes": (root / "torch-fsync.pt").stat().st_size,
        "breakdown_seconds": breakdown,
        "profile": profile,
    }


def measure_commit_stages(model: nn.Module, root: Path, encoded_root: Path, repeats: int) -> dict[str, float]:
    """Time each stage of a checkpoint and of a read separately, with the codecs the manager chose.

    The stages are flatten_state, encode, store.commit with and without fsync, and on the
    read side store.read, decode and unflatten_state. BLAKE2b-256 and LZ4 over the
    encoded buffers, single-threaded, give the floor of hashing and compressing the same
    bytes. Each stage is timed ``repeats`` times and the median is returned.
    """
    store = CheckpointStore(encoded_root, device_id=DEVICE_ID)
    newest = store.checkpoints()[-1]
    chosen, _ = store.read(newest.checkpoint_id)
    codec_configs = {name: item.codec for name, item in chosen.items()}
    del chosen

    samples: dict[str, list[float]] = {}
    for repeat in range(repeats):
        stage_root = root / f"stages-{repeat}"
        for name, seconds in time_stages(model, stage_root, codec_configs).items():
            samples.setdefault(name, []).append(seconds)
        shutil.rmtree(stage_root)
    return {name: median(values) for name, values in samples.items()}


def time_stages(model: nn.Module, root: Path, codec_configs: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Run each stage of :func:`measure_commit_stages` once, in fresh stores under ``root``."""
    stages: dict[str, float] = {}
    state = TrainingState(
        model=snapshot(model), optimizer=None, rng=capture_rng_state(), loss=1.0, model_version="bench"
    )

    start = time.perf_counter()
    tensors, meta = flatten_state(state)
    stages["flatten_state"] = time.perf_counter() - start

    start = time.perf_counter()
    encoded: dict[str, EncodedTensor] = {
        name: codec_from_config(codec_configs[name]).encode(tensor) for name, tensor in tensors.items()
    }
    stages["encode"] = time.perf_counter() - start

    for fsync in (True, False):
        start = time.perf_counter()
        CheckpointStore(root / f"fsync-{str(fsync).lower()}", device_id=DEVICE_ID, fsync=fsync).commit(encoded, meta)
        stages[f"commit_fsync_{str(fsync).lower()}"] = time.perf_counter() - start

    start = time.perf_counter()
    stage_store = CheckpointStore(root / "fsync-true", device_id=DEVICE_ID)
    read_back, read_meta = stage_store.read(stage_store.checkpoints()[-1].checkpoint_id)
    stages["read_verify"] = time.perf_counter() - start

    start = time.perf_counter()
    decoded = {name: codec_from_config(item.codec).decode(item) for name, item in read_back.items()}
    stages["decode"] = time.perf_counter() - start

    start = time.perf_counter()
    unflatten_state(decoded, read_meta)
    stages["unflatten_state"] = time.perf_counter() - start

    bulk = [array for item in encoded.values() for array in item.buffers.values()]
    start = time.perf_counter()
    for array in bulk:
        hashlib.blake2b(memoryview(np.ascontiguousarray(array)).cast("B"), digest_size=32).digest()
    stages["floor_blake2b_all_buffers"] = time.perf_counter() - start

    start = time.perf_counter()
    for array in bulk:
        lz4.frame.compress(memoryview(np.ascontiguousarray(array)).cast("B"))
    stages["floor_lz4_all_buffers"] = time.perf_counter() - start

    stages["encoded_buffer_bytes"] = float(sum(array.nbytes for array in bulk))
    return stages


def profile_checkpoint(model: nn.Module, root: Path, codec: str, top: int = 20) -> list[dict[str, Any]]:
    """Profile one checkpoint into a fresh store and one decode; print and return the top functions.

    Functions are ranked by cumulative time, because the store hashes and compresses in
    worker threads that cProfile does not see: their time shows up as waits on a lock
    inside the calling function.
    """
    profile_root = root / "store-profile"
    manager = open_manager(profile_root, model, None, codec=codec)

    profiler = cProfile.Profile()
    profiler.enable()
    timed_checkpoint(manager)
    read_and_decode(profile_root)
    profiler.disable()

    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({function})",
                "calls": calls,
                "own_seconds": own,
                "cumulative_seconds": cumulative,
            }
        )
    rows.sort(key=lambda row: row["cumulative_seconds"], reverse=True)

    print(f"\ncProfile of one large-state checkpoint and one decode (top {top} by cumulative time):")
    print(f"{'own s':>8} {'cum s':>8} {'calls':>8}  function")
    for row in rows[:top]:
        print(f"{row['own_seconds']:8.3f} {row['cumulative_seconds']:8.3f} {row['calls']:8d}  {row['function']}")
    return rows[:top]


# ---------------------------------------------------------------------------
# Figures and report


@dataclass(frozen=True)
class Figure:
    """One reported figure: cb_mobile's value, its baseline, their ratio and the target.

    ``ratio`` is baseline/value for storage (times smaller), value/baseline for
    throughput (times faster) and |value - baseline| / baseline for test MSE.
    ``passed`` is None for figures shown for information only. ``ratio_best`` is the
    throughput ratio of the fastest repetitions, a check on noise from other processes.
    """

    key: str
    label: str
    unit: str
    value: float
    baseline: float | None
    baseline_label: str
    ratio: float | None
    target: str
    passed: bool | None
    headline: bool = False
    ratio_best: float | None = None


def storage_figures(series: SeriesResult) -> list[Figure]:
    """Build the storage figures of the series; the headline is model + optimizer with the lossless optimizer codec."""
    figures = []
    for name, config in series.configs.items():
        if config["error"] is not None:
            continue
        baseline_name = "full" if config["includes_optimizer"] else "model"
        stored = config["store_bytes_on_disk"]
        baseline = series.torch_bytes[baseline_name]
        ratio = baseline / max(stored, 1)
        figures.append(
            Figure(
                key=f"storage/{name}",
                label=f"storage {series.checkpoints} ckpts: {config['label']}",
                unit="bytes",
                value=stored,
                baseline=baseline,
                baseline_label="torch.save " + ("model+optim" if config["includes_optimizer"] else "model"),
                ratio=ratio,
                target=f">= {STORAGE_TARGET:g}x smaller",
                passed=ratio >= STORAGE_TARGET,
                headline=name == "full-lossless",
            )
        )
    return figures


def throughput_figure(
    key: str,
    label: str,
    nbytes: int,
    seconds: Sequence[float],
    baseline_seconds: Sequence[float],
    baseline_label: str,
    *,
    informational: bool = False,
) -> Figure:
    """Build a throughput figure from median seconds of cb_mobile and of the baseline."""
    value = throughput(nbytes, median(seconds))
    baseline = throughput(nbytes, median(baseline_seconds))
    ratio = value / baseline
    ratio_best = min(baseline_seconds) / max(min(seconds), 1e-9)
    return Figure(
        key=key,
        label=label,
        unit="MB/s",
        value=value,
        baseline=baseline,
        baseline_label=baseline_label,
        ratio=ratio,
        target="" if informational else f">= {THROUGHPUT_TARGET:g}x",
        passed=None if informational else ratio >= THROUGHPUT_TARGET,
        ratio_best=ratio_best,
    )


def series_throughput_figures(series: SeriesResult) -> list[Figure]:
    """Build the encode and decode figures of the LSTM series."""
    figures = []
    for name, config in series.configs.items():
        if config["error"] is not None or name == "full-int8":
            continue
        baseline_name = "full" if config["includes_optimizer"] else "model"
        nbytes = series.full_bytes if config["includes_optimizer"] else series.model_bytes
        figures.append(
            throughput_figure(
                f"encode/lstm/{name}",
                f"encode LSTM {config['label']}",
                nbytes,
                config["checkpoint_seconds"],
                series.torch_save_fsync_seconds[baseline_name],
                "torch.save+fsync",
            )
        )
        figures.append(
            throughput_figure(
                f"encode/lstm/{name}/nofsync",
                "  same, against torch.save without fsync",
                nbytes,
                config["checkpoint_seconds"],
                series.torch_save_seconds[baseline_name],
                "torch.save (no fsync)",
                informational=True,
            )
        )
        figures.append(
            throughput_figure(
                f"decode/lstm/{name}/cold",
                f"decode LSTM {config['label']}, cold",
                nbytes,
                series.decode_cold_seconds[name],
                series.torch_load_cold_seconds[baseline_name],
                "torch.load, cold",
            )
        )
        figures.append(
            throughput_figure(
                f"decode/lstm/{name}",
                "  same, warm page cache",
                nbytes,
                series.decode_seconds[name],
                series.torch_load_seconds[baseline_name],
                "torch.load, warm",
                informational=True,
            )
        )
    return figures


def big_state_figures(big: dict[str, Any]) -> list[Figure]:
    """Build the encode, decode and storage figures of the large state."""
    samples = big["samples_seconds"]
    nbytes = big["state_bytes"]
    size = f"{nbytes / MB:.0f} MB"
    stored = big["incremental_store_bytes_on_disk"]
    baseline_bytes = big["torch_file_bytes"] * big["incremental_checkpoints"]
    storage = Figure(
        key="storage/big/incremental",
        label=f"  storage {big['incremental_checkpoints']} ckpts of {size}, 1 step apart",
        unit="bytes",
        value=stored,
        baseline=baseline_bytes,
        baseline_label="torch.save model",
        ratio=baseline_bytes / max(stored, 1),
        target="",
        passed=None,
    )
    return [
        throughput_figure(
            "encode/big/fresh",
            f"encode {size}, fresh store",
            nbytes,
            samples["encode_fresh"],
            samples["torch_save_fsync"],
            "torch.save+fsync",
        ),
        throughput_figure(
            "encode/big/fresh/nofsync",
            "  same, against torch.save without fsync",
            nbytes,
            samples["encode_fresh"],
            samples["torch_save"],
            "torch.save (no fsync)",
            informational=True,
        ),
        throughput_figure(
            "encode/big/incremental",
            f"encode {size}, after a checkpoint",
            nbytes,
            samples["encode_incremental"],
            samples["torch_save_fsync"],
            "torch.save+fsync",
        ),
        throughput_figure(
            "decode/big/fresh/cold",
            f"decode {size}, fresh store, cold",
            nbytes,
            samples["decode_fresh_cold"],
            samples["torch_load_cold"],
            "torch.load, cold",
        ),
        throughput_figure(
            "decode/big/fresh",
            "  same, warm page cache",
            nbytes,
            samples["decode_fresh"],
            samples["torch_load"],
            "torch.load, warm",
            informational=True,
        ),
        throughput_figure(
            "decode/big/incremental/cold",
            f"decode {size}, after a checkpoint, cold",
            nbytes,
            samples["decode_incremental_cold"],
            samples["torch_load_cold"],
            "torch.load, cold",
        ),
        throughput_figure(
            "decode/big/incremental",
            "  same, warm page cache",
            nbytes,
            samples["decode_incremental"],
            samples["torch_load"],
            "torch.load, warm",
            informational=True,
        ),
        throughput_figure(
            "recover/big/fresh",
            f"  manager.recover(apply=False) {size}",
            nbytes,
            samples["recover_fresh"],
            samples["torch_load"],
            "torch.load",
            informational=True,
        ),
        storage,
    ]


def resume_figures(resumed: Sequence[ResumeResult], quantized_codec: str) -> list[Figure]:
    """Build the resume figures; the target applies to the quantized codec, lossless must be identical."""
    figures = []
    for result in resumed:
        lossless = result.codec == "lossless"
        figures.append(
            Figure(
                key=f"resume/{result.codec}",
                label=f"test MSE resumed from {result.codec} ckpt",
                unit="MSE",
                value=result.final_mse,
                baseline=result.reference_mse,
                baseline_label="uninterrupted run",
                ratio=result.relative_difference,
                target="bit-identical" if lossless else f"<= {RESUME_MSE_TARGET:.0%} apart",
                passed=result.identical_to_reference if lossless else result.relative_difference <= RESUME_MSE_TARGET,
                headline=result.codec == quantized_codec and not lossless,
            )
        )
    return figures


def format_value(value: float | None, unit: str) -> str:
    """Format a figure's value in its unit for the table."""
    if value is None:
        return "-"
    if unit == "bytes":
        for scale, suffix in ((MB, "MB"), (1000, "kB")):
            if value >= scale:
                return f"{value / scale:.2f} {suffix}"
        return f"{value:.0f} B"
    if unit == "MB/s":
        return f"{value:.1f} MB/s"
    return f"{value:.5f}"


def format_ratio(figure: Figure, ratio: float | None) -> str:
    """Format a ratio of ``figure``: a percentage for MSE, a factor otherwise."""
    if ratio is None:
        return "-"
    if figure.unit == "MSE":
        return f"{ratio:.3%}"
    return f"{ratio:.2f}x"


def print_table(figures: Sequence[Figure]) -> None:
    """Print every figure with its baseline, ratio, target and PASS/MISS."""
    header = (
        f"{'figure':<52} {'cb_mobile':>12} {'baseline':>12}  {'(baseline)':<22} {'ratio':>8} {'best':>7}"
        f"  {'target':<17} result"
    )
    print()
    print(header)
    print("-" * len(header))
    for figure in figures:
        if figure.passed is None:
            result = "info"
        elif figure.passed:
            result = "PASS"
        else:
            result = "MISS"
        label = ("* " if figure.headline else "") + figure.label
        print(
            f"{label:<52} {format_value(figure.value, figure.unit):>12}"
            f" {format_value(figure.baseline, figure.unit):>12}  {figure.baseline_label:<22}"
            f" {format_ratio(figure, figure.ratio):>8} {format_ratio(figure, figure.ratio_best):>7}"
            f"  {figure.target:<17} {result}"
        )
    print()
    print("* headline figure. Storage ratio = torch.save bytes / store bytes on disk; throughput ratio =")
    print("cb_mobile MB/s / baseline MB/s of the median times ('best': of the fastest repetitions); encode targets")
    print("compare with torch.save + fsync of the file and its folder (both durable). Decode targets are cold:")
    print("both sides read after their files were evicted from the page cache (posix_fadvise DONTNEED), because")
    print("recovery follows a reboot or power loss, which empties the cache; a warm torch.load is a memory copy.")
    print("MSE ratio = |resumed - uninterrupted| / uninterrupted.")


def print_details(report: Mapping[str, Any]) -> None:
    """Print what the figures are made of: the split of store bytes and how commit time grows."""
    series = report["series"]
    print(
        f"\nLSTM series ({series['checkpoints']} checkpoints; fp32 model {series['model_bytes']} B, "
        f"model + Adam {series['full_bytes']} B):"
    )
    for name, config in series["configs"].items():
        if config["error"] is not None:
            print(f"  {name}: dropped, {config['error']}")
            continue
        manifests = config["manifest_bytes_on_disk"]
        print(
            f"  {config['label']}: {config['store_bytes_on_disk']} B on disk, of which manifests "
            f"{manifests} B ({manifests / max(config['store_bytes_on_disk'], 1):.0%}); "
            f"checkpoint time, median of first quarter {config['checkpoint_seconds_first_quarter']:.4f} s, "
            f"last quarter {config['checkpoint_seconds_last_quarter']:.4f} s"
        )
        roles = ", ".join(f"{role} {nbytes} B" for role, nbytes in config["newest_buffer_bytes"].items() if nbytes)
        print(f"    newest checkpoint before chunking and compression: {roles}")
        entropy = config["code_delta_entropy"]
        if math.isfinite(entropy["bits_per_code"]):
            print(
                f"    int8 code deltas between checkpoints: {entropy['bits_per_code']:.2f} bits per code "
                f"(order-0 entropy), {entropy['zero_share']:.0%} unchanged; entropy bound "
                f"{entropy['bound_bytes_per_checkpoint']:.0f} B of model codes per checkpoint"
            )

    big = report.get("big_state")
    if big:
        stages = big["breakdown_seconds"]
        print(
            f"\nLarge state, one checkpoint split into stages "
            f"(median seconds; {stages['encoded_buffer_bytes'] / MB:.1f} MB encoded):"
        )
        print(
            "  " + ", ".join(f"{name} {value:.3f}" for name, value in stages.items() if name != "encoded_buffer_bytes")
        )
        for kind in ("fresh", "incremental"):
            seconds = [commit["seconds"] for commit in big["commits"] if commit["kind"] == kind]
            print(f"  store commit inside manager.checkpoint(), {kind} store: median {median(seconds):.3f} s")


def machine_info() -> dict[str, Any]:
    """Return the facts about this machine that the figures depend on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_large_state": torch.get_num_threads(),
        "torch_threads_lstm": LSTM_THREADS,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------
# Entry point


def run(options: BenchOptions, workdir: Path, argv: Sequence[str]) -> dict[str, Any]:
    """Run every measurement in ``workdir`` and return the report as a JSON-serializable dict.

    ``argv`` is the command line that selected ``options``; the report records it.
    """
    task = load_task(options)

    logger.info("Training the LSTM for %d steps with a checkpoint every %d steps", options.steps, options.interval)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(LSTM_THREADS)
    try:
        series, resume_roots = run_series(task, options, workdir / "series")
        resumed = [run_resume(task, options, root, codec, series) for codec, root in resume_roots.items()]
    finally:
        torch.set_num_threads(default_threads)
    for result in resumed:
        logger.info(
            "Resumed from %s: test MSE %.6f against %.6f uninterrupted",
            result.codec,
            result.final_mse,
            result.reference_mse,
        )

    big = run_big_state(options, workdir / "big") if options.big_mb > 0 else None

    figures = storage_figures(series) + series_throughput_figures(series)
    if big is not None:
        headlines = {"encode/big/fresh", "decode/big/fresh/cold"}
        figures += [replace(figure, headline=figure.key in headlines) for figure in big_state_figures(big)]
    figures += resume_figures(resumed, options.codec)

    series_report = asdict(series)
    series_report.pop("reference_state")
    return {
        "command": shlex.join(["python", "-m", "simulations.bench_codec", *argv]),
        "options": asdict(options),
        "machine": machine_info(),
        "data": {
            "source": task.source,
            "site": task.site,
            "train_windows": len(task.y_train),
            "test_windows": len(task.y_test),
        },
        "figures": [asdict(figure) for figure in figures],
        "series": series_report,
        "resume": [asdict(result) for result in resumed],
        "big_state": big,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line and return the exit status.

    The status is 0 whenever the run completes: a missed target is a measurement,
    printed in the table and in the JSON report, not an error.
    """
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if options.workdir:
        Path(options.workdir).mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="bench-codec-", dir=options.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="bench-codec-"))
    logger.info("Working in %s", workdir)

    try:
        report = run(options, workdir, sys.argv[1:] if argv is None else list(argv))
    finally:
        if not options.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    figures = [Figure(**figure) for figure in report["figures"]]
    print_details(report)
    print_table(figures)

    if options.json_path:
        path = Path(options.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        logger.info("Wrote %s", path)

    missed = [figure.label.strip() for figure in figures if figure.passed is False]
    if missed:
        print(f"{len(missed)} target(s) missed: {'; '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
