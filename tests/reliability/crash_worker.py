"""Crash-test worker: trains a small torch model and commits checkpoints until it is killed.

Usage::

    PYTHONPATH=REPO:REPO/tests python -m reliability.crash_worker run JOB.json
    PYTHONPATH=REPO:REPO/tests python -m reliability.crash_worker serve

``run`` runs one job in this process; ``serve`` is a fork server that reads one JSON
job per stdin line.

A job opens a :class:`~cb_mobile.store.CheckpointStore`, loads ``read_latest()`` as a
restarted device would, and resumes training from it. It then trains and commits
checkpoints under a small cap. Every commit writes chunks, deltas and a manifest,
evicts old checkpoints and collects garbage. Around each commit the job appends
``begin`` and ``done`` (or ``skip``) lines to a fsynced journal (see ``journal.py``).

Two ways to die:

- ``kill_after`` (fork server only): the server sends SIGKILL to the job's process
  after that many seconds, wherever it is.
- ``crash_at`` (or the environment variable ``CB_MOBILE_CRASH_AT`` in ``run`` mode): a
  fault spec such as ``rename@evict:2:after`` (see ``faults.py``). The job sends itself
  SIGKILL at that os-level call, after journaling where it was.

The fork server imports torch and cb_mobile once and forks one child per job, so a
kill cycle costs a fork (tens of milliseconds) instead of a Python start with torch
(about 1.5 s). It kills a child only through a pidfd of that child, so a recycled pid
is never signalled. Protocol: for each job line it answers ``{"pid": PID}`` when the
child starts and ``{"pid": PID, "exit": CODE}`` when it ends, where CODE is negative
for a signal (``-9`` after SIGKILL).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cb_mobile.codec import EncodedTensor, decode_tensor, get_codec
from cb_mobile.errors import NoValidCheckpointError
from cb_mobile.store import CheckpointStore

from . import faults, journal

logger = logging.getLogger("crash_worker")

CRASH_ENV = "CB_MOBILE_CRASH_AT"

DEFAULT_JOB: dict[str, Any] = {
    "device_id": "device-0",
    "cap_bytes": 192 * 1024,
    "chunk_bytes": 4096,
    "max_delta_chain": 3,
    "retain_best": 1,
    "seed": 0,
    "commits": None,
    "crash_at": None,
    "trace": None,
    "gc_every": 5,
    "delete_every": 7,
    "width": 32,
    "codec": "int8",
    "huge_every": 9,
}
"""Job defaults. ``commits`` None runs until killed; ``trace`` is a path for the op trace.
``gc_every``, ``delete_every`` and ``huge_every`` count training steps, which survive
restarts because a restarted job resumes the step counter from its checkpoint."""

FEATURES = 16


# Encoding -------------------------------------------------------------------------


def make_encoder(name: str) -> Callable[[torch.Tensor], EncodedTensor]:
    """Return the ``encode`` method of the cb_mobile codec ``name``."""
    return get_codec(name).encode


def decode(encoded: EncodedTensor) -> torch.Tensor:
    """Decode with the codec named in ``encoded``."""
    return decode_tensor(encoded)


# Training -------------------------------------------------------------------------


class Trainer:
    """A small MLP forecaster trained with Adam on a synthetic periodic series."""

    def __init__(self, width: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(FEATURES, width), nn.Tanh(), nn.Linear(width, FEATURES))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def train_step(self) -> float:
        """Run one optimizer step and return the loss."""
        phase = self.rng.uniform(0, 2 * np.pi, size=(32, 1))
        grid = np.arange(FEATURES + 1) * 0.4
        series = torch.from_numpy(np.sin(phase + grid).astype(np.float32))
        inputs, targets = series[:, :FEATURES], series[:, 1:]

        loss = nn.functional.mse_loss(self.model(inputs), targets)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def resume(self, tensors: Mapping[str, EncodedTensor], meta: Mapping[str, Any]) -> None:
        """Load the model weights and step counter from a checkpoint read back from the store."""
        self.step = int(meta.get("step", 0))
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                encoded = tensors.get(f"model/{key}")
                if encoded is not None:
                    value.copy_(decode(encoded))


def encode_checkpoint(trainer: Trainer, encode: Callable[[torch.Tensor], EncodedTensor],
                      job: Mapping[str, Any]) -> dict[str, EncodedTensor]:
    """Encode the training state plus three synthetic buffers that exercise dedup, deltas and the cap.

    ``data/frozen`` never changes (dedup), ``data/drift`` changes a few values per
    step (delta chunks), ``data/noise`` is random with a random size (new chunks), and
    every ``huge_every``-th step it is larger than the cap, so that commit is skipped.
    """
    exact = make_encoder("lossless")
    tensors = {f"model/{key}": encode(value) for key, value in trainer.model.state_dict().items()}
    positions = {id(parameter): position for position, parameter in enumerate(trainer.model.parameters())}
    for parameter, state in trainer.optimizer.state.items():
        position = positions[id(parameter)]
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/state/{position}/{name}"] = exact(value)

    seed = int(job["seed"])
    step = trainer.step
    frozen = np.random.default_rng(seed).standard_normal(1024).astype(np.float32)
    drift = np.random.default_rng(seed + 1).standard_normal(3000).astype(np.float32)
    drift[(np.arange(8) * 97 + step * 13) % drift.size] += step
    noise_rng = np.random.default_rng([seed, step])
    huge = job["huge_every"] and step % int(job["huge_every"]) == 0
    noise_size = int(job["cap_bytes"]) // 2 if huge else int(noise_rng.integers(64, 3000))
    noise = noise_rng.standard_normal(noise_size).astype(np.float32)

    tensors["data/frozen"] = exact(torch.from_numpy(frozen))
    tensors["data/drift"] = exact(torch.from_numpy(drift))
    tensors["data/noise"] = exact(torch.from_numpy(noise))
    return tensors


# One job --------------------------------------------------------------------------


def _crash_action(journal_path: str, spec: faults.FaultSpec):
    """Return the injector action that journals the fault point and sends SIGKILL to this process."""
    def action(event: faults.Event) -> None:
        journal.append(journal_path, {"event": "kill", "spec": str(spec), "op": event.op, "function": event.function,
                                      "functions": list(event.functions), "path": event.path})
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # SIGKILL is delivered before this returns; never reached

    return action


def open_store(job: Mapping[str, Any]) -> CheckpointStore:
    """Open the job's store with the job's cap and chunking, filling in defaults."""
    job = {**DEFAULT_JOB, **job}
    return CheckpointStore(job["root"], device_id=job["device_id"], cap_bytes=job["cap_bytes"],
                           chunk_bytes=job["chunk_bytes"], max_delta_chain=job["max_delta_chain"],
                           retain_best=job["retain_best"])


def run_job(job: Mapping[str, Any]) -> int:
    """Open the store, resume from its latest checkpoint, then train and commit; returns an exit code."""
    job = {**DEFAULT_JOB, **job}
    journal_path = job["journal"]
    torch.set_num_threads(1)

    spec_text = job["crash_at"] or os.environ.get(CRASH_ENV)
    spec = faults.FaultSpec.parse(spec_text) if spec_text else None
    injector = faults.Injector(action=_crash_action(journal_path, spec) if spec else None, spec=spec,
                               trace=bool(job["trace"]))
    injector.install()

    store = open_store(job)
    trainer = Trainer(int(job["width"]), int(job["seed"]))
    try:
        info, tensors = store.read_latest()
    except NoValidCheckpointError:
        journal.append(journal_path, {"event": "open", "id": None})
    else:
        digest = journal.content_digest(tensors)
        journal.append(journal_path, {"event": "open", "id": info.checkpoint_id, "digest": digest,
                                      "step": info.meta.get("step")})
        trainer.resume(tensors, info.meta)

    encode = make_encoder(job["codec"])
    committed: list[str] = []
    commits = job["commits"]
    done = 0
    while commits is None or done < commits:
        loss = trainer.train_step()
        tensors = encode_checkpoint(trainer, encode, job)
        meta = {"loss": loss, "model_version": f"v{trainer.step // 10}", "step": trainer.step}
        digest = journal.content_digest(tensors)

        journal.append(journal_path, {"event": "begin", "step": trainer.step, "digest": digest})
        result = store.commit(tensors, meta)
        if result.committed:
            journal.append(journal_path, {"event": "done", "id": result.checkpoint_id, "step": trainer.step,
                                          "digest": digest, "evicted": list(result.evicted)})
            committed.append(result.checkpoint_id)
        else:
            journal.append(journal_path, {"event": "skip", "step": trainer.step, "reason": result.reason})
        done += 1

        if job["gc_every"] and trainer.step % int(job["gc_every"]) == 0:
            store.gc()
        if job["delete_every"] and trainer.step % int(job["delete_every"]) == 0:
            _delete_oldest(store, journal_path)

    injector.uninstall()
    if job["trace"]:
        events = [{"op": e.op, "index": e.index, "functions": list(e.functions), "path": e.path}
                  for e in injector.events]
        Path(job["trace"]).write_text(json.dumps(events))
    return 0


def _delete_oldest(store: CheckpointStore, journal_path: str) -> None:
    """Delete the oldest checkpoint when more than one is stored, as a user pruning by hand would."""
    stored = store.checkpoints()
    if len(stored) > 1:
        store.delete(stored[0].checkpoint_id)
        journal.append(journal_path, {"event": "delete", "id": stored[0].checkpoint_id})


# Fork server ----------------------------------------------------------------------


def warm_up() -> None:
    """Import and run everything a job touches once, so forked children start warm."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        job = {**DEFAULT_JOB, "root": f"{scratch}/store", "journal": f"{scratch}/journal", "commits": 3}
        run_job(job)


def _child(job: Mapping[str, Any]) -> None:
    """Run a job in a forked child and leave with its exit code, never returning to the server loop."""
    code = 1
    try:
        code = run_job(job)
    except BaseException:  # noqa: BLE001 - any failure must reach the harness as an exit code and a traceback
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _wait(pid: int, kill_after: float | None) -> int:
    """Wait for child ``pid``; SIGKILL it through a pidfd once ``kill_after`` seconds have passed."""
    if kill_after is not None:
        pidfd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], max(0.0, kill_after))
            if not ready:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def serve() -> None:
    """Serve jobs from stdin, one forked child per job, until stdin closes."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    warm_up()
    channel.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        kill_after = job.pop("kill_after", None)
        channel.flush()
        sys.stderr.flush()

        pid = os.fork()
        if pid == 0:
            _child(job)
        channel.write(json.dumps({"pid": pid}) + "\n")
        code = _wait(pid, kill_after)
        channel.write(json.dumps({"pid": pid, "exit": code}) + "\n")


def main(argv: list[str]) -> int:
    """Run the command in ``argv``: ``serve`` or ``run JOB.json``."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(process)d %(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["serve"]:
        serve()
        return 0
    if len(argv) == 2 and argv[0] == "run":
        return run_job(json.loads(Path(argv[1]).read_text()))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
