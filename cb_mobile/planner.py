"""Commit planning: cut a checkpoint into chunks, find duplicates, pick delta bases, encode.

A checkpoint becomes *streams*: the layout document, the pack (every buffer smaller
than ``pack_below`` bytes, concatenated), and one stream per larger buffer. Each stream
is cut into ``chunk_bytes`` pieces and hashed. A piece whose chunk already exists on
disk is a dedup hit, checked by a stat of the file and, for a chunk no manifest of
this device describes, a read of its 56-byte header. Every other piece is encoded in
memory, in full or as a delta against the chunk at the same position of the same
stream in the device's previous checkpoint. Nothing touches the disk until the store
has decided that the checkpoint fits under its cap.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cb_mobile.chunks import (
    HEADER_BYTES,
    ChunkReader,
    Compressor,
    EncodedChunk,
    Encoding,
    chunk_id_of,
    chunk_path,
    delta_encoding_for,
    encode_delta,
    encode_full,
    parse_header,
)
from cb_mobile.codec import EncodedTensor
from cb_mobile.errors import CorruptCheckpointError
from cb_mobile.manifest import (
    BufferSpec,
    ChunkRecord,
    Manifest,
    Stream,
    TensorSpec,
    layout_to_bytes,
    place_buffers,
)

logger = logging.getLogger(__name__)

Item = tuple[str, EncodedTensor, list[tuple[str, np.ndarray]]]
"""A validated tensor: name, encoded tensor, and its C-contiguous buffers by name."""
LayoutLoader = Callable[[Manifest, ChunkReader, str], tuple[TensorSpec, ...]]
"""Function that loads and parses a manifest's layout, given a chunk reader and the manifest path."""


PACK_KEY = ("", "pack")
"""Key of the pack stream among buffer keys; tensor names are never empty, so it cannot clash."""
LAYOUT_KEY = ("", "layout")
LARGE_CHUNK_BYTES = 1 << 20
"""Chunks of at least this size follow at most :data:`LARGE_CHUNK_CHAIN` deltas.

A read decodes every base of a chain, so a chain of large chunks costs as many full
reads of a large buffer; small chunks (the pack of a small model) can afford the
store's longer chains."""
LARGE_CHUNK_CHAIN = 4
PARALLEL_BYTES = 1 << 20
"""Bytes of a commit or read below which chunks are hashed and encoded on the calling thread."""


@dataclass
class Plan:
    """Everything a commit will write, computed before anything touches the disk."""

    checkpoint_id: str
    seq: int
    created: float
    records: dict[str, ChunkRecord] = field(default_factory=dict)
    new_chunks: dict[str, EncodedChunk] = field(default_factory=dict)
    repairs: set[str] = field(default_factory=set)
    deduplicated: int = 0
    logical_bytes: int = 0
    streams: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    stream_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    placement_keys: list[tuple[str, str] | None] = field(default_factory=list)
    base_buffers: dict[tuple[str, str], bytes] | None = None
    records_changed: bool = False

    def manifest(self, device_id: str, meta: dict[str, Any], chunk_bytes: int, pack_below: int) -> Manifest:
        """Build the manifest of the planned checkpoint."""
        layout = Stream(self.stream_bytes[LAYOUT_KEY], tuple(self.streams[LAYOUT_KEY]))
        pack = Stream(self.stream_bytes[PACK_KEY], tuple(self.streams[PACK_KEY]))
        placements = tuple(None if key is None else tuple(self.streams[key]) for key in self.placement_keys)
        return Manifest(self.checkpoint_id, device_id, self.seq, self.created, meta, chunk_bytes, self.logical_bytes,
                        layout, pack, pack_below, placements, dict(self.records))


@dataclass(frozen=True)
class Piece:
    """One chunk-sized piece of a stream, before it is hashed."""

    key: tuple[str, str]
    index: int
    content: memoryview
    compressor: Compressor
    delta_encodings: tuple[Encoding, ...]


@dataclass(frozen=True)
class BaseCache:
    """Content and chunk ids of the streams of the checkpoint a store object committed last, kept as delta bases."""

    checkpoint_id: str
    buffers: dict[tuple[str, str], bytes]
    chunks: dict[tuple[str, str], tuple[str, ...]]


class CommitPlanner:
    """Turn encoded tensors into a :class:`Plan`, using the chunks already in a store.

    Parameters
    ----------
    chunks_dir : Path
        The ``chunks`` folder of the store root.
    records : dict of str to ChunkRecord
        The store's index of known chunk records. The planner reads it to avoid header
        reads and adds the records it learns.
    load_layout : callable
        Loads a manifest's layout, for delta bases read from disk.
    chunk_bytes, pack_below, max_delta_chain : int
        Chunk size, pack threshold and maximum delta chain length.
    full_compressor, delta_compressor : Compressor
        Compressors tried on full and on delta chunks.
    zstd_level : int
        zstd compression level.
    workers : int
        Threads for hashing and encoding.
    """

    def __init__(self, chunks_dir: Path, records: dict[str, ChunkRecord], load_layout: LayoutLoader, *,
                 chunk_bytes: int, pack_below: int, max_delta_chain: int, full_compressor: Compressor,
                 delta_compressor: Compressor, zstd_level: int, workers: int) -> None:
        self.chunks_dir = chunks_dir
        self.records = records
        self.load_layout = load_layout
        self.chunk_bytes = chunk_bytes
        self.pack_below = pack_below
        self.max_delta_chain = max_delta_chain
        self.full_compressor = full_compressor
        self.delta_compressor = delta_compressor
        self.zstd_level = zstd_level
        self.workers = workers

    def plan(self, items: Sequence[Item], checkpoint_id: str, seq: int, previous: Manifest | None,
             previous_path: str | None, base_cache: BaseCache | None) -> Plan:
        """Hash every chunk, find the ones already stored, and encode the new ones in memory.

        Hashing and encoding run on ``workers`` threads (hashlib, LZ4 and zstd release
        the GIL); the dedup decisions run in order on the calling thread.

        Parameters
        ----------
        items : sequence of (name, EncodedTensor, list of (buffer name, array))
            Validated tensors with C-contiguous buffers.
        checkpoint_id, seq : str, int
            Id and sequence number of the new checkpoint.
        previous : Manifest or None
            The device's previous checkpoint, whose chunks are the delta bases.
        previous_path : str or None
            Its manifest file, named in errors.
        base_cache : BaseCache or None
            Buffers of the previous checkpoint, kept in memory by the store object that
            committed it. When it matches ``previous``, bases are not read from disk.
        """
        plan = Plan(checkpoint_id, seq, time.time())
        if self.max_delta_chain > 0:
            plan.base_buffers = {}

        streams = self._streams(plan, items)
        pieces = [Piece(key, index, content[offset:offset + self.chunk_bytes], compressor, encodings)
                  for key, content, compressor, encodings in streams
                  for index, offset in enumerate(range(0, len(content), self.chunk_bytes))]
        bases = BaseSource(previous, previous_path, base_cache, ChunkReader(self.chunks_dir), self.chunk_bytes,
                           self.max_delta_chain, self.load_layout)

        # Threads pay off only when there is more than a few hundred microseconds of
        # hashing to share; starting them costs about that much.
        workers = self.workers if sum(len(piece.content) for piece in pieces) >= PARALLEL_BYTES else 1
        with thread_pool(workers) as pool:
            ids = list(pool.map(lambda piece: chunk_id_of(piece.content), pieces))
            tasks = self._new_chunk_tasks(plan, bases, pieces, ids)
            encoded = list(pool.map(lambda task: self._encode_chunk(*task), tasks))

        for (_, _, base), chunk in zip(tasks, encoded):
            plan.new_chunks[chunk.chunk_id] = chunk
            plan.records[chunk.chunk_id] = record_of(chunk)
            if chunk.base_id is not None:
                plan.records.update(base.chain)

        for piece, chunk_id in zip(pieces, ids):
            plan.streams[piece.key].append(chunk_id)
        return plan

    def _streams(self, plan: Plan, items: Sequence[Item],
                 ) -> list[tuple[tuple[str, str], memoryview, Compressor, tuple[Encoding, ...]]]:
        """Cut a checkpoint into streams: the layout, the pack of small buffers, and each large buffer.

        Records in the plan the key of each large buffer (None for packed ones), the
        stream sizes, and the copies kept as the next delta bases.
        """
        specs = []
        packed: list[np.ndarray] = []
        large = []
        for name, encoded, buffers in items:
            specs.append(TensorSpec(name, dict(encoded.codec), tuple(int(size) for size in encoded.shape),
                                    str(encoded.dtype),
                                    tuple(BufferSpec(buffer_name, array.dtype.str, tuple(array.shape))
                                          for buffer_name, array in buffers)))
            for buffer_name, array in buffers:
                plan.logical_bytes += array.nbytes
                if array.nbytes < self.pack_below:
                    packed.append(array.reshape(-1).view(np.uint8))
                    plan.placement_keys.append(None)
                else:
                    large.append(((name, buffer_name), array))
                    plan.placement_keys.append((name, buffer_name))

        layout = memoryview(layout_to_bytes(specs))
        pack = memoryview(np.concatenate(packed) if packed else np.zeros(0, dtype=np.uint8))
        streams = [(LAYOUT_KEY, layout, Compressor.ZSTD, ()),
                   (PACK_KEY, pack, self.full_compressor, (Encoding.DELTA_SUB8, Encoding.DELTA_XOR))]
        streams += [(key, memoryview(array.reshape(-1).view(np.uint8)), self.full_compressor,
                     (delta_encoding_for(array.dtype.itemsize),)) for key, array in large]

        for key, content, _, encodings in streams:
            plan.stream_bytes[key] = len(content)
            plan.streams[key] = []
            if plan.base_buffers is not None and encodings:
                plan.base_buffers[key] = content.tobytes()
        return streams

    def _new_chunk_tasks(self, plan: Plan, bases: BaseSource, pieces: list[Piece],
                         ids: list[str]) -> list[tuple[str, Piece, Base | None]]:
        """Decide per chunk: a duplicate of a stored or earlier chunk, or a new chunk to encode (with its base)."""
        tasks = []
        pending: set[str] = set()
        for piece, chunk_id in zip(pieces, ids):
            if chunk_id in plan.records or chunk_id in pending or self._adopt_existing(plan, chunk_id):
                plan.deduplicated += 1
                continue

            base = bases.base_for(piece.key, piece.index, len(piece.content)) if piece.delta_encodings else None
            tasks.append((chunk_id, piece, base))
            pending.add(chunk_id)
        return tasks

    def _encode_chunk(self, chunk_id: str, piece: Piece, base: Base | None) -> EncodedChunk:
        """Encode a new chunk in full, or as a delta against its base when that is smaller.

        Pack chunks mix quantized codes with float scales, so both delta encodings are
        tried on them. A large buffer's chunks try the one that suits its dtype.
        """
        best = encode_full(chunk_id, piece.content, piece.compressor, self.zstd_level)
        if base is None:
            return best

        for encoding in piece.delta_encodings:
            delta = encode_delta(chunk_id, piece.content, encoding, base.chunk_id, base.content, base.depth,
                                 self.delta_compressor, self.zstd_level)
            if delta.stored_bytes < best.stored_bytes:
                best = delta
        return best

    def _adopt_existing(self, plan: Plan, chunk_id: str) -> bool:
        """Reference an already stored chunk and its delta bases; False when it must be written.

        The check is a stat of each file of the chain. A chunk whose record is not
        known from a manifest gets its 56-byte header read; the content is not read
        again. A chunk that is missing, has a damaged header or a missing base is
        rewritten.
        """
        chain = self.existing_chain(chunk_id)
        if chain is None:
            if os.path.lexists(chunk_path(self.chunks_dir, chunk_id)):
                plan.repairs.add(chunk_id)
            return False
        plan.records.update((record.chunk_id, record) for record in chain)
        return True

    def existing_chain(self, chunk_id: str) -> list[ChunkRecord] | None:
        """Return the records of an existing chunk and its bases, or None when one is missing or unreadable.

        Each base must sit strictly lower in the chain than the chunk that names it,
        which also ends the walk on a damaged chain that loops.
        """
        chain: list[ChunkRecord] = []
        current: str | None = chunk_id
        while current is not None:
            try:
                size = os.stat(chunk_path(self.chunks_dir, current)).st_size
            except FileNotFoundError:
                return None

            record = self.records.get(current)
            if record is None or record.stored_bytes != size:
                record = self._record_from_header(current, size)
                if record is None:
                    return None
                self.records[current] = record

            if chain and record.depth >= chain[-1].depth:
                return None
            chain.append(record)
            current = record.base_id
        return chain

    def _record_from_header(self, chunk_id: str, size: int) -> ChunkRecord | None:
        """Build a chunk record from the header of an existing chunk file."""
        path = chunk_path(self.chunks_dir, chunk_id)
        try:
            with open(path, "rb") as handle:
                header = parse_header(handle.read(HEADER_BYTES), str(path))
        except (OSError, CorruptCheckpointError) as error:
            logger.warning("chunk %s is unreadable and will be rewritten: %s", path, error)
            return None
        if size != HEADER_BYTES + header.payload_length:
            logger.warning("chunk %s has %d bytes but its header declares %d; it will be rewritten",
                           path, size, HEADER_BYTES + header.payload_length)
            return None
        return ChunkRecord(chunk_id, size, header.raw_length, header.compressor.label, header.encoding.label,
                           header.base_id, header.depth)


class Base:
    """A delta base: the chunk at the same position in the previous checkpoint."""

    __slots__ = ("chunk_id", "depth", "content", "chain")

    def __init__(self, chunk_id: str, depth: int, content: bytes | memoryview, chain: list[tuple[str, ChunkRecord]]) -> None:
        self.chunk_id = chunk_id
        self.depth = depth
        self.content = content
        self.chain = chain


class BaseSource:
    """Find the delta base of a chunk position in the device's previous checkpoint.

    Bases come from the in-memory copy of the previous commit when this object made it,
    and otherwise from disk (decoded and checked), for example after a restart.
    """

    def __init__(self, previous: Manifest | None, previous_path: str | None, cache: BaseCache | None,
                 reader: ChunkReader, chunk_bytes: int, max_chain: int, load_layout: LayoutLoader) -> None:
        self.max_chain = max_chain
        self.chunk_bytes = chunk_bytes
        self.reader = reader
        self.load_layout = load_layout
        self.manifest = previous
        self.ids: Mapping[tuple[str, str], tuple[str, ...]] = {}
        self.cache: Mapping[tuple[str, str], bytes] | None = None
        # The previous manifest's path while its layout has not been read yet.
        self.path: str | None = None
        if self.manifest is None or max_chain == 0 or self.manifest.chunk_bytes != chunk_bytes:
            return

        if cache is not None and cache.checkpoint_id == self.manifest.checkpoint_id:
            self.ids, self.cache = cache.chunks, cache.buffers
        else:
            self.path = previous_path
            self.ids = {PACK_KEY: self.manifest.pack.chunks}

    def _load_buffer_ids(self) -> None:
        """Map the previous checkpoint's large buffers to their chunks, reading its layout once."""
        self.path, path = None, self.path
        try:
            placements = place_buffers(self.manifest, self.load_layout(self.manifest, self.reader, path), path)
        except CorruptCheckpointError as error:
            logger.warning("the layout of checkpoint %s is damaged, so only the pack is delta-encoded: %s",
                           self.manifest.checkpoint_id, error)
            return
        self.ids = {**self.ids, **{(p.tensor.name, p.buffer.name): p.chunks for p in placements if p.chunks is not None}}

    def base_for(self, key: tuple[str, str], index: int, length: int) -> Base | None:
        """Return the base for chunk ``index`` of a stream, or None when no delta is possible."""
        if key != PACK_KEY and self.path is not None:
            self._load_buffer_ids()
        ids = self.ids.get(key)
        if ids is None or index >= len(ids):
            return None
        chunk_id = ids[index]
        record = self.manifest.chunks[chunk_id]
        limit = self.max_chain if length < LARGE_CHUNK_BYTES else min(self.max_chain, LARGE_CHUNK_CHAIN)
        if record.depth + 1 > limit or record.raw_bytes != length:
            return None

        content = self._content(key, index, chunk_id, length)
        if content is None:
            return None
        return Base(chunk_id, record.depth, content, self._chain(chunk_id))

    def _content(self, key: tuple[str, str], index: int, chunk_id: str, length: int) -> bytes | memoryview | None:
        """Return the decoded content of a base chunk from memory or from disk."""
        if self.cache is not None and key in self.cache:
            start = index * self.chunk_bytes
            return memoryview(self.cache[key])[start:start + length]
        try:
            return self.reader.load(chunk_id)
        except CorruptCheckpointError as error:
            logger.warning("chunk %s of the previous checkpoint is damaged, storing in full: %s", chunk_id, error)
            return None

    def _chain(self, chunk_id: str) -> list[tuple[str, ChunkRecord]]:
        """Return the records of a base chunk and its own bases, from the previous manifest."""
        chain = []
        current: str | None = chunk_id
        while current is not None:
            record = self.manifest.chunks[current]
            chain.append((current, record))
            current = record.base_id
        return chain


class _SerialPool:
    """Stand-in for a thread pool when one worker is asked for."""

    @staticmethod
    def map(function, iterable):
        return map(function, iterable)


@contextmanager
def thread_pool(workers: int) -> Iterator[ThreadPoolExecutor | _SerialPool]:
    """Yield a thread pool of ``workers`` threads, or a serial stand-in for one worker."""
    if workers <= 1:
        yield _SerialPool()
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cb-store") as pool:
        yield pool


def record_of(chunk: EncodedChunk) -> ChunkRecord:
    """Return the manifest record of a chunk about to be written."""
    return ChunkRecord(chunk.chunk_id, chunk.stored_bytes, chunk.raw_length, chunk.compressor.label,
                       chunk.encoding.label, chunk.base_id, chunk.depth)
