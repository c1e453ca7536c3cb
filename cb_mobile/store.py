"""Content-addressed checkpoint store: chunks, dedup, deltas, manifests, commit, cap, gc, verify.

Layout of a store root::

    store.json                          format marker
    lock                                fcntl lock file: commits share it, gc holds it alone
    chunks/<2 hex>/<64 hex>             chunk files, named by the BLAKE2b-256 of their content
    devices/<device_id>/manifests/<checkpoint_id>.json

A commit cuts every buffer into chunks and stores each chunk id once, across
checkpoints and across the devices that share the root. A changed chunk may be stored
as a delta against the same chunk of the device's previous checkpoint. Then the
manifest goes to a temporary file, which is fsynced and renamed, and the folder is
fsynced. That rename is the only commit point. Temporary files end in ``.tmp`` and
``gc`` removes them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cb_mobile.chunks import (
    COMPRESSOR_BY_LABEL,
    MAX_CHAIN_DEPTH,
    MAX_CHUNK_BYTES,
    ChunkReader,
    Compressor,
    EncodedChunk,
    Encoding,
    chunk_path,
    is_chunk_id,
)
from cb_mobile.codec import EncodedTensor
from cb_mobile.durable import (
    TMP_SUFFIX,
    create_new,
    file_size,
    fsync_dir,
    fsync_file,
    in_parallel,
    link_no_replace,
    read_bounded,
    temp_path,
    unlink_counting,
    unlink_quietly,
    write_all,
    write_error,
)
from cb_mobile.errors import CheckpointError, CorruptCheckpointError, NoValidCheckpointError, StoreWriteError
from cb_mobile.manifest import (
    ChunkRecord,
    Manifest,
    TensorSpec,
    buffer_name_problem,
    checkpoint_id_for,
    is_checkpoint_id,
    meta_problem,
    numpy_dtype_problem,
    parse_layout,
    parse_manifest,
    place_buffers,
    seq_of_checkpoint_id,
    shape_problem,
    tensor_name_problem,
    validate_device_id,
)
from cb_mobile.planner import PARALLEL_BYTES, BaseCache, CommitPlanner, Item, Plan, record_of, thread_pool

logger = logging.getLogger(__name__)

STORE_FORMAT = "cb-mobile-store"
STORE_VERSION = 1
MARKER_NAME = "store.json"
LOCK_NAME = "lock"
_WRITE_BATCH = 128
"""Chunk files written before their fsyncs, so the kernel can flush a batch at once."""
_MANIFEST_CACHE_ENTRIES = 8192


@dataclass(frozen=True)
class CommitResult:
    """Outcome of :meth:`CheckpointStore.commit`.

    Attributes
    ----------
    checkpoint_id : str or None
        Id of the new checkpoint, None when it was skipped.
    committed : bool
        Whether the manifest was written.
    reason : str
        Why the checkpoint was skipped, or a summary when it was committed.
    bytes_written : int
        Bytes of new chunk files and the manifest.
    logical_bytes : int
        Bytes of all buffers before chunking, compression and dedup.
    chunks_written, chunks_deduplicated, chunks_delta : int
        New chunk files, chunk references served by an existing chunk, and new chunk
        files stored as deltas.
    evicted : tuple of str
        Checkpoints removed to stay under the cap.
    store_bytes : int
        :meth:`CheckpointStore.size_bytes` after the commit.
    seconds : float
        Wall time of the commit.
    """

    checkpoint_id: str | None
    committed: bool
    reason: str
    bytes_written: int
    logical_bytes: int
    chunks_written: int
    chunks_deduplicated: int
    chunks_delta: int
    evicted: tuple[str, ...]
    store_bytes: int
    seconds: float


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint of a device, as listed by :meth:`CheckpointStore.checkpoints`.

    Attributes
    ----------
    checkpoint_id : str
        Id such as ``00000012-1a2b3c4d``; the number is the sequence number.
    seq : int
        Sequence number, increasing per device.
    meta : dict
        The JSON metadata given to :meth:`CheckpointStore.commit`.
    created : float
        Commit time, seconds since the epoch.
    tensor_names : tuple of str
        Names of the stored tensors, in commit order.
    stored_bytes : int
        Manifest plus every chunk file it references, delta bases included, each once.
    logical_bytes : int
        Bytes of all buffers before chunking, compression and dedup.
    path : str
        The manifest file.
    added_bytes : int
        Manifest plus the chunks no older checkpoint of the same device references:
        what this checkpoint added to the device after dedup and compression.
    """

    checkpoint_id: str
    seq: int
    meta: dict[str, Any]
    created: float
    tensor_names: tuple[str, ...]
    stored_bytes: int
    logical_bytes: int
    path: str = ""
    added_bytes: int = 0

    @property
    def loss(self) -> float | None:
        """Training loss recorded in ``meta``."""
        return self.meta.get("loss")

    @property
    def model_version(self) -> str:
        """Global model version recorded in ``meta``."""
        return str(self.meta.get("model_version"))


@dataclass
class StoreStats:
    """Counters of one :class:`CheckpointStore` object since it was created."""

    commits: int = 0
    skipped: int = 0
    chunks_written: int = 0
    chunks_deduplicated: int = 0
    chunks_delta: int = 0
    bytes_written: int = 0
    logical_bytes: int = 0
    evicted: int = 0
    commit_seconds: float = 0.0


@dataclass(frozen=True)
class DamagedFile:
    """A file that failed verification, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`CheckpointStore.verify`.

    Attributes
    ----------
    damaged : list of DamagedFile
        Every damaged chunk, manifest or unexpected file, with the reason.
    chunks_checked, manifests_checked : int
        Files checked.
    temp_files : int
        Temporary files left by interrupted writes; ``gc`` removes them.
    unreferenced_chunks : int
        Chunks no valid manifest references; ``gc`` removes them.
    """

    damaged: list[DamagedFile]
    chunks_checked: int
    manifests_checked: int
    temp_files: int
    unreferenced_chunks: int = 0

    @property
    def ok(self) -> bool:
        """Whether no file is damaged."""
        return not self.damaged


@dataclass(frozen=True)
class GcReport:
    """Result of :meth:`CheckpointStore.gc`."""

    chunks_removed: int
    chunk_bytes_freed: int
    temp_files_removed: int
    temp_bytes_freed: int
    live_chunks: int
    damaged_manifests: tuple[str, ...] = ()

    @property
    def bytes_freed(self) -> int:
        """Bytes freed in total."""
        return self.chunk_bytes_freed + self.temp_bytes_freed


@dataclass(frozen=True)
class StoreUsage:
    """Disk usage of a whole store root, all devices together.

    ``devices`` counts the devices with at least one valid checkpoint.
    """

    devices: int
    manifests: int
    manifest_bytes: int
    chunks: int
    chunk_bytes: int
    logical_bytes: int

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes of every checkpoint over the bytes on disk."""
        stored = self.manifest_bytes + self.chunk_bytes
        return self.logical_bytes / stored if stored else 0.0


@dataclass(frozen=True)
class _Entry:
    """A valid manifest on disk."""

    path: Path
    manifest: Manifest
    file_bytes: int

    @property
    def checkpoint_id(self) -> str:
        return self.manifest.checkpoint_id


_layout_cache: OrderedDict[tuple[str, ...], tuple[TensorSpec, ...]] = OrderedDict()
_LAYOUT_CACHE_ENTRIES = 64
_manifest_cache: OrderedDict[str, tuple[tuple[int, int, int], Manifest | str]] = OrderedDict()
_manifest_cache_lock = threading.Lock()


def list_devices(root: str | os.PathLike) -> list[str]:
    """Return the device ids that have a manifest folder under ``root``, sorted."""
    devices_dir = Path(root) / "devices"
    try:
        names = sorted(os.listdir(devices_dir))
    except FileNotFoundError:
        return []
    return [name for name in names if (devices_dir / name / "manifests").is_dir()]


class CheckpointStore:
    """Content-addressed, deduplicated, storage-capped checkpoint store of one device.

    Parameters
    ----------
    root : str or os.PathLike
        Store folder. Several devices (and processes) may share one root; chunks are
        then shared between them.
    device_id : str, default "device-0"
        This device's id: 1 to 128 letters, digits, ``_``, ``.`` or ``-``.
    cap_bytes : int or None, default None
        Most bytes this device's checkpoints may take, counted by :meth:`size_bytes`.
        None means no cap.
    chunk_bytes : int, default 4 MiB
        Chunk size. Smaller chunks find more duplicates; larger chunks cost fewer files,
        and so fewer file creations, renames and fsyncs per commit.
    max_delta_chain : int, default 16
        Maximum length of a delta chain. 0 stores every chunk in full. Chunks of 1 MiB
        or more follow at most 4 deltas, because a read decodes every base of a chain.
    retain_best : int, default 1
        Number of lowest-loss checkpoints of the latest model version that eviction
        keeps, counted over the checkpoints since that version began.
    fsync : bool, default True
        Whether to fsync files and folders. Turn it off only for tests and simulations
        that do not need durability against power loss.
    full_compressor : {"lz4", "zstd", "none"}, default "lz4"
        Compressor tried on full chunks; a chunk is stored raw when compression does not
        make it smaller, or when a trial on samples of a large chunk shows no gain.
    delta_compressor : {"zstd", "lz4", "none"}, default "zstd"
        Compressor tried on delta chunks.
    zstd_level : int, default 3
        zstd compression level.
    pack_below : int or None, default None
        Buffers smaller than this many bytes are concatenated into one pack stream,
        so tiny scales, biases and counters share chunks and deltas instead of paying
        a chunk file and a manifest row each. None uses ``chunk_bytes // 4``.
    workers : int or None, default None
        Threads that hash, compress and check chunks. None uses up to 4, bounded by
        the CPUs this process may run on. Pass 1 when many stores run side by side.
    create : bool, default True
        Create the root when it does not exist. With False, a folder that is not a
        store raises CheckpointError.

    Attributes
    ----------
    stats : StoreStats
        Counters of this object's commits.
    """

    def __init__(self, root: str | os.PathLike, *, device_id: str = "device-0", cap_bytes: int | None = None,
                 chunk_bytes: int = 1 << 22, max_delta_chain: int = 16, retain_best: int = 1, fsync: bool = True,
                 full_compressor: str = "lz4", delta_compressor: str = "zstd", zstd_level: int = 3,
                 workers: int | None = None, pack_below: int | None = None, create: bool = True) -> None:
        self.root = Path(root)
        self.device_id = validate_device_id(device_id)
        self.cap_bytes = _checked_int("cap_bytes", cap_bytes, 1, None, allow_none=True)
        self.chunk_bytes = _checked_int("chunk_bytes", chunk_bytes, 1, MAX_CHUNK_BYTES)
        self.max_delta_chain = _checked_int("max_delta_chain", max_delta_chain, 0, MAX_CHAIN_DEPTH)
        self.retain_best = _checked_int("retain_best", retain_best, 0, None)
        self.fsync = bool(fsync)
        self.full_compressor = _checked_compressor("full_compressor", full_compressor)
        self.delta_compressor = _checked_compressor("delta_compressor", delta_compressor)
        self.zstd_level = _checked_int("zstd_level", zstd_level, 1, 22)
        self.pack_below = _checked_int("pack_below", self.chunk_bytes // 4 if pack_below is None else pack_below, 0,
                                       MAX_CHUNK_BYTES)
        default_workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self.workers = _checked_int("workers", default_workers if workers is None else workers, 1, 64)
        self.stats = StoreStats()

        self._chunks_dir = self.root / "chunks"
        self._manifests_dir = self.root / "devices" / self.device_id / "manifests"
        self._open_root(create)

        self._records: dict[str, ChunkRecord] = {}
        self._base_cache: BaseCache | None = None
        self._known_dirs: set[Path] = set()
        self._planner = CommitPlanner(
            self._chunks_dir, self._records, _load_layout, chunk_bytes=self.chunk_bytes, pack_below=self.pack_below,
            max_delta_chain=self.max_delta_chain, full_compressor=self.full_compressor,
            delta_compressor=self.delta_compressor, zstd_level=self.zstd_level, workers=self.workers)

    def __repr__(self) -> str:
        return f"CheckpointStore(root={str(self.root)!r}, device_id={self.device_id!r}, cap_bytes={self.cap_bytes})"

    # ------------------------------------------------------------------ commit

    def commit(self, tensors: Mapping[str, EncodedTensor], meta: Mapping[str, Any]) -> CommitResult:
        """Store a checkpoint: chunks first, then the manifest as the single commit point.

        After the manifest is written, the oldest checkpoints that eviction may remove
        are removed until the device is under the cap, and chunks that no manifest
        under the root references any more are deleted.

        Parameters
        ----------
        tensors : Mapping of str to EncodedTensor
            Named encoded tensors.
        meta : Mapping
            JSON-serializable metadata with ``"loss"`` (finite float or None) and
            ``"model_version"`` (str).

        Returns
        -------
        CommitResult
            ``committed`` is False when the checkpoint, together with the checkpoints
            eviction must keep, does not fit under the cap. Nothing is written then.

        Raises
        ------
        CheckpointError
            ``tensors`` or ``meta`` is invalid.
        StoreWriteError
            A write failed, for example because the disk is full. The previous
            checkpoint is still readable.
        """
        started = time.perf_counter()
        meta = _checked_meta(meta)
        items = _checked_tensors(tensors)

        written: list[str] = []
        try:
            with self._lock(shared=True):
                result, candidates = self._commit_locked(items, meta, started, written)
        except StoreWriteError:
            self._collect(set(written), reason="a failed commit")
            raise

        self._collect(candidates, reason="eviction")
        return result

    def _commit_locked(self, items: list[Item],
                       meta: dict[str, Any], started: float,
                       written: list[str]) -> tuple[CommitResult, set[str]]:
        """Plan, fit-check and write a checkpoint while holding the shared lock."""
        entries, damaged = self._scan(self.device_id)
        previous = entries[-1] if entries else None
        seq = self._next_seq(previous, damaged)

        # Under a cap, eviction must be able to keep the latest checkpoint, the best
        # one and the new one. A delta pins its base chain, so once the previous
        # checkpoint with its chain takes a third of the cap, a new chain starts.
        base = previous
        if previous is not None and self.cap_bytes is not None and 3 * _footprint([previous]) > self.cap_bytes:
            base = None
        plan = self._planner.plan(items, checkpoint_id_for(seq, secrets.token_hex(4)), seq,
                                  base.manifest if base else None, str(base.path) if base else None,
                                  self._base_cache if base else None)
        manifest = plan.manifest(self.device_id, meta, self.chunk_bytes, self.pack_below)
        manifest_bytes = manifest.to_bytes()
        new_entry = _Entry(self._manifests_dir / f"{plan.checkpoint_id}.json", manifest, len(manifest_bytes))

        skip_reason = self._fit_problem(entries, new_entry)
        if skip_reason is not None and base is not None:
            # Delta chunks keep their base chains alive. Planned without bases, the
            # checkpoint may fit, and the chains of evicted checkpoints can go.
            plan = self._planner.plan(items, plan.checkpoint_id, seq, None, None, None)
            manifest = plan.manifest(self.device_id, meta, self.chunk_bytes, self.pack_below)
            manifest_bytes = manifest.to_bytes()
            new_entry = _Entry(new_entry.path, manifest, len(manifest_bytes))
            skip_reason = self._fit_problem(entries, new_entry)
        if skip_reason is not None:
            return self._skip(entries, plan, skip_reason, started)

        self._write_chunks(plan, written)
        if plan.records_changed:
            manifest = plan.manifest(self.device_id, meta, self.chunk_bytes, self.pack_below)
            manifest_bytes = manifest.to_bytes()
            new_entry = _Entry(new_entry.path, manifest, len(manifest_bytes))
        self._write_manifest(new_entry.path, manifest_bytes)

        keep = self._retained(entries + [new_entry]) | ({previous.checkpoint_id} if previous else set())
        evicted = self._evict(entries + [new_entry], keep)
        remaining = [entry for entry in entries + [new_entry] if entry not in evicted]
        candidates = {chunk_id for entry in evicted for chunk_id in entry.manifest.chunks}
        if plan.base_buffers is not None:
            chunks = {key: tuple(ids) for key, ids in plan.streams.items()}
            self._base_cache = BaseCache(plan.checkpoint_id, plan.base_buffers, chunks)
        return self._committed(plan, new_entry, evicted, _footprint(remaining), started), candidates

    def _committed(self, plan: Plan, entry: _Entry, evicted: list[_Entry], store_bytes: int,
                   started: float) -> CommitResult:
        """Count and log a committed checkpoint."""
        new_bytes = sum(chunk.stored_bytes for chunk in plan.new_chunks.values()) + entry.file_bytes
        deltas = sum(chunk.encoding is not Encoding.FULL for chunk in plan.new_chunks.values())
        seconds = time.perf_counter() - started
        evicted_ids = tuple(e.checkpoint_id for e in evicted)

        self.stats.commits += 1
        self.stats.chunks_written += len(plan.new_chunks)
        self.stats.chunks_deduplicated += plan.deduplicated
        self.stats.chunks_delta += deltas
        self.stats.bytes_written += new_bytes
        self.stats.logical_bytes += plan.logical_bytes
        self.stats.evicted += len(evicted)
        self.stats.commit_seconds += seconds

        logger.debug("device %s: committed checkpoint %s: %d new chunks (%d delta), %d deduplicated, %d bytes written",
                     self.device_id, plan.checkpoint_id, len(plan.new_chunks), deltas, plan.deduplicated, new_bytes)
        for evicted_entry in evicted:
            logger.info("device %s: evicted checkpoint %s to stay under the cap of %d bytes",
                        self.device_id, evicted_entry.checkpoint_id, self.cap_bytes)

        reason = "committed" + (f", evicted {len(evicted)} older checkpoint(s) to stay under the cap" if evicted else "")
        return CommitResult(plan.checkpoint_id, True, reason, new_bytes, plan.logical_bytes, len(plan.new_chunks),
                            plan.deduplicated, deltas, evicted_ids, store_bytes, seconds)

    def _skip(self, entries: list[_Entry], plan: Plan, reason: str,
              started: float) -> tuple[CommitResult, set[str]]:
        """Count and log a skipped checkpoint; still evict old checkpoints if the device is over the cap."""
        evicted = self._evict(entries, self._retained(entries)) if entries else []
        remaining = [entry for entry in entries if entry not in evicted]
        candidates = {chunk_id for entry in evicted for chunk_id in entry.manifest.chunks}
        seconds = time.perf_counter() - started

        self.stats.skipped += 1
        self.stats.evicted += len(evicted)
        logger.warning("device %s: skipped checkpoint seq %d: %s", self.device_id, plan.seq, reason)

        result = CommitResult(None, False, reason, 0, plan.logical_bytes, 0, plan.deduplicated, 0,
                              tuple(e.checkpoint_id for e in evicted), _footprint(remaining), seconds)
        return result, candidates

    # ---------------------------------------------------------------- planning

    def _next_seq(self, previous: _Entry | None, damaged: list[tuple[Path, str]]) -> int:
        """Return a sequence number above every manifest of this device, damaged ones included."""
        seqs = [previous.manifest.seq] if previous else []
        for path, _ in damaged:
            seq = seq_of_checkpoint_id(path.name.removesuffix(".json"))
            if seq is not None:
                seqs.append(seq)
        return max(seqs, default=0) + 1

    # ------------------------------------------------------------ cap, evict

    def _retained(self, entries: Sequence[_Entry]) -> set[str]:
        """Return the checkpoints eviction must keep: the newest one and the best-loss ones of its model version.

        Only the newest run of that version counts, meaning the checkpoints since the
        model version last changed. A checkpoint from an earlier stint under the same
        version string belongs to an older model and may be evicted.
        """
        latest = entries[-1]
        version = latest.manifest.meta.get("model_version")
        run = []
        for entry in reversed(entries):
            if entry.manifest.meta.get("model_version") != version:
                break
            run.append(entry)

        candidates = [entry for entry in run if entry.manifest.meta.get("loss") is not None]
        candidates.sort(key=lambda entry: (entry.manifest.meta["loss"], -entry.manifest.seq))
        return {latest.checkpoint_id} | {entry.checkpoint_id for entry in candidates[: self.retain_best]}

    def _fit_problem(self, entries: list[_Entry], new_entry: _Entry) -> str | None:
        """Return why ``new_entry`` cannot be committed under the cap, or None when it fits."""
        if self.cap_bytes is None:
            return None

        alone = _footprint([new_entry])
        if alone > self.cap_bytes:
            return f"the checkpoint needs {alone} bytes, more than the cap of {self.cap_bytes} bytes"

        keep = self._retained(entries + [new_entry])
        if entries:
            keep.add(entries[-1].checkpoint_id)
        kept = [entry for entry in entries if entry.checkpoint_id in keep] + [new_entry]
        needed = _footprint(kept)
        if needed > self.cap_bytes:
            kept_ids = ", ".join(entry.checkpoint_id for entry in kept[:-1])
            return (f"the checkpoint needs {needed} bytes together with the checkpoints that must be kept "
                    f"({kept_ids}), more than the cap of {self.cap_bytes} bytes")
        return None

    def _evict(self, entries: list[_Entry], keep: set[str]) -> list[_Entry]:
        """Delete the oldest manifests not in ``keep`` until the device is under the cap."""
        if self.cap_bytes is None:
            return []

        references = Counter(chunk_id for entry in entries for chunk_id in entry.manifest.chunks)
        sizes = {chunk_id: record.stored_bytes for entry in entries for chunk_id, record in entry.manifest.chunks.items()}
        total = _footprint(entries)
        evicted = []
        for entry in entries:
            if total <= self.cap_bytes:
                break
            if entry.checkpoint_id in keep:
                continue

            try:
                unlink_quietly(entry.path)
            except OSError as error:
                logger.warning("device %s: could not evict checkpoint %s: %s", self.device_id, entry.checkpoint_id,
                               error)
                continue
            evicted.append(entry)
            total -= entry.file_bytes
            for chunk_id in entry.manifest.chunks:
                references[chunk_id] -= 1
                if references[chunk_id] == 0:
                    total -= sizes[chunk_id]

        if evicted and self.fsync:
            fsync_dir(self._manifests_dir)
        if total > self.cap_bytes:
            logger.warning("device %s: %d bytes stay above the cap of %d bytes because the newest and best-loss "
                           "checkpoints are kept", self.device_id, total, self.cap_bytes)
        return evicted

    # ----------------------------------------------------------------- writes

    def _write_chunks(self, plan: Plan, published: list[str]) -> None:
        """Write the plan's new chunks in batches: write, fsync each, publish each, fsync the folders.

        Appends the id of each chunk given its final name to ``published`` as it goes,
        so the caller can remove them if a later write fails.
        """
        touched: set[Path] = set()
        chunks = list(plan.new_chunks.values())
        for start in range(0, len(chunks), _WRITE_BATCH):
            batch = chunks[start:start + _WRITE_BATCH]
            self._write_batch(batch, plan.repairs, published)
            touched.update(chunk_path(self._chunks_dir, chunk.chunk_id).parent for chunk in batch)
            for chunk in batch:
                self._adopt_if_replaced(plan, chunk.chunk_id)

        if self.fsync:
            in_parallel(lambda folder: fsync_dir(folder, strict=True), touched)

    def _write_batch(self, batch: list[EncodedChunk], repairs: set[str], published: list[str]) -> None:
        """Write one batch of chunk files to temporary names, fsync them, then link them into place."""
        pending: list[tuple[int | None, Path, Path]] = []
        try:
            for chunk in batch:
                final = chunk_path(self._chunks_dir, chunk.chunk_id)
                self._ensure_dir(final.parent)
                temp = temp_path(final)
                pending.append((create_new(temp), temp, final))
                write_all(pending[-1][0], (chunk.header, chunk.payload), temp)

            if self.fsync:
                in_parallel(lambda item: fsync_file(item[0], item[1]), pending)
            for index, (fd, temp, final) in enumerate(pending):
                os.close(fd)
                pending[index] = (None, temp, final)

            for _, temp, final in pending:
                self._publish(temp, final, final.name in repairs)
                published.append(final.name)
        finally:
            for fd, temp, _ in pending:
                if fd is not None:
                    os.close(fd)
                unlink_quietly(temp)

    def _publish(self, temp: Path, final: Path, replace: bool) -> None:
        """Give a written chunk its final name without replacing a chunk another process wrote meanwhile."""
        try:
            if replace:
                os.replace(temp, final)
            else:
                link_no_replace(temp, final)
        except OSError as error:
            raise write_error(final, error) from error

    def _adopt_if_replaced(self, plan: Plan, chunk_id: str) -> None:
        """Use the record of the chunk file on disk when another process published the same chunk first."""
        chunk = plan.new_chunks[chunk_id]
        size = file_size(chunk_path(self._chunks_dir, chunk_id))
        if size == chunk.stored_bytes:
            self._records[chunk_id] = record_of(chunk)
            return

        # NOTE: the fit check before the write used our encoding's size; the other
        # process's encoding can differ by a few bytes, which eviction absorbs.
        chain = self._planner.existing_chain(chunk_id)
        if chain is not None:
            plan.records.update((record.chunk_id, record) for record in chain)
            plan.records_changed = True

    def _write_manifest(self, path: Path, data: bytes) -> None:
        """Write a manifest: temporary file, fsync, rename, fsync the folder. The rename commits."""
        temp = temp_path(path)
        fd: int | None = None
        try:
            fd = create_new(temp)
            write_all(fd, (data,), temp)
            if self.fsync:
                fsync_file(fd, temp)
            os.close(fd)
            fd = None
            try:
                os.replace(temp, path)
            except OSError as error:
                raise write_error(path, error) from error
        finally:
            if fd is not None:
                os.close(fd)
            unlink_quietly(temp)

        if self.fsync:
            fsync_dir(self._manifests_dir, strict=True)

    def _ensure_dir(self, folder: Path) -> None:
        """Create a chunk subfolder once per store object."""
        if folder in self._known_dirs:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(folder, error) from error
        self._known_dirs.add(folder)

    # ------------------------------------------------------------------ reads

    def checkpoints(self) -> list[CheckpointInfo]:
        """Return this device's committed checkpoints whose manifests parse and pass their checksum, oldest first."""
        entries, _ = self._scan(self.device_id)
        reader = ChunkReader(self._chunks_dir)
        infos = []
        seen: set[str] = set()
        for entry in entries:
            added = entry.file_bytes + sum(record.stored_bytes for chunk_id, record in entry.manifest.chunks.items()
                                           if chunk_id not in seen)
            seen.update(entry.manifest.chunks)
            try:
                layout = _load_layout(entry.manifest, reader, str(entry.path))
            except CorruptCheckpointError as error:
                logger.warning("device %s: checkpoint %s is not listed because its layout is damaged: %s",
                               self.device_id, entry.checkpoint_id, error)
                continue
            infos.append(_info(entry, layout, added))
        return infos

    def read(self, checkpoint_id: str) -> tuple[dict[str, EncodedTensor], dict[str, Any]]:
        """Read one checkpoint, verifying the manifest and every chunk.

        Returns
        -------
        tuple of dict and dict
            The encoded tensors by name and the checkpoint's meta.

        Raises
        ------
        CheckpointError
            ``checkpoint_id`` is malformed or not found for this device.
        CorruptCheckpointError
            The manifest or a chunk is damaged or missing; ``path`` names the file.
        """
        _, manifest, tensors = self._read_entry(checkpoint_id)
        return tensors, dict(manifest.meta)

    def read_latest(self) -> tuple[CheckpointInfo, dict[str, EncodedTensor]]:
        """Read the newest checkpoint that reads cleanly, logging each damaged one it skips.

        Raises
        ------
        NoValidCheckpointError
            No checkpoint of this device reads cleanly.
        """
        entries, damaged = self._scan(self.device_id, fresh=True)
        for path, reason in damaged:
            logger.warning("device %s: skipping damaged manifest %s: %s", self.device_id, path, reason)

        for entry in reversed(entries):
            try:
                info, _, tensors = self._read_entry(entry.checkpoint_id)
            except CorruptCheckpointError as error:
                logger.warning("device %s: checkpoint %s is damaged (file %s: %s); trying an older one",
                               self.device_id, entry.checkpoint_id, error.path, error)
                continue
            return info, tensors

        raise NoValidCheckpointError(
            f"device {self.device_id} has no checkpoint that reads cleanly under {self.root} "
            f"({len(entries)} valid manifest(s), {len(damaged)} damaged); run `cb-mobile verify {self.root}` "
            "to list the damaged files")

    def _read_entry(self, checkpoint_id: str) -> tuple[CheckpointInfo, Manifest, dict[str, EncodedTensor]]:
        """Parse one manifest afresh and decode its chunks, under the shared lock."""
        if not is_checkpoint_id(checkpoint_id):
            raise CheckpointError(f"invalid checkpoint id {checkpoint_id!r}; ids look like 00000012-1a2b3c4d")
        path = self._manifests_dir / f"{checkpoint_id}.json"

        with self._lock(shared=True):
            entry = self._load_entry(path, checkpoint_id)
            layout, tensors = self._decode(entry)
        return _info(entry, layout), entry.manifest, tensors

    def _load_entry(self, path: Path, checkpoint_id: str) -> _Entry:
        """Read and validate one manifest file of this device."""
        try:
            data = read_bounded(path)
        except FileNotFoundError as error:
            raise CheckpointError(
                f"checkpoint {checkpoint_id} of device {self.device_id} not found under {self.root}; "
                f"run `cb-mobile inspect {self.root}` to list checkpoints") from error
        except OSError as error:
            raise CorruptCheckpointError(f"manifest {path} cannot be read: {error}", str(path)) from error
        manifest = parse_manifest(data, str(path), expected_id=checkpoint_id, expected_device=self.device_id)
        return _Entry(path, manifest, len(data))

    def _decode(self, entry: _Entry) -> tuple[tuple[TensorSpec, ...], dict[str, EncodedTensor]]:
        """Load and check every chunk of a checkpoint into fresh, writable numpy buffers."""
        manifest, path = entry.manifest, str(entry.path)
        reader = ChunkReader(self._chunks_dir)
        layout = _load_layout(manifest, reader, path, fresh=True)
        placements = place_buffers(manifest, layout, path)

        pack = np.empty(manifest.pack.nbytes, dtype=np.uint8)
        copies = self._chunk_targets(pack, manifest.pack.chunks, manifest.chunk_bytes)
        arrays = []
        for placement in placements:
            if placement.chunks is None:
                start = placement.pack_offset
                arrays.append(pack[start:start + placement.buffer.nbytes])
                continue
            out = np.empty(placement.buffer.nbytes, dtype=np.uint8)
            copies += self._chunk_targets(out, placement.chunks, manifest.chunk_bytes)
            arrays.append(out)

        def copy_chunk(target: tuple[memoryview, str]) -> None:
            view, chunk_id = target
            content = reader.load(chunk_id)
            if len(content) != len(view):
                raise CorruptCheckpointError(f"manifest {path} expects {len(view)} bytes in chunk {chunk_id}, "
                                             f"which holds {len(content)}", path)
            view[:] = content

        workers = self.workers if len(copies) > 1 and sum(len(view) for view, _ in copies) >= PARALLEL_BYTES else 1
        with thread_pool(workers) as pool:
            for _ in pool.map(copy_chunk, copies):
                pass

        tensors: dict[str, EncodedTensor] = {}
        for placement, raw in zip(placements, arrays):
            spec = placement.tensor
            if spec.name not in tensors:
                tensors[spec.name] = EncodedTensor(codec=dict(spec.codec), shape=spec.shape, dtype=spec.dtype, buffers={})
            array = raw.copy() if placement.chunks is None else raw
            tensors[spec.name].buffers[placement.buffer.name] = array.view(np.dtype(placement.buffer.dtype)).reshape(
                placement.buffer.shape)
        for spec in layout:
            tensors.setdefault(spec.name, EncodedTensor(codec=dict(spec.codec), shape=spec.shape, dtype=spec.dtype,
                                                        buffers={}))
        return layout, {spec.name: tensors[spec.name] for spec in layout}

    @staticmethod
    def _chunk_targets(out: np.ndarray, chunk_ids: Sequence[str], chunk_bytes: int) -> list[tuple[memoryview, str]]:
        """Pair each chunk id with the slice of ``out`` its content goes to."""
        view = memoryview(out)
        return [(view[index * chunk_bytes:(index + 1) * chunk_bytes], chunk_id) for index, chunk_id in enumerate(chunk_ids)]

    # ------------------------------------------------------- delete, gc, size

    def delete(self, checkpoint_id: str) -> None:
        """Delete one checkpoint of this device and the chunks nothing else references.

        Raises
        ------
        CheckpointError
            ``checkpoint_id`` is malformed or not found for this device.
        """
        if not is_checkpoint_id(checkpoint_id):
            raise CheckpointError(f"invalid checkpoint id {checkpoint_id!r}; ids look like 00000012-1a2b3c4d")
        path = self._manifests_dir / f"{checkpoint_id}.json"

        entries, _ = self._scan(self.device_id)
        candidates = {chunk_id for entry in entries if entry.path == path for chunk_id in entry.manifest.chunks}
        try:
            os.unlink(path)
        except FileNotFoundError as error:
            raise CheckpointError(f"checkpoint {checkpoint_id} of device {self.device_id} not found under "
                                  f"{self.root}") from error
        if self.fsync:
            fsync_dir(self._manifests_dir)

        if self._base_cache is not None and self._base_cache.checkpoint_id == checkpoint_id:
            self._base_cache = None
        logger.info("device %s: deleted checkpoint %s", self.device_id, checkpoint_id)
        self._collect(candidates, reason=f"deleting checkpoint {checkpoint_id}")

    def gc(self) -> GcReport:
        """Remove chunks that no valid manifest of any device references, and all temporary files.

        Holds the exclusive lock, so no commit is writing while it runs and every
        temporary file it finds is left over from a process that died.
        """
        with self._lock(shared=False):
            live, damaged = self._live_chunks()
            removed = freed = temp_removed = temp_freed = 0

            for path in self._walk_files():
                if path.name.endswith(TMP_SUFFIX):
                    temp_freed += unlink_counting(path)
                    temp_removed += 1
                elif path.parent.parent == self._chunks_dir and is_chunk_id(path.name) and path.name not in live:
                    freed += unlink_counting(path)
                    removed += 1

        for path in damaged:
            logger.warning("gc ignored damaged manifest %s; the chunks only it references were removed", path)
        logger.info("gc of %s removed %d unreferenced chunks (%d bytes) and %d temporary files (%d bytes)",
                     self.root, removed, freed, temp_removed, temp_freed)
        return GcReport(removed, freed, temp_removed, temp_freed, len(live), tuple(str(path) for path in damaged))

    def _collect(self, candidates: set[str], *, reason: str) -> None:
        """Delete the ``candidates`` chunks that no valid manifest under the root references."""
        if not candidates:
            return
        try:
            with self._lock(shared=False):
                live, _ = self._live_chunks()
                # Deltas go before their bases, so a kill halfway never leaves a delta without its base.
                unused = sorted(candidates - live, key=self._chain_depth, reverse=True)
                freed = sum(unlink_counting(chunk_path(self._chunks_dir, chunk_id)) for chunk_id in unused)
        except OSError as error:
            logger.warning("device %s: could not remove chunks left by %s: %s; run `cb-mobile gc %s`",
                           self.device_id, reason, error, self.root)
            return
        for chunk_id in unused:
            self._records.pop(chunk_id, None)
        if unused:
            logger.debug("device %s: removed %d chunks (%d bytes) left by %s", self.device_id, len(unused), freed, reason)

    def _chain_depth(self, chunk_id: str) -> int:
        """Return the delta chain depth of a chunk known from a manifest or a write, else 0."""
        record = self._records.get(chunk_id)
        return record.depth if record is not None else 0

    def size_bytes(self) -> int:
        """Return the bytes of this device's manifests plus every chunk they reference, delta bases included, each once."""
        entries, _ = self._scan(self.device_id)
        return _footprint(entries)

    def usage(self) -> StoreUsage:
        """Return the disk usage of the whole root, all devices together."""
        devices = manifests = manifest_bytes = logical = chunks = chunk_bytes = 0
        for device_id in list_devices(self.root):
            entries, _ = self._scan(device_id)
            devices += bool(entries)
            manifests += len(entries)
            manifest_bytes += sum(entry.file_bytes for entry in entries)
            logical += sum(entry.manifest.logical_bytes for entry in entries)

        for path in self._walk_files(manifests=False):
            if is_chunk_id(path.name):
                chunks += 1
                chunk_bytes += file_size(path)
        return StoreUsage(devices, manifests, manifest_bytes, chunks, chunk_bytes, logical)

    # ---------------------------------------------------------------- verify

    def verify(self) -> VerifyReport:
        """Check every chunk and every manifest under the root.

        Each chunk that a valid manifest references must pass its header and payload
        checksums, have its delta base present and intact, and decode to content that
        hashes to its id. Each manifest must parse, pass its checksum, and reference
        only chunks that are present and intact. A chunk that no manifest references,
        such as one left by a commit that never finished, is only checked on its own
        file, because its delta base may already be collected. Temporary files are
        counted, not reported as damage.
        """
        damaged: list[DamagedFile] = []
        bad_chunks: dict[str, str] = {}
        reader = ChunkReader(self._chunks_dir)
        chunks_checked = temp_files = unreferenced = 0

        with self._lock(shared=True):
            live, _ = self._live_chunks()
            for path in self._walk_files(manifests=False):
                if path.name.endswith(TMP_SUFFIX):
                    temp_files += 1
                    continue
                if not is_chunk_id(path.name) or path.parent.name != path.name[:2]:
                    damaged.append(DamagedFile(str(path), "unexpected file in the chunk folder"))
                    continue

                chunks_checked += 1
                unreferenced += path.name not in live
                try:
                    if path.name in live:
                        reader.load(path.name)
                    else:
                        reader.check_file(path.name)
                except CorruptCheckpointError as error:
                    bad_chunks[path.name] = _reason(error, str(path))

            manifests_checked, manifest_damage, temp_manifests = self._verify_manifests(bad_chunks, reader)

        for chunk_id, reason in bad_chunks.items():
            if chunk_id not in live:
                reason += "; no valid manifest references it, so `cb-mobile gc` removes it"
            damaged.append(DamagedFile(str(chunk_path(self._chunks_dir, chunk_id)), reason))
        damaged.extend(manifest_damage)
        return VerifyReport(damaged, chunks_checked, manifests_checked, temp_files + temp_manifests, unreferenced)

    def _verify_manifests(self, bad_chunks: dict[str, str], reader: ChunkReader) -> tuple[int, list[DamagedFile], int]:
        """Check every manifest of every device against the chunk files."""
        damaged = []
        checked = temp_files = 0
        for device_id in list_devices(self.root):
            folder = self.root / "devices" / device_id / "manifests"
            for name in sorted(os.listdir(folder)):
                path = folder / name
                if name.endswith(TMP_SUFFIX):
                    temp_files += 1
                    continue
                checked += 1
                problem = self._manifest_problem(path, device_id, bad_chunks, reader)
                if problem is not None:
                    damaged.append(DamagedFile(str(path), problem))
        return checked, damaged, temp_files

    def _manifest_problem(self, path: Path, device_id: str, bad_chunks: dict[str, str],
                          reader: ChunkReader) -> str | None:
        """Return why one manifest is damaged, or None when it and its chunks are intact."""
        checkpoint_id = path.name.removesuffix(".json")
        if not path.name.endswith(".json") or not is_checkpoint_id(checkpoint_id):
            return "unexpected file in the manifest folder"
        try:
            manifest = parse_manifest(read_bounded(path), str(path), expected_id=checkpoint_id,
                                      expected_device=device_id)
        except (OSError, CorruptCheckpointError) as error:
            return _reason(error, str(path))

        for chunk_id in manifest.chunks:
            if chunk_id in bad_chunks:
                return f"references damaged chunk {chunk_id}"
            if not chunk_path(self._chunks_dir, chunk_id).exists():
                return f"references missing chunk {chunk_id}"

        try:
            place_buffers(manifest, _load_layout(manifest, reader, str(path)), str(path))
        except CorruptCheckpointError as error:
            return _reason(error, str(path))
        return None

    # --------------------------------------------------------------- helpers

    def _open_root(self, create: bool) -> None:
        """Create the root layout, or check that an existing folder is a store."""
        marker = self.root / MARKER_NAME
        if not marker.exists():
            if not create:
                raise CheckpointError(f"{self.root} is not a cb-mobile store (no {MARKER_NAME}); "
                                      "pass the folder given to CheckpointStore as root")
            try:
                self._chunks_dir.mkdir(parents=True, exist_ok=True)
                self._manifests_dir.mkdir(parents=True, exist_ok=True)
                temp = temp_path(marker)
                temp.write_text(json.dumps({"format": STORE_FORMAT, "format_version": STORE_VERSION}) + "\n")
                os.replace(temp, marker)
            except OSError as error:
                raise write_error(self.root, error) from error
            return

        try:
            marker_data = json.loads(read_bounded(marker, 1 << 16))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{marker} cannot be read ({error}); is {self.root} a cb-mobile store?") from error
        version = marker_data.get("format_version") if isinstance(marker_data, dict) else None
        if not isinstance(marker_data, dict) or marker_data.get("format") != STORE_FORMAT or version != STORE_VERSION:
            raise CheckpointError(f"{marker} describes format {marker_data!r}; this cb_mobile reads "
                                  f"{STORE_FORMAT} version {STORE_VERSION}")
        if create:
            try:
                self._manifests_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise write_error(self._manifests_dir, error) from error

    @contextmanager
    def _lock(self, *, shared: bool) -> Iterator[None]:
        """Hold the root's fcntl lock: shared for commits and reads, exclusive for gc."""
        path = self.root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise write_error(path, error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _scan(self, device_id: str, *, fresh: bool = False) -> tuple[list[_Entry], list[tuple[Path, str]]]:
        """Return a device's valid manifests by sequence number and its damaged ones with reasons."""
        folder = self.root / "devices" / device_id / "manifests"
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return [], []

        entries, damaged = [], []
        for name in names:
            if name.endswith(TMP_SUFFIX):
                continue
            path = folder / name
            checkpoint_id = name.removesuffix(".json")
            if not name.endswith(".json") or not is_checkpoint_id(checkpoint_id):
                damaged.append((path, "unexpected file in the manifest folder"))
                continue
            parsed = _cached_manifest(path, checkpoint_id, device_id, fresh)
            if parsed is None:
                continue
            if isinstance(parsed[0], str):
                damaged.append((path, parsed[0]))
                continue
            entries.append(_Entry(path, parsed[0], parsed[1]))
            if device_id == self.device_id:
                self._records.update(parsed[0].chunks)

        entries.sort(key=lambda entry: entry.manifest.seq)
        return entries, damaged

    def _live_chunks(self) -> tuple[set[str], list[Path]]:
        """Return every chunk id a valid manifest of any device references, and the damaged manifests."""
        live: set[str] = set()
        damaged: list[Path] = []
        for device_id in list_devices(self.root):
            entries, bad = self._scan(device_id)
            for entry in entries:
                live.update(entry.manifest.chunks)
            damaged.extend(path for path, _ in bad)
        return live, damaged

    def _walk_files(self, *, manifests: bool = True) -> Iterator[Path]:
        """Yield every file in the chunk folders and, when asked, in the manifest folders."""
        if self._chunks_dir.is_dir():
            for prefix in sorted(os.listdir(self._chunks_dir)):
                folder = self._chunks_dir / prefix
                if folder.is_dir():
                    yield from (folder / name for name in sorted(os.listdir(folder)))
                else:
                    yield folder
        if manifests:
            for device_id in list_devices(self.root):
                folder = self.root / "devices" / device_id / "manifests"
                yield from (folder / name for name in sorted(os.listdir(folder)))
        marker_temps = [self.root / name for name in os.listdir(self.root) if name.endswith(TMP_SUFFIX)]
        yield from marker_temps


# ------------------------------------------------------------------ functions


def _checked_int(name: str, value: object, low: int, high: int | None, *, allow_none: bool = False) -> int | None:
    """Return ``value`` when it is an int in ``[low, high]``, else raise CheckpointError."""
    if value is None and allow_none:
        return None
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f"at least {low}"
        raise CheckpointError(f"invalid {name} {value!r}: pass an integer {bound}")
    return value


def _checked_compressor(name: str, label: str) -> Compressor:
    """Return the compressor named ``label``."""
    if not isinstance(label, str) or label not in COMPRESSOR_BY_LABEL:
        raise CheckpointError(f"invalid {name} {label!r}: choose one of {sorted(COMPRESSOR_BY_LABEL)}")
    return COMPRESSOR_BY_LABEL[label]


def _checked_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Return a JSON round-tripped copy of ``meta``, raising CheckpointError when it is not storable."""
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"meta must be a mapping, got {type(meta).__name__}")
    problem = meta_problem(meta)
    if problem is not None:
        raise CheckpointError(problem)
    if not all(isinstance(key, str) for key in meta):
        raise CheckpointError(f"meta keys must be strings, got {sorted(map(repr, meta))}")

    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"meta is not JSON-serializable without NaN or infinity: {error}") from error


def _checked_tensors(tensors: Mapping[str, EncodedTensor]) -> list[Item]:
    """Validate names, codec configs, shapes and buffers; return contiguous buffers per tensor."""
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"tensors must be a mapping of names to EncodedTensor, got {type(tensors).__name__}")

    items = []
    for name, encoded in tensors.items():
        problem = tensor_name_problem(name)
        if problem is None and not isinstance(encoded, EncodedTensor):
            problem = f"tensor {name!r} is a {type(encoded).__name__}, not an EncodedTensor"
        if problem is None:
            problem = _encoded_problem(name, encoded)
        if problem is not None:
            raise CheckpointError(problem)

        buffers = [(buffer_name, array if array.flags.c_contiguous else array.copy(order="C"))
                   for buffer_name, array in encoded.buffers.items()]
        items.append((name, encoded, buffers))
    return items


def _encoded_problem(name: str, encoded: EncodedTensor) -> str | None:
    """Return what is wrong with one EncodedTensor, or None."""
    codec = encoded.codec
    if not isinstance(codec, dict) or not isinstance(codec.get("id"), str) or type(codec.get("version")) is not int:
        return f"tensor {name!r} codec config {codec!r} needs a string 'id' and an integer 'version'"
    try:
        json.dumps(codec, allow_nan=False)
    except (TypeError, ValueError) as error:
        return f"tensor {name!r} codec config is not JSON-serializable: {error}"

    problem = shape_problem(list(encoded.shape))
    if problem is not None:
        return f"tensor {name!r}: {problem}"
    if not isinstance(encoded.dtype, str):
        return f"tensor {name!r} dtype {encoded.dtype!r} must be a torch dtype name such as 'float32'"
    if not isinstance(encoded.buffers, Mapping) or len(encoded.buffers) > 16:
        return f"tensor {name!r} buffers must be a dict of at most 16 numpy arrays"

    for buffer_name, array in encoded.buffers.items():
        problem = buffer_name_problem(buffer_name)
        if problem is None and not isinstance(array, np.ndarray):
            problem = f"buffer {buffer_name!r} is a {type(array).__name__}, not a numpy array"
        if problem is None:
            problem = numpy_dtype_problem(array.dtype.str)
        if problem is not None:
            return f"tensor {name!r}: {problem}"
    return None


def _footprint(entries: Iterable[_Entry]) -> int:
    """Return the bytes of the manifests plus every chunk they reference, each once."""
    sizes: dict[str, int] = {}
    total = 0
    for entry in entries:
        total += entry.file_bytes
        for chunk_id, record in entry.manifest.chunks.items():
            sizes[chunk_id] = record.stored_bytes
    return total + sum(sizes.values())


def _info(entry: _Entry, layout: Sequence[TensorSpec], added_bytes: int | None = None) -> CheckpointInfo:
    """Build the public description of a manifest; ``added_bytes`` defaults to all its bytes."""
    manifest = entry.manifest
    stored = entry.file_bytes + manifest.chunk_stored_bytes
    return CheckpointInfo(manifest.checkpoint_id, manifest.seq, dict(manifest.meta), manifest.created,
                          tuple(tensor.name for tensor in layout), stored, manifest.logical_bytes,
                          str(entry.path), stored if added_bytes is None else added_bytes)


def _load_layout(manifest: Manifest, reader: ChunkReader, path: str, *, fresh: bool = False) -> tuple[TensorSpec, ...]:
    """Load, check and parse a manifest's layout, reusing an earlier parse of the same chunks.

    With ``fresh`` the layout chunks are read and checked even when their parse is
    cached, so a read notices a layout chunk damaged after this process parsed it.
    """
    key = manifest.layout.chunks
    with _manifest_cache_lock:
        cached = _layout_cache.get(key)
    if cached is not None and not fresh:
        return cached

    data = b"".join(bytes(reader.load(chunk_id)) for chunk_id in key)
    if cached is not None:
        return cached
    layout = parse_layout(data, path)
    with _manifest_cache_lock:
        _layout_cache[key] = layout
        while len(_layout_cache) > _LAYOUT_CACHE_ENTRIES:
            _layout_cache.popitem(last=False)
    return layout


def _cached_manifest(path: Path, checkpoint_id: str, device_id: str,
                     fresh: bool) -> tuple[Manifest | str, int] | None:
    """Parse a manifest, reusing an earlier parse of the same unchanged file.

    Returns the manifest (or the reason it is damaged) and the file size, or None when
    the file vanished meanwhile.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    with _manifest_cache_lock:
        cached = _manifest_cache.get(str(path))
        if cached is not None and cached[0] == key and not fresh:
            _manifest_cache.move_to_end(str(path))
            return cached[1], stat.st_size

    try:
        parsed: Manifest | str = parse_manifest(read_bounded(path), str(path), expected_id=checkpoint_id,
                                                expected_device=device_id)
    except FileNotFoundError:
        return None
    except OSError as error:
        parsed = f"cannot be read: {error}"
    except CorruptCheckpointError as error:
        parsed = _reason(error, str(path))

    with _manifest_cache_lock:
        _manifest_cache[str(path)] = (key, parsed)
        _manifest_cache.move_to_end(str(path))
        while len(_manifest_cache) > _MANIFEST_CACHE_ENTRIES:
            _manifest_cache.popitem(last=False)
    return parsed, stat.st_size


def _reason(error: Exception, path: str) -> str:
    """Return an error message without the leading file name, for reports that print the path already."""
    message = str(error)
    for prefix in (f"manifest {path}: ", f"manifest {path} ", f"chunk {path} ", f"{path} "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


