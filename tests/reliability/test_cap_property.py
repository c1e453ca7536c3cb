"""Storage cap as a property: random commits, deletes, gc and crashed commits never break the cap rules.

A hypothesis state machine drives one capped store with commits of random size, loss
and model version, deletes, gc, and commits abandoned midway (an os-level call raises
:class:`~.faults.SimulatedCrash`, after which the store is reopened). After every step:

- ``size_bytes()`` is at most the cap, unless the last commit was abandoned after its
  manifest rename and before eviction. The next finished commit restores the bound.
- the newest checkpoint the model expects loads, with the committed tensors;
- a checkpoint is evicted only when a stored checkpoint of its model version has the
  same or a lower loss, or a checkpoint of another model version was stored after it
  when eviction ran (``retain_best=1``). Eviction never drops the best loss of the
  current run of a model version;
- ``stats.skipped`` equals the number of commits that returned ``committed=False``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cb_mobile.errors import NoValidCheckpointError
from cb_mobile.store import CheckpointStore

from .faults import FaultSpec, Injector, SimulatedCrash, raise_crash
from .journal import content_digest
from .stores import make_state

CAP_BYTES = 40_000
STORE_KWARGS = {"cap_bytes": CAP_BYTES, "chunk_bytes": 1024, "max_delta_chain": 3, "retain_best": 1, "fsync": False}
CRASH_OPS = ("writev", "fsync", "link", "replace", "unlink", "open", "mkdir")

tally: dict[str, int] = {}


def _count(name: str) -> None:
    tally[name] = tally.get(name, 0) + 1


class CapMachine(RuleBasedStateMachine):
    """Model of one capped device store: what was committed with which loss and version, and what was removed."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="cb-cap-"))
        self.store = CheckpointStore(self.folder / "store", **STORE_KWARGS)
        self.digests: dict[str, str] = {}
        self.losses: dict[str, float] = {}
        self.versions: dict[str, str] = {}
        self.deleted: set[str] = set()
        self.evicted: set[str] = set()
        self.just_evicted: set[str] = set()
        self.step = 0
        self.skipped = 0
        self.over_cap_allowed = False

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # Model helpers ------------------------------------------------------------------

    def _alive(self) -> list[str]:
        return [info.checkpoint_id for info in self.store.checkpoints()]

    def _record_commit(self, checkpoint_id: str, tensors: dict, loss: float, version: str) -> None:
        self.digests[checkpoint_id] = content_digest(tensors)
        self.losses[checkpoint_id] = loss
        self.versions[checkpoint_id] = version

    def _state(self, size: int) -> dict:
        self.step += 1
        return make_state(5, self.step, noise_elements=size)

    # Rules --------------------------------------------------------------------------

    @initialize(size=st.integers(0, 2000))
    def first_commit(self, size: int) -> None:
        tensors = self._state(size)
        result = self.store.commit(tensors, {"loss": 1.0, "model_version": "v1"})
        assert result.committed, result.reason
        self._record_commit(result.checkpoint_id, tensors, 1.0, "v1")

    @rule(size=st.sampled_from([0, 100, 1000, 3000, 6000, 12000]) | st.integers(0, 12000),
          loss=st.floats(0.01, 10.0), version=st.sampled_from(["v1", "v1", "v1", "v2", "v3"]))
    def commit(self, size: int, loss: float, version: str) -> None:
        tensors = self._state(size)
        result = self.store.commit(tensors, {"loss": loss, "model_version": version})
        self.over_cap_allowed = False
        self.evicted.update(result.evicted)
        self.just_evicted = set(result.evicted)
        if result.committed:
            self._record_commit(result.checkpoint_id, tensors, loss, version)
            _count("committed")
        else:
            self.skipped += 1
            _count("skipped")
        if result.evicted:
            _count("commits_that_evicted")

    @rule(pick=st.integers(0, 1000))
    def delete(self, pick: int) -> None:
        alive = self._alive()
        if not alive:
            return
        victim = alive[pick % len(alive)]
        self.store.delete(victim)
        self.deleted.add(victim)
        _count("deleted")

    @rule()
    def gc(self) -> None:
        self.store.gc()
        _count("gc")

    @rule(size=st.integers(0, 6000), loss=st.floats(0.01, 10.0), version=st.sampled_from(["v1", "v2"]),
          op=st.sampled_from(CRASH_OPS), n=st.integers(1, 12), when=st.sampled_from(["before", "after"]))
    def crashed_commit(self, size: int, loss: float, version: str, op: str, n: int, when: str) -> None:
        before = set(self._alive())
        tensors = self._state(size)
        injector = Injector(action=raise_crash, spec=FaultSpec(op, n, when=when))
        crashed = False
        with injector.installed():
            try:
                result = self.store.commit(tensors, {"loss": loss, "model_version": version})
            except SimulatedCrash:
                crashed = True

        self.store = CheckpointStore(self.folder / "store", **STORE_KWARGS)
        self.skipped = 0
        if not crashed:
            self.over_cap_allowed = False
            self.evicted.update(result.evicted)
            self.just_evicted = set(result.evicted)
            if result.committed:
                self._record_commit(result.checkpoint_id, tensors, loss, version)
            _count("crash_point_not_reached")
            return

        _count("crashed")
        after = set(self._alive())
        self.evicted.update(before - after)
        self.just_evicted = before - after
        landed = [checkpoint_id for checkpoint_id in after if checkpoint_id not in before]
        assert len(landed) <= 1, f"an abandoned commit left several new checkpoints: {landed}"
        if landed:
            self._record_commit(landed[0], tensors, loss, version)
            self.over_cap_allowed = True
            _count("crashed_after_rename")

    # Invariants ---------------------------------------------------------------------

    @invariant()
    def under_cap(self) -> None:
        if not self.over_cap_allowed:
            size = self.store.size_bytes()
            assert size <= CAP_BYTES, f"store holds {size} bytes after a finished commit, cap is {CAP_BYTES}"

    @invariant()
    def newest_loads(self) -> None:
        removed = self.deleted | self.evicted
        alive = [checkpoint_id for checkpoint_id in self.digests if checkpoint_id not in removed]
        expected = max(alive, key=lambda checkpoint_id: int(checkpoint_id.split("-")[0]), default=None)
        try:
            info, tensors = self.store.read_latest()
        except NoValidCheckpointError:
            assert expected is None, f"no checkpoint loads, but {expected} was committed and not deleted"
            return
        assert info.checkpoint_id == expected, f"read_latest loaded {info.checkpoint_id}, expected {expected}"
        assert content_digest(tensors) == self.digests[expected], "read_latest returned wrong tensors"

    @invariant()
    def best_retained(self) -> None:
        evicted, self.just_evicted = self.just_evicted, set()
        stored = self.store.checkpoints()
        # Eviction saw the stored checkpoints plus the ones it removed in the same step.
        seen = [(int(info.checkpoint_id[:8]), info.model_version) for info in stored]
        seen += [(int(checkpoint_id[:8]), self.versions[checkpoint_id]) for checkpoint_id in evicted]
        for checkpoint_id in evicted:
            version, loss, seq = self.versions[checkpoint_id], self.losses[checkpoint_id], int(checkpoint_id[:8])
            as_good = [info.checkpoint_id for info in stored if info.model_version == version and info.loss <= loss]
            newer_version = [other for other, other_version in seen if other > seq and other_version != version]
            assert as_good or newer_version, (
                f"eviction dropped {checkpoint_id} (loss {loss}), the best checkpoint of model version {version}, "
                f"although no newer model version is stored: {[(info.checkpoint_id, info.loss) for info in stored]}")

    @invariant()
    def skips_counted(self) -> None:
        assert self.store.stats.skipped == self.skipped


def _run_machine(examples: int, steps: int, derandomize: bool) -> dict[str, int]:
    tally.clear()
    machine = settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                       derandomize=derandomize, suppress_health_check=list(HealthCheck))(CapMachine)
    test_case = machine.TestCase()
    test_case.runTest()
    return dict(tally)


@pytest.mark.timeout(300)
def test_cap_property(record_figure) -> None:
    counts = _run_machine(examples=30, steps=25, derandomize=True)
    record_figure("cap_property", counts)

    assert counts.get("skipped", 0) > 0
    assert counts.get("crashed", 0) > 0
    assert counts.get("commits_that_evicted", 0) > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cap_property_slow(record_figure) -> None:
    counts = _run_machine(examples=400, steps=40, derandomize=False)
    record_figure("slow_cap_property", counts)

    assert counts.get("crashed_after_rename", 0) > 0
