"""Test-side half of the crash harness: drive the fork server and check every restart against the journal."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cb_mobile.errors import NoValidCheckpointError
from cb_mobile.store import CheckpointStore

from . import journal
from .crash_worker import CRASH_ENV

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class RunOutcome:
    """How one worker job ended: its pid and exit code (-9 after SIGKILL)."""

    pid: int
    exit_code: int

    @property
    def killed(self) -> bool:
        """Whether SIGKILL ended the job."""
        return self.exit_code == -9


class ForkServer:
    """A running ``crash_worker.py serve`` process that forks one child per job.

    Parameters
    ----------
    log_path : Path
        File that receives the server's and the children's stderr.
    start_timeout : float, default 120
        Seconds to wait for the server to import torch and warm up.
    """

    def __init__(self, log_path: Path, start_timeout: float = 120.0) -> None:
        paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}
        env.pop(CRASH_ENV, None)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", f"{__package__}.crash_worker", "serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=str(REPO))
        ready = self._read(start_timeout)
        if not ready.get("ready"):
            raise RuntimeError(f"crash worker did not start: {ready!r}; see {log_path}")

    def _read(self, timeout: float) -> dict[str, Any]:
        """Read one protocol line, failing with the worker log when nothing arrives in ``timeout`` seconds."""
        stdout = self.process.stdout
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else b""
        if not line:
            tail = self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"crash worker sent nothing within {timeout} s (exit {self.process.poll()}); log tail:\n{tail}")
        return json.loads(line)

    def run(self, job: Mapping[str, Any], *, kill_after: float | None = None, timeout: float = 120.0) -> RunOutcome:
        """Run one job in a forked child; SIGKILL it after ``kill_after`` seconds when given."""
        request = dict(job)
        if kill_after is not None:
            request["kill_after"] = kill_after
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()

        started = self._read(timeout)
        ended = self._read(timeout)
        if ended.get("pid") != started.get("pid"):
            raise RuntimeError(f"crash worker protocol out of step: {started!r} then {ended!r}")
        return RunOutcome(ended["pid"], ended["exit"])

    def close(self) -> None:
        """Stop the server: close its stdin, then kill it by its pid if it does not leave."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        finally:
            self._log.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RestartCheck:
    """What a restart loaded and which journal entry it matched (``last``, ``inflight`` or ``empty``)."""

    checkpoint_id: str | None
    matched: str


def check_restart(store: CheckpointStore, journal_path: Path) -> RestartCheck:
    """Load ``read_latest()`` and check it against the journal.

    A restart must load the last checkpoint whose commit returned, or the checkpoint
    of the commit in flight at the kill when its manifest rename completed, with the
    digest journaled for it. Nothing else is accepted, and failing to load when the
    journal records a commit is an error.

    Raises
    ------
    AssertionError
        With the journal's expectation and what was loaded.
    """
    expected = journal.expectation(journal.read(journal_path))
    try:
        info, tensors = store.read_latest()
    except NoValidCheckpointError as error:
        assert expected.last_id is None, (
            f"restart found no valid checkpoint, but the journal records {expected.last_id} as committed: {error}")
        return RestartCheck(None, "empty")

    digest = journal.content_digest(tensors)
    step = info.meta.get("step")
    if info.checkpoint_id == expected.last_id:
        assert digest == expected.last_digest, (
            f"restart loaded {info.checkpoint_id} (the last commit), but its content digest {digest} differs from "
            f"the committed {expected.last_digest}")
        return RestartCheck(info.checkpoint_id, "last")

    is_inflight = (expected.inflight_digest is not None and info.checkpoint_id not in expected.committed_ids
                   and digest == expected.inflight_digest and step == expected.inflight_step)
    assert is_inflight, (
        f"restart loaded {info.checkpoint_id} (step {step}, digest {digest}); the journal allows only the last "
        f"commit {expected.last_id} (step {expected.last_step}) or the in-flight commit at step "
        f"{expected.inflight_step} (digest {expected.inflight_digest})")
    return RestartCheck(info.checkpoint_id, "inflight")
