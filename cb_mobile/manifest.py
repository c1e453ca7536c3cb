"""Checkpoint manifests and layouts: the JSON that names every chunk of one checkpoint.

A checkpoint has two JSON documents.

The **layout** lists the tensors in commit order: name, codec config, original shape
and torch dtype, and each buffer's name, numpy dtype and shape. It rarely changes
between checkpoints of one model, so it is stored as ordinary chunks and deduplicated
like any other data.

The **manifest** is the single commit point. It names the layout chunks and the chunks
of the *pack*. The pack is all buffers smaller than ``pack.below`` bytes, concatenated
in layout order, so tiny scales and biases share chunks and deltas. Per buffer in
layout order, the manifest lists its own chunks, or ``null`` when it lives in the pack. The chunk table is
a list of rows ``[chunk id, stored size, raw size, compressor, encoding, base row or
null, chain depth]`` covering every referenced chunk and its delta bases, so garbage
collection and size accounting need only the manifests. Everything else refers to
chunks by row number. The manifest carries the BLAKE2b-256 checksum of its canonical
body; the layout is checked through the content hashes of its chunks.

The parsers trust nothing: they bound every size, reject names and ids that could
escape the store root, and raise :class:`~cb_mobile.errors.CorruptCheckpointError`
with the path on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from cb_mobile.chunks import (
    COMPRESSOR_BY_LABEL,
    ENCODING_BY_LABEL,
    HEADER_BYTES,
    MAX_CHAIN_DEPTH,
    MAX_CHUNK_BYTES,
    is_chunk_id,
)
from cb_mobile.errors import CheckpointError, CorruptCheckpointError

MANIFEST_FORMAT = "cb-mobile-manifest"
LAYOUT_FORMAT = "cb-mobile-layout"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
MAX_LAYOUT_BYTES = 256 << 20
MAX_TENSORS = 1_000_000
MAX_BUFFERS = 16
MAX_DIMS = 32
MAX_BUFFER_BYTES = 1 << 40
MAX_NAME_CHARS = 512
MAX_CHUNK_ROWS = 4_000_000

_CHECKPOINT_ID_RE = re.compile(r"(\d{8,12})-[0-9a-f]{8}")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_BUFFER_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_NUMPY_DTYPE_RE = re.compile(r"[<>|][biufc]\d{1,2}")
_TORCH_DTYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_CHECKSUM_PREFIX = "blake2b-256:"


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class ChunkRecord:
    """Storage details of one chunk, as recorded in a manifest's chunk table."""

    chunk_id: str
    stored_bytes: int
    raw_bytes: int
    compressor: str
    encoding: str
    base_id: str | None
    depth: int

    def to_row(self, rows: Mapping[str, int]) -> list[Any]:
        """Return the chunk table row of this record; ``rows`` maps chunk ids to row numbers."""
        base = rows[self.base_id] if self.base_id is not None else None
        return [self.chunk_id, self.stored_bytes, self.raw_bytes, self.compressor, self.encoding, base, self.depth]


@dataclass(frozen=True)
class BufferSpec:
    """One named numpy buffer of an encoded tensor, as listed in a layout."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the buffer in bytes."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class TensorSpec:
    """One encoded tensor as listed in a layout: codec config, original shape and dtype, buffers."""

    name: str
    codec: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    buffers: tuple[BufferSpec, ...]


@dataclass(frozen=True)
class Stream:
    """A byte sequence cut into chunks: the layout document or the pack of small buffers."""

    nbytes: int
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class Placement:
    """Location of one buffer's bytes: its own chunks, or an offset into the pack."""

    tensor: TensorSpec
    buffer: BufferSpec
    chunks: tuple[str, ...] | None
    pack_offset: int | None


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated checkpoint manifest."""

    checkpoint_id: str
    device_id: str
    seq: int
    created: float
    meta: dict[str, Any]
    chunk_bytes: int
    logical_bytes: int
    layout: Stream
    pack: Stream
    pack_below: int
    placements: tuple[tuple[str, ...] | None, ...]
    chunks: dict[str, ChunkRecord] = field(repr=False)

    @property
    def chunk_stored_bytes(self) -> int:
        """Bytes of the chunk files this manifest references, delta bases included, each once."""
        return sum(record.stored_bytes for record in self.chunks.values())

    def to_bytes(self) -> bytes:
        """Serialize the manifest, with the checksum of its canonical body, to UTF-8 JSON."""
        rows = {chunk_id: row for row, chunk_id in enumerate(self.chunks)}
        body = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "checkpoint_id": self.checkpoint_id,
            "device_id": self.device_id,
            "seq": self.seq,
            "created": self.created,
            "meta": self.meta,
            "chunk_bytes": self.chunk_bytes,
            "logical_bytes": self.logical_bytes,
            "layout": {"nbytes": self.layout.nbytes, "chunks": [rows[c] for c in self.layout.chunks]},
            "pack": {"below": self.pack_below, "nbytes": self.pack.nbytes, "chunks": [rows[c] for c in self.pack.chunks]},
            "buffers": [None if chunks is None else [rows[c] for c in chunks] for chunks in self.placements],
            "chunks": [record.to_row(rows) for record in self.chunks.values()],
        }
        canonical = _canonical_json(body)
        body["checksum"] = _CHECKSUM_PREFIX + hashlib.blake2b(canonical, digest_size=32).hexdigest()
        return _canonical_json(body)


# --------------------------------------------------------------- names, ids


def checkpoint_id_for(seq: int, token: str) -> str:
    """Return the checkpoint id for sequence number ``seq`` and an 8-hex-digit ``token``."""
    return f"{seq:08d}-{token}"


def seq_of_checkpoint_id(checkpoint_id: str) -> int | None:
    """Return the sequence number encoded in ``checkpoint_id``, or None when it is malformed."""
    match = _CHECKPOINT_ID_RE.fullmatch(checkpoint_id) if isinstance(checkpoint_id, str) else None
    return int(match.group(1)) if match else None


def is_checkpoint_id(value: object) -> bool:
    """Return whether ``value`` is a well-formed checkpoint id such as ``00000012-1a2b3c4d``."""
    return isinstance(value, str) and _CHECKPOINT_ID_RE.fullmatch(value) is not None


def validate_device_id(device_id: object) -> str:
    """Return ``device_id`` when it is a safe folder name, else raise CheckpointError."""
    if not isinstance(device_id, str) or _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise CheckpointError(
            f"invalid device_id {device_id!r}: use 1 to 128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit")
    return device_id


def tensor_name_problem(name: object) -> str | None:
    """Return why ``name`` is not a valid tensor name, or None when it is valid.

    Names may contain ``/`` to group tensors, as in ``model/lstm.weight_ih_l0``. They may
    not contain an empty, ``.`` or ``..`` segment, a leading ``/``, a backslash or a
    control character, so a name never points outside a folder when a tool maps it to a
    path.
    """
    if not isinstance(name, str):
        return f"tensor name {name!r} is not a string"
    if not 0 < len(name) <= MAX_NAME_CHARS:
        return f"tensor name {name[:40]!r} must have 1 to {MAX_NAME_CHARS} characters"
    if "\\" in name or any(ord(char) < 32 or ord(char) == 127 for char in name):
        return f"tensor name {name!r} contains a backslash or a control character"
    if any(segment in ("", ".", "..") for segment in name.split("/")):
        return f"tensor name {name!r} has an empty, '.' or '..' path segment"
    return None


def buffer_name_problem(name: object) -> str | None:
    """Return why ``name`` is not a valid buffer name, or None when it is valid."""
    if not isinstance(name, str) or _BUFFER_NAME_RE.fullmatch(name) is None:
        return f"buffer name {name!r} must be 1 to 64 letters, digits, '_', '.' or '-'"
    return None


def numpy_dtype_problem(dtype: object) -> str | None:
    """Return why ``dtype`` is not a storable numpy dtype string, or None when it is.

    Only bool, integer, unsigned, float and complex dtypes are accepted. Object,
    string and structured dtypes are rejected because they could not be rebuilt from
    raw bytes without pickle.
    """
    if not isinstance(dtype, str) or _NUMPY_DTYPE_RE.fullmatch(dtype) is None:
        return f"buffer dtype {dtype!r} is not a bool, integer, float or complex numpy dtype string such as '<f4'"
    try:
        parsed = np.dtype(dtype)
    except TypeError:
        return f"buffer dtype {dtype!r} is not a numpy dtype"
    if parsed.str != dtype:
        return f"buffer dtype {dtype!r} is not in canonical form (numpy spells it {parsed.str!r})"
    return None


def shape_problem(shape: object) -> str | None:
    """Return why ``shape`` is not a plausible tensor shape, or None when it is."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        return f"shape {str(shape)[:80]} must be a list of at most {MAX_DIMS} dimensions"
    if not all(type(size) is int and 0 <= size <= MAX_BUFFER_BYTES for size in shape):
        return f"shape {shape!r} must hold non-negative integers"
    if math.prod(shape) > MAX_BUFFER_BYTES:
        return f"shape {shape!r} has more than {MAX_BUFFER_BYTES} elements"
    return None


def meta_problem(meta: Mapping[str, Any]) -> str | None:
    """Return why ``meta`` lacks the fields the store relies on, or None when it is fine.

    ``loss`` must be a finite number or None, ``model_version`` a string.
    """
    if "loss" not in meta or "model_version" not in meta:
        return "meta must contain 'loss' (float or None) and 'model_version' (str)"
    loss = meta["loss"]
    if loss is not None and (not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss)):
        return f"meta['loss'] is {loss!r}; pass a finite float or None"
    if not isinstance(meta["model_version"], str):
        return f"meta['model_version'] is {meta['model_version']!r}; pass a string"
    return None


def chunk_lengths_match(lengths: Sequence[int], nbytes: int, chunk_bytes: int) -> bool:
    """Return whether ``lengths`` are the chunk lengths of ``nbytes`` bytes cut every ``chunk_bytes``.

    The check never builds the expected list, so a hostile size such as 1 TiB in
    1-byte chunks costs no memory.
    """
    full, rest = divmod(nbytes, chunk_bytes)
    if len(lengths) != full + (1 if rest else 0):
        return False
    return all(length == chunk_bytes for length in lengths[:full]) and (not rest or lengths[-1] == rest)


# ------------------------------------------------------------------- layout


def layout_to_bytes(tensors: Sequence[TensorSpec]) -> bytes:
    """Serialize a layout to canonical UTF-8 JSON."""
    document = {
        "format": LAYOUT_FORMAT,
        "format_version": MANIFEST_VERSION,
        "tensors": [
            {"name": tensor.name, "codec": tensor.codec, "shape": list(tensor.shape), "dtype": tensor.dtype,
             "buffers": [{"name": buffer.name, "dtype": buffer.dtype, "shape": list(buffer.shape)}
                         for buffer in tensor.buffers]}
            for tensor in tensors
        ],
    }
    return _canonical_json(document)


def parse_layout(data: bytes | memoryview, path: str) -> tuple[TensorSpec, ...]:
    """Parse and validate a layout document.

    Raises
    ------
    CorruptCheckpointError
        The layout does not parse, has an unknown version, or a name, codec config,
        shape or dtype is invalid.
    """
    checker = _Checker(f"layout of {path}", path)
    document = _load_json(bytes(data), checker, MAX_LAYOUT_BYTES)
    checker.require(document.get("format") == LAYOUT_FORMAT, f"format is {str(document.get('format'))[:40]!r}")
    checker.check_version(document.get("format_version"))

    entries = document.get("tensors")
    checker.require(isinstance(entries, list) and len(entries) <= MAX_TENSORS,
                    f"tensors must be a list of at most {MAX_TENSORS} entries")
    tensors = tuple(checker.tensor(entry) for entry in entries)
    checker.require(len({tensor.name for tensor in tensors}) == len(tensors), "a tensor name appears twice")
    return tensors


def place_buffers(manifest: Manifest, layout: Sequence[TensorSpec], path: str) -> list[Placement]:
    """Match a manifest's buffer entries to its layout and check every size.

    Raises
    ------
    CorruptCheckpointError
        The manifest and the layout disagree on the number of buffers, a buffer's
        chunks do not add up to its size, or the pack has the wrong size.
    """
    checker = _Checker(f"manifest {path}", path)
    pairs = [(tensor, buffer) for tensor in layout for buffer in tensor.buffers]
    checker.require(len(pairs) == len(manifest.placements),
                    f"lists {len(manifest.placements)} buffers, its layout {len(pairs)}")

    placements = []
    offset = logical = 0
    for (tensor, buffer), chunks in zip(pairs, manifest.placements):
        nbytes = buffer.nbytes
        logical += nbytes
        packed = nbytes < manifest.pack_below
        checker.require(packed == (chunks is None),
                        f"buffer {buffer.name!r} of {tensor.name!r} ({nbytes} bytes) is placed inconsistently with "
                        f"the pack threshold of {manifest.pack_below} bytes")
        if packed:
            placements.append(Placement(tensor, buffer, None, offset))
            offset += nbytes
            continue

        lengths = [manifest.chunks[chunk_id].raw_bytes for chunk_id in chunks]
        checker.require(chunk_lengths_match(lengths, nbytes, manifest.chunk_bytes),
                        f"the chunks of buffer {buffer.name!r} of {tensor.name!r} do not add up to {nbytes} bytes")
        placements.append(Placement(tensor, buffer, chunks, None))

    checker.require(offset == manifest.pack.nbytes, f"pack holds {manifest.pack.nbytes} bytes, its buffers {offset}")
    checker.require(logical == manifest.logical_bytes,
                    f"logical_bytes is {manifest.logical_bytes}, its buffers hold {logical}")
    return placements


# ----------------------------------------------------------------- manifest


def parse_manifest(data: bytes, path: str, *, expected_id: str | None = None,
                   expected_device: str | None = None) -> Manifest:
    """Parse and validate manifest bytes.

    Parameters
    ----------
    data : bytes
        File content.
    path : str
        The file, named in every error.
    expected_id : str or None, default None
        Checkpoint id the file name promises.
    expected_device : str or None, default None
        Device id the folder promises.

    Raises
    ------
    CorruptCheckpointError
        The file does not parse, fails its checksum, has an unknown format version, or
        any field is missing, out of range or inconsistent.
    """
    checker = _Checker(f"manifest {path}", path)
    document = _load_json(data, checker, MAX_MANIFEST_BYTES)
    _check_checksum(document, checker)
    checker.require(document.get("format") == MANIFEST_FORMAT,
                    f"format is {str(document.get('format'))[:40]!r}, expected {MANIFEST_FORMAT!r}")
    checker.check_version(document.get("format_version"))

    checkpoint_id = document.get("checkpoint_id")
    checker.require(is_checkpoint_id(checkpoint_id), f"invalid checkpoint_id {str(checkpoint_id)[:80]!r}")
    checker.require(expected_id is None or checkpoint_id == expected_id,
                    f"checkpoint_id {checkpoint_id!r} does not match the file name ({expected_id!r})")
    device_id = document.get("device_id")
    checker.require(isinstance(device_id, str) and _DEVICE_ID_RE.fullmatch(device_id) is not None,
                    f"invalid device_id {str(device_id)[:80]!r}")
    checker.require(expected_device is None or device_id == expected_device,
                    f"device_id {device_id!r} does not match its folder ({expected_device!r})")
    seq = document.get("seq")
    checker.require(type(seq) is int and seq == seq_of_checkpoint_id(checkpoint_id),
                    f"seq {seq!r} does not match checkpoint_id {checkpoint_id!r}")
    created = document.get("created")
    checker.require(type(created) in (int, float), f"created {created!r} is not a number")

    meta = document.get("meta")
    checker.require(isinstance(meta, dict), "meta is not an object")
    problem = meta_problem(meta)
    checker.require(problem is None, problem or "")

    chunk_bytes = checker.integer(document.get("chunk_bytes"), "chunk_bytes", 1, MAX_CHUNK_BYTES)
    logical_bytes = checker.integer(document.get("logical_bytes"), "logical_bytes", 0, MAX_BUFFER_BYTES * MAX_TENSORS)
    records = checker.chunk_table(document.get("chunks"))
    layout = checker.stream(document.get("layout"), "layout", chunk_bytes, records, MAX_LAYOUT_BYTES)
    pack = checker.stream(document.get("pack"), "pack", chunk_bytes, records, MAX_BUFFER_BYTES)
    pack_below = checker.integer(document["pack"].get("below"), "pack below", 0, MAX_BUFFER_BYTES)
    placements = checker.placements(document.get("buffers"), records)

    return Manifest(checkpoint_id, device_id, seq, float(created), meta, chunk_bytes, logical_bytes, layout, pack,
                    pack_below, placements, {record.chunk_id: record for record in records})


def _canonical_json(value: Mapping[str, Any]) -> bytes:
    """Serialize ``value`` deterministically: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _load_json(data: bytes, checker: _Checker, limit: int) -> dict[str, Any]:
    """Decode bytes into a JSON object, rejecting oversized or non-standard input."""
    checker.require(len(data) <= limit, f"is {len(data)} bytes, more than the {limit} allowed")

    def reject_constant(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    try:
        document = json.loads(data, parse_constant=reject_constant)
    except (ValueError, RecursionError) as error:
        checker.fail(f"is not valid JSON: {error}")
    checker.require(isinstance(document, dict), "is not a JSON object")
    return document


def _check_checksum(document: dict[str, Any], checker: _Checker) -> None:
    """Check the checksum of the canonical body; removes the ``checksum`` key."""
    checksum = document.pop("checksum", None)
    checker.require(isinstance(checksum, str) and checksum.startswith(_CHECKSUM_PREFIX), "has no valid checksum field")

    try:
        canonical = _canonical_json(document)
    except (ValueError, RecursionError) as error:
        checker.fail(f"cannot be re-serialized: {error}")
    actual = hashlib.blake2b(canonical, digest_size=32).hexdigest()
    checker.require(checksum[len(_CHECKSUM_PREFIX):] == actual, "failed its checksum")


class _Checker:
    """Field-by-field validation of a manifest or layout document; every failure names the file."""

    def __init__(self, subject: str, path: str) -> None:
        self.subject = subject
        self.path = path

    def fail(self, message: str) -> NoReturn:
        """Raise CorruptCheckpointError for ``message``."""
        raise CorruptCheckpointError(f"{self.subject}: {message}", self.path)

    def require(self, condition: bool, message: str) -> None:
        """Raise CorruptCheckpointError with ``message`` unless ``condition`` holds."""
        if not condition:
            self.fail(message)

    def check_version(self, version: object) -> None:
        """Reject a format version this code does not read."""
        self.require(version == MANIFEST_VERSION,
                     f"unknown format version {str(version)[:20]}; this cb_mobile reads version {MANIFEST_VERSION}, "
                     "so upgrade cb_mobile to read it")

    def integer(self, value: object, name: str, low: int, high: int) -> int:
        """Return ``value`` when it is an int in ``[low, high]``."""
        self.require(type(value) is int and low <= value <= high, f"{name} {str(value)[:40]} is outside {low}..{high}")
        return value

    def chunk_table(self, table: object) -> list[ChunkRecord]:
        """Validate the chunk table rows, including that every delta base is a row lower in the chain."""
        self.require(isinstance(table, list) and len(table) <= MAX_CHUNK_ROWS,
                     f"chunks must be a list of at most {MAX_CHUNK_ROWS} rows")
        parsed = [self.chunk_row(row) for row in table]
        self.require(len({row[0] for row in parsed}) == len(parsed), "the chunk table lists a chunk id twice")

        records = []
        for index, (chunk_id, size, raw, compressor, encoding, base_row, depth) in enumerate(parsed):
            base_id = None
            if base_row is not None:
                self.require(0 <= base_row < len(parsed) and base_row != index,
                             f"chunk {chunk_id} names base row {base_row}, which does not exist")
                base_id, base_raw, base_depth = parsed[base_row][0], parsed[base_row][2], parsed[base_row][6]
                self.require(base_depth < depth and base_raw == raw,
                             f"chunk {chunk_id} at depth {depth} has an inconsistent base {base_id}")
            records.append(ChunkRecord(chunk_id, size, raw, compressor, encoding, base_id, depth))
        return records

    def chunk_row(self, row: object) -> tuple[str, int, int, str, str, int | None, int]:
        """Validate one chunk table row."""
        self.require(isinstance(row, list) and len(row) == 7, f"chunk table row {str(row)[:120]} is not a list of 7 fields")
        chunk_id, size, raw, compressor, encoding, base, depth = row
        self.require(is_chunk_id(chunk_id), f"chunk id {str(chunk_id)[:80]!r} is not 64 lowercase hex digits")
        self.require(type(raw) is int and 0 < raw <= MAX_CHUNK_BYTES, f"chunk {chunk_id} raw size {raw!r} is out of range")
        self.require(type(size) is int and HEADER_BYTES <= size <= raw + HEADER_BYTES,
                     f"chunk {chunk_id} stored size {size!r} is out of range")
        self.require(isinstance(compressor, str) and compressor in COMPRESSOR_BY_LABEL,
                     f"chunk {chunk_id} has unknown compressor {str(compressor)[:20]!r}")
        self.require(isinstance(encoding, str) and encoding in ENCODING_BY_LABEL,
                     f"chunk {chunk_id} has unknown encoding {str(encoding)[:20]!r}")
        self.require(type(depth) is int and 0 <= depth <= MAX_CHAIN_DEPTH, f"chunk {chunk_id} chain depth {depth!r} is out of range")

        is_full = encoding == "full"
        self.require(is_full == (base is None) == (depth == 0), f"chunk {chunk_id} has inconsistent delta fields")
        self.require(base is None or type(base) is int, f"chunk {chunk_id} has invalid base row {str(base)[:20]}")
        return chunk_id, size, raw, compressor, encoding, base, depth

    def rows(self, rows: object, records: list[ChunkRecord], what: str) -> tuple[str, ...]:
        """Turn a list of chunk table row numbers into chunk ids."""
        self.require(isinstance(rows, list) and len(rows) <= MAX_CHUNK_ROWS, f"{what} chunks must be a list of row numbers")
        for row in rows:
            self.require(type(row) is int and 0 <= row < len(records),
                         f"{what} references chunk table row {str(row)[:20]}, which does not exist")
        return tuple(records[row].chunk_id for row in rows)

    def stream(self, entry: object, what: str, chunk_bytes: int, records: list[ChunkRecord], limit: int) -> Stream:
        """Validate the layout or pack entry: its size and the raw length of each chunk."""
        self.require(isinstance(entry, dict), f"{what} is not an object")
        nbytes = self.integer(entry.get("nbytes"), f"{what} nbytes", 0, limit)
        chunks = self.rows(entry.get("chunks"), records, what)
        by_id = {record.chunk_id: record for record in records}
        self.require(chunk_lengths_match([by_id[chunk_id].raw_bytes for chunk_id in chunks], nbytes, chunk_bytes),
                     f"the {what} chunks do not add up to {nbytes} bytes")
        return Stream(nbytes, chunks)

    def placements(self, entries: object, records: list[ChunkRecord]) -> tuple[tuple[str, ...] | None, ...]:
        """Validate the per-buffer entries: ``null`` for a packed buffer, else a list of chunk rows."""
        self.require(isinstance(entries, list) and len(entries) <= MAX_TENSORS * MAX_BUFFERS,
                     "buffers must be a list of at most one entry per buffer")
        return tuple(None if entry is None else self.rows(entry, records, "a buffer") for entry in entries)

    def tensor(self, entry: object) -> TensorSpec:
        """Validate one layout tensor entry and its buffers."""
        self.require(isinstance(entry, dict), "a tensor entry is not an object")
        name = entry.get("name")
        problem = tensor_name_problem(name)
        self.require(problem is None, problem or "")

        codec = entry.get("codec")
        self.require(isinstance(codec, dict) and isinstance(codec.get("id"), str) and type(codec.get("version")) is int,
                     f"tensor {name!r} codec {str(codec)[:80]} lacks a string 'id' and an integer 'version'")
        shape = entry.get("shape")
        problem = shape_problem(shape)
        self.require(problem is None, f"tensor {name!r}: {problem}")
        dtype = entry.get("dtype")
        self.require(isinstance(dtype, str) and _TORCH_DTYPE_RE.fullmatch(dtype) is not None,
                     f"tensor {name!r} dtype {str(dtype)[:40]!r} is not a torch dtype name")

        buffers = entry.get("buffers")
        self.require(isinstance(buffers, list) and len(buffers) <= MAX_BUFFERS,
                     f"tensor {name!r} buffers must be a list of at most {MAX_BUFFERS} entries")
        parsed = tuple(self.buffer(name, buffer) for buffer in buffers)
        self.require(len({buffer.name for buffer in parsed}) == len(parsed), f"tensor {name!r} repeats a buffer name")
        return TensorSpec(name, codec, tuple(shape), dtype, parsed)

    def buffer(self, tensor: str, entry: object) -> BufferSpec:
        """Validate one layout buffer entry: name, numpy dtype and shape."""
        self.require(isinstance(entry, dict), f"tensor {tensor!r} has a buffer entry that is not an object")
        name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        problem = buffer_name_problem(name) or numpy_dtype_problem(dtype) or shape_problem(shape)
        self.require(problem is None, f"tensor {tensor!r}: {problem}")

        spec = BufferSpec(name, dtype, tuple(shape))
        self.require(spec.nbytes <= MAX_BUFFER_BYTES, f"tensor {tensor!r} buffer {name!r} is larger than {MAX_BUFFER_BYTES} bytes")
        return spec
