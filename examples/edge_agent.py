"""Edge-device agent: local forecaster training with cb_mobile checkpoints, a crash and a recovery.

The agent trains a small LSTM traffic forecaster on one site's synthetic LTE series with
a CheckpointManager in its loop. Partway through, the battery runs low (the agent
checkpoints at once) and then the device dies: every object in memory is lost. The
agent boots again, recovers from the on-device store and finishes training. It uses
only ``cb_mobile``, torch and numpy; it never imports Flower.

Run it with::

    python examples/edge_agent.py --steps 200 --store /tmp/edge-store

``--crash-mode kill`` runs the first life in a child process that kills itself with
SIGKILL, so nothing but the store on disk survives. The agent deletes its earlier
checkpoints in ``--store`` before it starts, unless ``--keep-store`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Run from a checkout without installing: put the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cb_mobile.data import StandardScaler, make_windows, synthetic_sites  # noqa: E402
from cb_mobile.errors import NoValidCheckpointError  # noqa: E402
from cb_mobile.interval import IntervalPolicy  # noqa: E402
from cb_mobile.manager import CheckpointManager, RecoveryReport  # noqa: E402
from cb_mobile.models import build_model  # noqa: E402
from cb_mobile.store import CheckpointStore  # noqa: E402

logger = logging.getLogger("edge_agent")

MODEL_VERSION = "global-v0"
DEVICE_ID = "handset-0"
TARGET_COLUMN = 0  # downlink volume


class SimulatedCrash(RuntimeError):
    """The device lost power; everything in memory is gone."""


@dataclass
class LocalData:
    """Sliding windows of one site's scaled series."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def load_local_data(site: str, window: int, max_windows: int, seed: int) -> LocalData:
    """Build scaled input windows and next-step targets from the synthetic series of ``site``."""
    series = synthetic_sites(seed, "train", sites=[site])[site]
    values = series.values[: max_windows + window]

    scaled = StandardScaler().fit(values).transform(values)
    inputs, targets = make_windows(scaled, TARGET_COLUMN, window)
    return LocalData(torch.from_numpy(inputs), torch.from_numpy(targets))


def epoch_order(num_batches: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the shuffled batch order of ``epoch``, which depends only on the seed and epoch.

    Deriving the order from the epoch, not from a running generator, lets a recovered
    device rebuild the current epoch's order from the checkpointed epoch counter and
    continue at the checkpointed data position.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_batches, generator=generator)


def boot(args: argparse.Namespace, data: LocalData) -> tuple[CheckpointManager, RecoveryReport | None]:
    """Build the model, optimizer and manager, and recover from the store when it has a checkpoint."""
    model = build_model(
        "lstm", num_features=data.inputs.shape[2], window=data.inputs.shape[1],
        hidden_size=16, num_layers=1, seed=args.seed,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    policy = IntervalPolicy(
        hazard_rate=1.0 / args.mtbf, min_steps=5, max_steps=args.max_interval, overhead_budget=0.2,
    )
    manager = CheckpointManager(
        args.store, model, optimizer,
        codec=args.codec, policy=policy, merge_k=args.merge_k,
        device_id=DEVICE_ID, cap_bytes=args.cap_bytes, loss_smoothing=0.1,
    )

    try:
        report = manager.recover()
    except NoValidCheckpointError:
        manager.begin_round(0, MODEL_VERSION)
        return manager, None
    return manager, report


def train(args: argparse.Namespace, data: LocalData, manager: CheckpointManager, crash_at: int | None) -> float:
    """Train until ``args.steps`` optimizer steps, checkpointing through ``manager``.

    Raises
    ------
    SimulatedCrash
        When the step counter reaches ``crash_at``.
    """
    model, optimizer = manager.model, manager.optimizer
    loss_fn = nn.MSELoss()
    num_batches = len(data) // args.batch_size
    # A rebooted device is back on a charged battery, so only a life that will crash drains it.
    battery = BatteryModel(low_at=args.battery_low_at if crash_at is not None else None)
    loss_value = float("nan")

    model.train()
    while manager.step_count < args.steps:
        order = epoch_order(num_batches, args.seed, manager.epoch)
        for position in range(manager.data_position, num_batches):
            if manager.step_count >= args.steps:
                break
            if crash_at is not None and manager.step_count == crash_at:
                raise SimulatedCrash(f"device lost power at step {crash_at}")

            batch = order[position] * args.batch_size
            inputs = data.inputs[batch : batch + args.batch_size]
            targets = data.targets[batch : batch + args.batch_size]

            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()

            next_epoch, next_position = (manager.epoch, position + 1)
            if next_position == num_batches:
                next_epoch, next_position = manager.epoch + 1, 0
            result = manager.step(loss_value, data_position=next_position, epoch=next_epoch)
            if result is not None and result.committed:
                print(f"  step {manager.step_count:4d}  loss {loss_value:.4f} (average {manager.loss:.4f})  "
                      f"checkpoint {result.checkpoint_id}: {result.bytes_written} B written, "
                      f"next in {manager.policy.interval_steps()} steps")

            if battery.drain(manager.step_count):
                print(f"  step {manager.step_count:4d}  battery low: checkpointing now")
                manager.signal_hazard(1.0 / (args.mtbf / 10), imminent=True)
    return loss_value


class BatteryModel:
    """A battery that reports low charge once, at a fixed step."""

    def __init__(self, low_at: int | None) -> None:
        self.low_at = low_at
        self.reported = False

    def drain(self, step: int) -> bool:
        """Return True on the first step at or after the low-charge step."""
        if self.low_at is None or self.reported or step < self.low_at:
            return False
        self.reported = True
        return True


def print_recovery(report: RecoveryReport) -> None:
    print("Recovered from the on-device store:")
    for line in report.summary().splitlines():
        print(f"  {line}")


def run_life(args: argparse.Namespace, data: LocalData, crash_at: int | None) -> tuple[CheckpointManager, float]:
    """Boot once and train; a crash propagates as SimulatedCrash."""
    manager, report = boot(args, data)
    if report is None:
        print(f"Booted with an empty store; training from step 0 ({args.codec} checkpoints)")
    else:
        print_recovery(report)
    loss = train(args, data, manager, crash_at)
    return manager, loss


def first_life_in_child(args: argparse.Namespace) -> bool:
    """Run the first life in a child process that SIGKILLs itself at the crash step.

    Returns whether the child was killed.
    """
    command = [sys.executable, __file__, *args.argv, "--store", args.store, "--child"]
    completed = subprocess.run(command, check=False)
    if completed.returncode == 0:
        print("First life finished without reaching the crash step")
        return False
    if completed.returncode != -signal.SIGKILL:
        raise SystemExit(f"the first life failed with exit code {completed.returncode}")
    print(f"First life was killed with SIGKILL at step {args.crash_at}; only the store survived")
    return True


def clear_device_checkpoints(path: str) -> None:
    """Delete this agent's checkpoints under ``path``, leaving other devices' files alone."""
    store = CheckpointStore(path, device_id=DEVICE_ID)
    for info in store.checkpoints():
        store.delete(info.checkpoint_id)
    store.gc()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if not args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    data = load_local_data(args.site, args.window, args.max_windows, args.seed)

    if args.child:
        try:
            run_life(args, data, args.crash_at)
        except SimulatedCrash:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    if not args.keep_store:
        clear_device_checkpoints(args.store)

    started = time.perf_counter()
    manager = None
    if args.crash_mode == "kill":
        crashed = first_life_in_child(args)
    else:
        try:
            manager, loss = run_life(args, data, args.crash_at)
            crashed = False
        except SimulatedCrash as crash:
            print(f"CRASH: {crash}; the model, optimizer and manager are gone")
            crashed = True

    if manager is None:
        print("Rebooting")
        manager, loss = run_life(args, data, crash_at=None)
    write_summary(args, manager, loss, crashed, time.perf_counter() - started)
    return 0


def write_summary(args: argparse.Namespace, manager: CheckpointManager, loss: float, crashed: bool, seconds: float) -> None:
    stats = manager.stats
    summary = {
        "steps": manager.step_count,
        "final_loss": loss,
        "crashed": crashed,
        "recoveries": stats.recoveries,
        "checkpoints": stats.checkpoints,
        "bytes_written": stats.bytes_written,
        "store_bytes": manager.store.size_bytes(),
        "checkpoint_overhead": stats.overhead,
        "wall_seconds": seconds,
    }
    print(f"Finished {manager.step_count} steps, final loss {loss:.4f}; this life committed "
          f"{stats.checkpoints} checkpoint(s) at {stats.overhead:.0%} of its training time, "
          f"the store holds {summary['store_bytes']} B; {seconds:.1f} s wall clock")
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps to train in all (default 200)")
    parser.add_argument("--store", default=None, help="checkpoint store directory (default: a new temporary one)")
    parser.add_argument("--crash-at", type=int, default=None, help="step at which the device dies (default 60%% of --steps)")
    parser.add_argument("--crash-mode", choices=("raise", "kill"), default="raise",
                        help="'raise' drops everything in this process; 'kill' SIGKILLs a child process")
    parser.add_argument("--battery-low-at", type=int, default=None,
                        help="step at which the battery runs low and the agent checkpoints (default crash step - 3)")
    parser.add_argument("--codec", default="int8", help="codec for model weights: int8, int4, fp16 or lossless")
    parser.add_argument("--merge-k", type=int, default=2, help="lowest-loss checkpoints merged on recovery (default 2)")
    parser.add_argument("--cap-bytes", type=int, default=None, help="storage cap of the store, in bytes")
    parser.add_argument("--mtbf", type=float, default=30.0, help="expected seconds between failures (default 30)")
    parser.add_argument("--max-interval", type=int, default=100, help="maximum steps between checkpoints (default 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per batch (default 32)")
    parser.add_argument("--window", type=int, default=12, help="input time steps per window (default 12)")
    parser.add_argument("--max-windows", type=int, default=2048, help="windows of the series to use (default 2048)")
    parser.add_argument("--lr", type=float, default=0.005, help="Adam learning rate (default 0.005)")
    parser.add_argument("--site", default="ElBorn", help="synthetic site: ElBorn, LesCorts or PobleSec")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, model and shuffling (default 0)")
    parser.add_argument("--keep-store", action="store_true",
                        help="resume from the checkpoints already in --store instead of deleting them first")
    parser.add_argument("--report", default=None, help="write a JSON summary to this file")
    parser.add_argument("--verbose", action="store_true", help="log every checkpoint decision")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")
    if args.store is None:
        args.store = tempfile.mkdtemp(prefix="cb-mobile-edge-")
    if args.crash_at is None:
        args.crash_at = max(1, int(args.steps * 0.6))
    if args.battery_low_at is None:
        args.battery_low_at = max(1, args.crash_at - 3)
    return args


if __name__ == "__main__":
    raise SystemExit(main())
