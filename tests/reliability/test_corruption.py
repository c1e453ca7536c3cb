"""Corruption of chunk and manifest files: every seeded mutation is detected, none yields wrong tensors.

Each mutation damages one or two files of a populated store: bit flips, truncation,
deletion, zero-filling, appended garbage, or the contents of two chunk files or two
manifests swapped. The store is then loaded, read checkpoint by checkpoint and
verified, and the outcome is compared with an oracle built from the pristine
manifests: a checkpoint is damaged when its manifest or any chunk it needs (delta
bases included) was touched.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cb_mobile import cli
from cb_mobile.errors import CheckpointError, CorruptCheckpointError, NoValidCheckpointError
from cb_mobile.manifest import parse_manifest

from .journal import content_digest
from .stores import PopulatedStore, populate

DEFAULT_MUTATIONS = 1000
SLOW_MUTATIONS = 5000
VERIFY_EVERY = 3
"""Run ``CheckpointStore.verify`` on every VERIFY_EVERY-th mutation; load and read run on all."""
CLI_EVERY = 10
"""Run ``cb-mobile verify`` in-process on every CLI_EVERY-th mutation."""

KINDS = ("bitflip", "truncate", "delete", "zero", "append", "swap")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    """What was done to which files."""

    kind: str
    target: str
    paths: tuple[Path, ...]
    detail: str

    def __str__(self) -> str:
        names = ", ".join(path.name for path in self.paths)
        return f"{self.kind} of {self.target} {names} ({self.detail})"


class Corruptor:
    """Seeded mutations of a populated store, each undone from a snapshot of the pristine files."""

    def __init__(self, populated: PopulatedStore, seed: int) -> None:
        self.populated = populated
        self.rng = random.Random(seed)
        self.chunks, self.manifests = populated.files()
        self.snapshot = {path: path.read_bytes() for path in self.chunks + self.manifests}

    def restore(self, mutation: Mutation) -> None:
        """Put back the pristine bytes of every file the mutation touched."""
        for path in mutation.paths:
            path.write_bytes(self.snapshot[path])

    def mutate(self) -> Mutation:
        """Damage one file (two for a swap) and return what was done; never a no-op."""
        while True:
            target = "chunk" if self.rng.random() < 0.6 else "manifest"
            files = self.chunks if target == "chunk" else self.manifests
            kind = self.rng.choice(KINDS)
            mutation = self._apply(kind, target, files)
            if mutation is not None:
                return mutation

    def _apply(self, kind: str, target: str, files: list[Path]) -> Mutation | None:
        rng = self.rng
        path = rng.choice(files)
        data = bytearray(self.snapshot[path])

        if kind == "swap":
            other = rng.choice(files)
            if other == path or self.snapshot[other] == self.snapshot[path]:
                return None
            path.write_bytes(self.snapshot[other])
            other.write_bytes(self.snapshot[path])
            return Mutation(kind, target, (path, other), "contents exchanged")

        if kind == "delete":
            path.unlink()
            return Mutation(kind, target, (path,), "file removed")

        if kind == "bitflip":
            flips = rng.randint(1, 3)
            positions = [rng.randrange(len(data) * 8) for _ in range(flips)]
            for bit in positions:
                data[bit // 8] ^= 1 << (bit % 8)
            detail = f"bits {positions}"
        elif kind == "truncate":
            length = rng.randrange(len(data))
            data = data[:length]
            detail = f"to {length} of {len(self.snapshot[path])} bytes"
        elif kind == "zero":
            start = rng.randrange(len(data))
            end = rng.choice([len(data), min(len(data), start + rng.randint(1, 64))])
            data[start:end] = bytes(end - start)
            detail = f"bytes {start}..{end}"
        else:
            extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            data += extra
            detail = f"{len(extra)} bytes appended"

        if bytes(data) == self.snapshot[path] or (target == "manifest" and self._same_document(path, bytes(data))):
            return None
        path.write_bytes(bytes(data))
        return Mutation(kind, target, (path,), detail)

    def _same_document(self, path: Path, data: bytes) -> bool:
        """Return whether manifest bytes still parse to the pristine JSON document.

        The manifest checksum covers the canonical JSON body, so a change that keeps the
        document (``e`` to ``E`` in an exponent, say) is no damage and is not drawn.
        """
        try:
            return json.loads(data) == json.loads(self.snapshot[path])
        except ValueError:
            return False


class Oracle:
    """Which checkpoints a set of damaged files breaks, from the pristine manifests."""

    def __init__(self, populated: PopulatedStore) -> None:
        self.populated = populated
        self.needs = populated.dependencies()
        self.bases: dict[Path, Path] = {}
        for path in (populated.manifest_path(checkpoint_id) for checkpoint_id in populated.ids):
            for chunk_id, record in parse_manifest(path.read_bytes(), str(path)).chunks.items():
                if record.base_id is not None:
                    self.bases[populated.chunk_path(chunk_id)] = populated.chunk_path(record.base_id)

    def broken(self, damaged: set[Path]) -> set[str]:
        """Return the checkpoints that need a damaged file."""
        return {checkpoint_id for checkpoint_id, files in self.needs.items() if files & damaged}

    def newest_intact(self, damaged: set[Path]) -> str | None:
        """Return the newest checkpoint that needs no damaged file."""
        broken = self.broken(damaged)
        intact = [checkpoint_id for checkpoint_id in self.populated.ids if checkpoint_id not in broken]
        return intact[-1] if intact else None

    def may_report(self, path: Path, damaged: set[Path]) -> bool:
        """Return whether verify may name ``path``: a damaged file, a broken manifest, or a delta of a damaged chunk."""
        if path in damaged:
            return True
        if path.suffix == ".json":
            return path.stem in self.broken(damaged)
        current: Path | None = path
        while current is not None:
            if current in damaged:
                return True
            current = self.bases.get(current)
        return False


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> PopulatedStore:
    """Six checkpoints with shared chunks, delta chains and quantized weights."""
    return populate(tmp_path_factory.mktemp("corruption") / "store", 6)


def check_mutation(populated: PopulatedStore, oracle: Oracle, mutation: Mutation,
                   caplog: pytest.LogCaptureFixture, tally: Counter, *, verify: bool = True) -> None:
    """Load, read and verify the mutated store, and compare every outcome with the oracle."""
    damaged = set(mutation.paths)
    broken = oracle.broken(damaged)
    expected = oracle.newest_intact(damaged)
    newest = populated.ids[-1]
    store = populated.open()
    context = f"after {mutation}"

    caplog.clear()
    try:
        info, tensors = store.read_latest()
    except NoValidCheckpointError:
        assert expected is None, f"read_latest found nothing valid {context}; {expected} is intact"
        tally["no_valid_checkpoint"] += 1
    else:
        assert info.checkpoint_id == expected, f"read_latest loaded {info.checkpoint_id} {context}; expected {expected}"
        assert content_digest(tensors) == populated.digests[expected], f"read_latest returned wrong tensors {context}"
        tally["fell_back" if expected != newest else "loaded_newest"] += 1

    manifest_deleted = mutation.kind == "delete" and mutation.target == "manifest"
    if newest in broken and not (manifest_deleted and mutation.paths[0].stem == newest):
        named = [path for path in damaged & oracle.needs[newest] if str(path) in caplog.text]
        assert named, f"read_latest did not log the damaged file {context}; log:\n{caplog.text}"

    for checkpoint_id in populated.ids:
        _check_read(store, populated, checkpoint_id, checkpoint_id in broken, mutation, damaged, tally)

    if verify:
        _check_verify(store, oracle, mutation, damaged, tally)
        tally["verify_runs"] += 1


def _check_read(store, populated: PopulatedStore, checkpoint_id: str, is_broken: bool, mutation: Mutation,
                damaged: set[Path], tally: Counter) -> None:
    """``read`` of a broken checkpoint raises and names a damaged file; an intact one returns the committed tensors."""
    context = f"read({checkpoint_id}) after {mutation}"
    try:
        tensors, _ = store.read(checkpoint_id)
    except CorruptCheckpointError as error:
        assert is_broken, f"{context} raised for an intact checkpoint: {error}"
        named = error.path is not None and Path(error.path) in damaged
        assert named or any(str(path) in str(error) for path in damaged), f"{context} does not name the damage: {error}"
        tally["read_raised_corrupt"] += 1
    except CheckpointError as error:
        manifest_deleted = mutation.kind == "delete" and populated.manifest_path(checkpoint_id) in damaged
        assert manifest_deleted, f"{context} raised {type(error).__name__} instead of CorruptCheckpointError: {error}"
        tally["read_not_found"] += 1
    else:
        assert not is_broken, f"{context} returned tensors although a file it needs is damaged"
        assert content_digest(tensors) == populated.digests[checkpoint_id], f"{context} returned wrong tensors"
        tally["read_intact"] += 1


def _check_verify(store, oracle: Oracle, mutation: Mutation, damaged: set[Path], tally: Counter) -> None:
    """``verify`` names every damaged file that still exists, mentions deleted chunks, and flags nothing else."""
    report = store.verify()
    reported = {Path(item.path) for item in report.damaged}
    text = "\n".join(f"{item.path}: {item.reason}" for item in report.damaged)
    context = f"verify after {mutation}"

    for path in damaged:
        if path.exists():
            assert path in reported, f"{context} does not name {path}; it reported:\n{text}"
        elif mutation.target == "chunk":
            assert path.name in text, f"{context} does not mention the deleted chunk {path.name}; it reported:\n{text}"
    for path in reported:
        assert oracle.may_report(path, damaged), f"{context} flags the intact file {path}"
    if mutation.kind == "delete" and mutation.target == "manifest":
        assert report.ok, f"{context}: deleting a manifest leaves only intact files, but verify reported:\n{text}"
    else:
        tally["verify_flagged"] += not report.ok


def _check_cli_verify(root: Path, mutation: Mutation, damaged: set[Path],
                      capsys: pytest.CaptureFixture) -> None:
    """``cb-mobile verify ROOT`` exits 1 and prints every damaged file (or deleted chunk id)."""
    capsys.readouterr()
    status = cli.main(["verify", str(root)])
    output = capsys.readouterr().out
    assert status == cli.EXIT_DAMAGED, f"cb-mobile verify exited {status} after {mutation}:\n{output}"
    for path in damaged:
        expected_text = str(path) if path.exists() else path.name
        assert expected_text in output, f"cb-mobile verify does not show {expected_text} after {mutation}:\n{output}"


def run_mutations(populated: PopulatedStore, count: int, seed: int, caplog: pytest.LogCaptureFixture,
                  capsys: pytest.CaptureFixture) -> Counter:
    """Apply ``count`` seeded mutations one at a time, checking and restoring after each."""
    corruptor = Corruptor(populated, seed)
    oracle = Oracle(populated)
    tally: Counter = Counter()

    with caplog.at_level(logging.WARNING, logger="cb_mobile.store"):
        for index in range(count):
            mutation = corruptor.mutate()
            try:
                check_mutation(populated, oracle, mutation, caplog, tally, verify=index % VERIFY_EVERY == 0)
                manifest_deleted = mutation.kind == "delete" and mutation.target == "manifest"
                if index % CLI_EVERY == 0 and not manifest_deleted:
                    _check_cli_verify(populated.root, mutation, set(mutation.paths), capsys)
                    tally["cli_verify_runs"] += 1
            finally:
                corruptor.restore(mutation)
            tally[f"{mutation.kind}:{mutation.target}"] += 1
            tally["mutations"] += 1
    return tally


@pytest.mark.timeout(300)
def test_corruption_detected(populated: PopulatedStore, caplog: pytest.LogCaptureFixture,
                             capsys: pytest.CaptureFixture, record_figure) -> None:
    tally = run_mutations(populated, DEFAULT_MUTATIONS, seed=7, caplog=caplog, capsys=capsys)
    record_figure("corruption_mutations", dict(tally))

    assert tally["mutations"] == DEFAULT_MUTATIONS
    assert tally["fell_back"] > 0
    assert tally["no_valid_checkpoint"] > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_corruption_detected_slow(populated: PopulatedStore, caplog: pytest.LogCaptureFixture,
                                  capsys: pytest.CaptureFixture, record_figure) -> None:
    tally = run_mutations(populated, SLOW_MUTATIONS, seed=1007, caplog=caplog, capsys=capsys)
    record_figure("slow_corruption_mutations", dict(tally))

    assert tally["mutations"] == SLOW_MUTATIONS


def test_corruption_all_manifests_damaged(tmp_path: Path) -> None:
    populated = populate(tmp_path / "store", 3)
    _, manifests = populated.files()
    for path in manifests:
        path.write_bytes(path.read_bytes()[:-5])

    with pytest.raises(NoValidCheckpointError, match="no checkpoint that reads cleanly"):
        populated.open().read_latest()


def test_corruption_cli_verify_subprocess(tmp_path: Path) -> None:
    populated = populate(tmp_path / "store", 2)
    chunks, manifests = populated.files()
    chunk, manifest = chunks[len(chunks) // 2], manifests[0]
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 0x10]))
    manifest.write_bytes(manifest.read_bytes()[:-3])

    command = [sys.executable, "-m", "cb_mobile.cli", "verify", str(populated.root)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)

    assert completed.returncode == cli.EXIT_DAMAGED, completed.stdout + completed.stderr
    assert str(chunk) in completed.stdout
    assert str(manifest) in completed.stdout


def test_corruption_clean_store_verifies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    populated = populate(tmp_path / "store", 3)

    status = cli.main(["verify", str(populated.root)])

    assert status == cli.EXIT_OK, capsys.readouterr().out


@pytest.mark.timeout(60)
def test_corruption_under_running_process(tmp_path: Path) -> None:
    populated = populate(tmp_path / "store", 2)
    store = populated.open()
    store.read_latest()
    manifest = parse_manifest(populated.manifest_path(populated.ids[-1]).read_bytes(), "newest")
    layout_chunk = populated.chunk_path(manifest.layout.chunks[-1])
    data = bytearray(layout_chunk.read_bytes())
    data[-1] ^= 0x01
    layout_chunk.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError) as raised:
        store.read(populated.ids[-1])

    assert raised.value.path == str(layout_chunk)


@pytest.fixture
def marker_store(tmp_path: Path) -> Iterator[PopulatedStore]:
    """A store whose ``store.json`` format marker the test may damage."""
    yield populate(tmp_path / "store", 1)


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"format": "other", "format_version": 1}',
                                     b'{"format": "cb-mobile-store", "format_version": 99}'])
def test_corruption_store_marker(marker_store: PopulatedStore, content: bytes) -> None:
    (marker_store.root / "store.json").write_bytes(content)

    with pytest.raises(CheckpointError, match="store.json"):
        marker_store.open()
