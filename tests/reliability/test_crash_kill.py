"""Crash consistency under real SIGKILLs: every restart loads the last committed checkpoint.

A forked worker process trains a small torch model and commits checkpoints under a
small cap (so eviction, gc and deletes run all the time) and journals each commit.
It dies by SIGKILL, either at a chosen os-level call inside a chosen store phase
(chunk writes, manifest write, eviction, gc, ...) or after a seeded random delay.
After every kill the test opens the store, loads ``read_latest()`` and checks it
against the journal. The next worker, a fresh process, must load the same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cb_mobile.manifest import parse_manifest
from cb_mobile.store import CheckpointStore

from . import journal
from .crash_worker import CRASH_ENV, open_store
from .faults import FaultSpec, Injector, SimulatedCrash, raise_crash
from .harness import ForkServer, check_restart
from .stores import make_state

REPO = Path(__file__).resolve().parents[2]
JOB_COMMITS = 4
"""Commits per worker job; a job that is not killed ends after these and counts as a miss."""

DEFAULT_FAULT_KILLS = 120
DEFAULT_TIMED_KILLS = 100
SLOW_FAULT_KILLS = 700
SLOW_TIMED_KILLS = 400
SLOW_DISK_KILLS = 100

_TIMINGS = ("before", "after")


def _phase(functions: list[str] | tuple[str, ...]) -> str:
    """Return the store method a call happened in: the innermost ``CheckpointStore`` method other than the lock."""
    for name in functions:
        method = name.removeprefix("store.").split(".<locals>")[0]
        if method.startswith("CheckpointStore.") and method != "CheckpointStore._lock":
            return method
    return functions[0] if functions else "?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """One warm fork server for the module's kill campaigns."""
    log = tmp_path_factory.mktemp("crash-worker") / "worker.log"
    with ForkServer(log) as fork_server:
        yield fork_server


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when /dev/shm is available, else ``tmp_path``.

    fsync costs nothing on tmpfs, which makes a kill cycle about ten times cheaper.
    A SIGKILL leaves the page cache intact on any filesystem, so the outcome of a
    process kill does not depend on the filesystem. Power loss is not simulated.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="cb-crash-", dir=shm))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


@dataclass
class Campaign:
    """One store under repeated kills, with tallies of where the kills landed and what restarts loaded."""

    root: Path
    journal: Path
    job: dict
    kills: int = 0
    missed: int = 0
    matched: Counter = field(default_factory=Counter)
    phases: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    expected_open: str | None = None
    orphans_flagged: int = 0
    seconds: float = 0.0

    @classmethod
    def create(cls, folder: Path, seed: int) -> Campaign:
        folder.mkdir(parents=True, exist_ok=True)
        root, journal_path = folder / "store", folder / "journal.jsonl"
        return cls(root, journal_path, {"root": str(root), "journal": str(journal_path), "seed": seed,
                                        "commits": JOB_COMMITS})

    def run(self, server: ForkServer, *, crash_at: str | None = None, kill_after: float | None = None) -> bool:
        """Run one job, then check the restart; returns whether the job was killed."""
        before = len(journal.read(self.journal))
        outcome = server.run({**self.job, "crash_at": crash_at}, kill_after=kill_after)
        records = journal.read(self.journal)[before:]
        assert outcome.exit_code in (0, -9), f"worker job failed with exit code {outcome.exit_code}; see {server.log_path}"

        self._check_worker_open(records)
        if outcome.killed:
            self.kills += 1
            kill = next((record for record in records if record["event"] == "kill"), None)
            if kill is not None:
                self.phases[_phase(kill["functions"])] += 1
                self.ops[f"{kill['op']}:{kill['spec'].rsplit(':', 1)[-1]}"] += 1
        else:
            self.missed += 1

        store = open_store(self.job)
        check = check_restart(store, self.journal)
        self.matched[check.matched] += 1
        self.expected_open = check.checkpoint_id

        self._check_verify(store)
        return outcome.killed

    def _check_verify(self, store) -> None:
        """``verify`` may flag only chunks that no manifest references (left by a killed commit), never a manifest."""
        report = store.verify()
        referenced = referenced_chunks(self.root)
        for damaged in report.damaged:
            path = Path(damaged.path)
            assert path.parent.parent.name == "chunks", f"verify after kill {self.kills} flags {path}: {damaged.reason}"
            assert path.name not in referenced, (
                f"verify after kill {self.kills} flags chunk {path.name}, which a manifest references: {damaged.reason}")
        if report.damaged:
            self.orphans_flagged += 1

    def _check_worker_open(self, records: list[dict]) -> None:
        """The worker's own restart must have loaded what the previous check loaded."""
        opens = [record for record in records if record["event"] == "open"]
        if not opens:
            return  # killed before read_latest returned
        assert opens[0]["id"] == self.expected_open, (
            f"restarted worker loaded {opens[0]['id']}, the previous check loaded {self.expected_open}")


def referenced_chunks(root: Path) -> set[str]:
    """Return the chunk ids that the manifests of every device under ``root`` reference, delta bases included."""
    referenced: set[str] = set()
    for path in root.glob("devices/*/manifests/*.json"):
        manifest = parse_manifest(path.read_bytes(), str(path))
        referenced.update(manifest.chunks)
    return referenced


def trace_targets(server: ForkServer, folder: Path, seed: int) -> list[tuple[str, str, int]]:
    """Trace a steady-state job and return the (operation, store phase, calls per job) it made."""
    campaign = Campaign.create(folder, seed)
    campaign.run(server)
    trace = folder / "trace.json"
    server.run({**campaign.job, "trace": str(trace), "commits": 3 * JOB_COMMITS})

    events = json.loads(trace.read_text())
    counts = Counter((event["op"], _phase(event["functions"])) for event in events)
    return [(op, phase, max(1, math.ceil(count / 3))) for (op, phase), count in sorted(counts.items())]


def run_fault_campaign(server: ForkServer, folder: Path, kills: int, seed: int) -> Campaign:
    """Kill the worker ``kills`` times at os-level calls spread over every store phase the trace found."""
    rng = random.Random(seed)
    targets = trace_targets(server, folder / "trace", seed)
    campaign = Campaign.create(folder / "faults", seed)
    started = time.perf_counter()

    queue: list[tuple[str, str, int]] = []
    while campaign.kills < kills:
        if not queue:
            queue = list(targets)
            rng.shuffle(queue)
        op, phase, per_job = queue.pop()
        when = rng.choice(_TIMINGS + (("mid",) if op in ("write", "writev") else ()))
        spec = f"{op}@{phase}:{rng.randint(1, per_job)}:{when}"
        campaign.run(server, crash_at=spec)

    campaign.seconds = time.perf_counter() - started
    return campaign


def run_timed_campaign(server: ForkServer, folder: Path, kills: int, seed: int) -> Campaign:
    """Kill the worker ``kills`` times after seeded random delays up to the length of a ``JOB_COMMITS`` job.

    The killed jobs commit without end, so every job dies by the kill.
    """
    rng = random.Random(seed)
    campaign = Campaign.create(folder, seed)
    calibration = time.perf_counter()
    campaign.run(server)
    span = time.perf_counter() - calibration
    started = time.perf_counter()

    campaign.job["commits"] = None
    while campaign.kills < kills:
        campaign.run(server, kill_after=rng.uniform(0.0, span))

    campaign.seconds = time.perf_counter() - started
    return campaign


def _summary(campaign: Campaign) -> dict:
    return {"kills": campaign.kills, "jobs_not_killed": campaign.missed, "restart_loaded": dict(campaign.matched),
            "kill_phases": dict(campaign.phases), "kill_ops": dict(campaign.ops),
            "checks_where_verify_flagged_orphan_chunks": campaign.orphans_flagged, "seconds": round(campaign.seconds, 1)}


@pytest.mark.timeout(300)
def test_crash_fault_point_kills(server: ForkServer, fast_dir: Path, record_figure) -> None:
    campaign = run_fault_campaign(server, fast_dir, DEFAULT_FAULT_KILLS, seed=1)
    record_figure("crash_fault_point_kills", _summary(campaign))

    assert campaign.kills >= DEFAULT_FAULT_KILLS
    for part in ("_write_batch", "_write_manifest", "_evict", "gc"):
        landed = sum(count for phase, count in campaign.phases.items() if phase.endswith(part))
        assert landed > 0, f"no kill landed in a store method ending in {part}: {dict(campaign.phases)}"


@pytest.mark.timeout(300)
def test_crash_timed_kills(server: ForkServer, fast_dir: Path, record_figure) -> None:
    campaign = run_timed_campaign(server, fast_dir, DEFAULT_TIMED_KILLS, seed=2)
    record_figure("crash_timed_kills", _summary(campaign))

    assert campaign.kills >= DEFAULT_TIMED_KILLS
    assert campaign.matched["last"] > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_crash_kills_slow(server: ForkServer, fast_dir: Path, tmp_path: Path, record_figure) -> None:
    faults_campaign = run_fault_campaign(server, fast_dir / "faults", SLOW_FAULT_KILLS, seed=11)
    timed_campaign = run_timed_campaign(server, fast_dir / "timed", SLOW_TIMED_KILLS, seed=12)
    disk_campaign = run_fault_campaign(server, tmp_path / "disk", SLOW_DISK_KILLS, seed=13)
    record_figure("slow_crash_fault_point_kills", _summary(faults_campaign))
    record_figure("slow_crash_timed_kills", _summary(timed_campaign))
    record_figure("slow_crash_disk_kills", _summary(disk_campaign))

    total = faults_campaign.kills + timed_campaign.kills + disk_campaign.kills
    assert total >= 1000


@pytest.mark.timeout(60)
def test_verify_after_abandoned_commit(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = CheckpointStore(root, chunk_bytes=1024, max_delta_chain=3, fsync=False)
    first = store.commit(make_state(0, 0), {"loss": 1.0, "model_version": "v1"})
    injector = Injector(action=raise_crash, spec=FaultSpec("replace", 1, where="_write_manifest"))
    with injector.installed(), pytest.raises(SimulatedCrash):
        store.commit(make_state(0, 1), {"loss": 0.5, "model_version": "v1"})

    restarted = CheckpointStore(root, chunk_bytes=1024, max_delta_chain=3, fsync=False)
    restarted.commit(make_state(1, 5), {"loss": 0.4, "model_version": "v1"})
    restarted.delete(first.checkpoint_id)
    report = restarted.verify()

    assert report.ok, f"verify reports unreferenced chunks of an abandoned commit as damage: {report.damaged}"


@pytest.mark.timeout(120)
def test_crash_env_var_self_kill(tmp_path: Path) -> None:
    job = {"root": str(tmp_path / "store"), "journal": str(tmp_path / "journal.jsonl"), "commits": 6}
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, CRASH_ENV: "replace@_write_manifest:3:after",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

    completed = subprocess.run([sys.executable, "-m", f"{__package__}.crash_worker", "run", str(job_path)],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=110)

    assert completed.returncode == -signal.SIGKILL, completed.stderr[-2000:]
    records = journal.read(job["journal"])
    assert records[-1]["event"] == "kill"
    check = check_restart(open_store(job), Path(job["journal"]))
    assert check.matched == "inflight"
