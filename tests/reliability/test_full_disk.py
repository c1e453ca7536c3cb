"""Full disk: a commit that runs out of space raises StoreWriteError and the previous checkpoint still loads.

Two variants. The tmpfs variant mounts a 2 MiB tmpfs, which needs root, so it is
skipped elsewhere. It fills the tmpfs to a range of levels and commits a checkpoint
that needs more than what is left. ENOSPC then lands in chunk writes, in the manifest
write or nowhere. The injected variant always runs. It makes one os-level call of a
commit fail with ENOSPC (or EIO, or EDQUOT), once for every such call the commit makes.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cb_mobile.errors import StoreWriteError
from cb_mobile.store import CheckpointStore

from .faults import FaultSpec, Injector, raise_oserror
from .journal import content_digest
from .stores import make_state

TMPFS_BYTES = 2 << 20
WRITE_OPS = ("open", "writev", "write", "fsync", "link", "replace", "rename", "mkdir")
"""Operations that can fail with ENOSPC; unlink and rmdir free space and are not injected."""


def _mount_tmpfs(folder: Path) -> str | None:
    """Mount a 2 MiB tmpfs on ``folder``; return why it failed, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    try:
        completed = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(folder)],
                                   capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"mount failed: {error}"
    if completed.returncode != 0:
        return f"mount failed: {completed.stderr.strip() or completed.returncode}"
    return None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test and unmounted afterwards; skips when it cannot be mounted."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    problem = _mount_tmpfs(folder)
    if problem is not None:
        pytest.skip(f"no small filesystem to fill: {problem}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _fill(folder: Path, leave: int) -> Path:
    """Write a filler file that leaves about ``leave`` bytes free on ``folder``'s filesystem."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    size = max(0, _free_bytes(folder) - leave)
    with open(filler, "wb") as handle:
        block = b"\xa5" * (64 << 10)
        while size > 0:
            try:
                size -= handle.write(block[: min(len(block), size)])
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                break
    return filler


def _assert_loads(store_root: Path, expected_id: str, expected_digest: str, context: str) -> None:
    store = CheckpointStore(store_root, chunk_bytes=4096, fsync=True)
    info, tensors = store.read_latest()
    assert info.checkpoint_id == expected_id, f"{context}: read_latest loaded {info.checkpoint_id}, expected {expected_id}"
    assert content_digest(tensors) == expected_digest, f"{context}: read_latest returned wrong tensors"


BIG_NOISE = 100_000
"""Elements of the incompressible tensor in the checkpoint that must not fit (about 400 KB of float32)."""


def _space_needed(small_disk: Path, store: CheckpointStore) -> int:
    """Commit a big checkpoint once, measure the free space it takes on the filesystem, then remove it."""
    before = _free_bytes(small_disk)
    result = store.commit(make_state(9, 0, noise_elements=BIG_NOISE), {"loss": 9.0, "model_version": "v1"})
    needed = before - _free_bytes(small_disk)
    store.delete(result.checkpoint_id)
    store.gc()
    return needed


@pytest.mark.timeout(120)
def test_full_disk_tmpfs(small_disk: Path, record_figure) -> None:
    root = small_disk / "store"
    store = CheckpointStore(root, chunk_bytes=4096, fsync=True)
    small = make_state(0, 0, noise_elements=1000)
    first = store.commit(small, {"loss": 1.0, "model_version": "v1"})
    last_id, last_digest = first.checkpoint_id, content_digest(small)
    needed = _space_needed(small_disk, store)
    tally: Counter = Counter()

    levels = [needed * tenth // 10 for tenth in range(11)] + [needed + (64 << 10)]
    for step, leave in enumerate(levels, start=1):
        filler = _fill(small_disk, leave)
        tensors = make_state(0, step, noise_elements=BIG_NOISE)
        try:
            result = store.commit(tensors, {"loss": 1.0 / step, "model_version": "v1"})
        except StoreWriteError as error:
            message = str(error)
            assert "No space left" in message, message
            assert "free space" in message, message
            assert str(root) in message, message
            tally["store_write_error"] += 1
            _assert_loads(root, last_id, last_digest, f"after ENOSPC with {leave} bytes left")
        else:
            assert result.committed, result.reason
            last_id, last_digest = result.checkpoint_id, content_digest(tensors)
            tally["committed"] += 1
            _assert_loads(root, last_id, last_digest, f"after a commit with {leave} bytes left")
        finally:
            filler.unlink()

        retry = make_state(1, step, noise_elements=1000)
        result = store.commit(retry, {"loss": 2.0, "model_version": "v1"})
        assert result.committed, f"commit after freeing space failed: {result.reason}"
        last_id, last_digest = result.checkpoint_id, content_digest(retry)
        for old in store.checkpoints()[:-1]:
            store.delete(old.checkpoint_id)

    record_figure("full_disk_tmpfs", {"fill_levels": len(levels), "bytes_needed": needed, **tally})
    assert tally["store_write_error"] > 0
    assert tally["committed"] > 0
    assert store.verify().ok


def _trace_commit(root: Path) -> list[tuple[str, int]]:
    """Return (operation, index) of every write-side call of a store's second commit, as the test makes it."""
    store = CheckpointStore(root, chunk_bytes=1024, fsync=True)
    store.commit(make_state(2, 0), {"loss": 1.0, "model_version": "v1"})
    injector = Injector(trace=True)
    with injector.installed():
        store.commit(make_state(2, 1), {"loss": 0.5, "model_version": "v1"})
    return [(event.op, event.index) for event in injector.events if event.op in WRITE_OPS]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
@pytest.mark.timeout(120)
def test_full_disk_injected(tmp_path: Path, code: int, record_figure) -> None:
    calls = _trace_commit(tmp_path / "trace")
    tally: Counter = Counter()

    for op, index in calls:
        root = tmp_path / f"{op}-{index}"
        store = CheckpointStore(root, chunk_bytes=1024, fsync=True)
        previous = make_state(2, 0)
        last_id = store.commit(previous, {"loss": 1.0, "model_version": "v1"}).checkpoint_id
        tensors = make_state(2, 1)
        context = f"{errno.errorcode[code]} at {op} #{index}"

        injector = Injector(action=raise_oserror(code), spec=FaultSpec(op, index))
        with injector.installed():
            try:
                store.commit(tensors, {"loss": 0.5, "model_version": "v1"})
            except StoreWriteError as error:
                assert os.strerror(code) in str(error), f"{context}: message lacks the cause: {error}"
                tally["store_write_error"] += 1
            else:
                tally["commit_returned"] += 1
        assert injector.hit is not None, f"{context}: the commit never made that call"

        reopened = CheckpointStore(root, chunk_bytes=1024, fsync=True)
        info, loaded = reopened.read_latest()
        if info.checkpoint_id == last_id:
            assert content_digest(loaded) == content_digest(previous), f"{context}: previous checkpoint changed"
        else:
            assert content_digest(loaded) == content_digest(tensors), f"{context}: new checkpoint has wrong tensors"
            tally["new_checkpoint_loaded"] += 1

        following = make_state(3, 2)
        result = reopened.commit(following, {"loss": 0.25, "model_version": "v1"})
        assert result.committed, f"{context}: the next commit failed: {result.reason}"
        assert reopened.read_latest()[0].checkpoint_id == result.checkpoint_id
        assert reopened.verify().ok, f"{context}: verify found damage after recovery"

    record_figure(f"full_disk_injected_{errno.errorcode[code]}", {"calls": len(calls), **tally})
    assert tally["store_write_error"] > 0


@pytest.mark.timeout(60)
def test_full_disk_on_store_creation(tmp_path: Path) -> None:
    injector = Injector(action=raise_oserror(errno.ENOSPC), spec=FaultSpec("open", 1))

    with injector.installed(), pytest.raises(StoreWriteError, match="free space"):
        CheckpointStore(tmp_path / "store")
