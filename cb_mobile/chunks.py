"""Chunk files: content-addressed, compressed and optionally delta-encoded pieces of a buffer.

Format
------
A chunk file is a 56-byte little-endian header followed by the stored payload::

    magic            4 bytes   b"CBCH"
    format version   u8        1
    compressor       u8        0 none, 1 LZ4 block, 2 zstd frame
    encoding         u8        0 full, 1 byte-wise difference mod 256, 2 XOR
    chain depth      u8        0 for a full chunk, base depth + 1 for a delta
    raw length       u32       length of the decoded content
    payload length   u32       length of the stored payload
    payload CRC-32   u32       checksum of the stored payload
    base chunk id    32 bytes  raw digest of the base chunk, zeros for a full chunk
    header CRC-32    u32       checksum of the 52 bytes before it

The chunk id is the BLAKE2b-256 hex digest of the decoded content, whatever the
encoding, so a delta chunk and a full chunk of the same content share one id and one
file. A payload is stored compressed only when that is smaller than the raw bytes, so
the payload length never exceeds the raw length; the reader enforces this bound.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import numpy as np
import zstandard

from cb_mobile.errors import CorruptCheckpointError

CHUNK_MAGIC = b"CBCH"
CHUNK_FORMAT_VERSION = 1
DIGEST_BYTES = 32
CHUNK_ID_HEX = 2 * DIGEST_BYTES
MAX_CHUNK_BYTES = 1 << 26
"""Largest decoded chunk the format accepts (64 MiB); bounds every allocation on load."""
MAX_CHAIN_DEPTH = 64
"""Largest delta chain depth a reader follows, whatever the writer's setting."""

_HEADER = struct.Struct("<4sBBBBIII32s")
_HEADER_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _HEADER_CRC.size
_CHUNK_ID_RE = re.compile(r"[0-9a-f]{%d}" % CHUNK_ID_HEX)
_ZERO_BASE = bytes(DIGEST_BYTES)


class Compressor(enum.IntEnum):
    """Compression method of a chunk payload."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2

    @property
    def label(self) -> str:
        """Name used in manifests and reports."""
        return self.name.lower()


class Encoding(enum.IntEnum):
    """Content of a chunk payload: the full content or a delta against a base chunk."""

    FULL = 0
    DELTA_SUB8 = 1
    DELTA_XOR = 2

    @property
    def label(self) -> str:
        """Name used in manifests and reports."""
        return {0: "full", 1: "delta-sub8", 2: "delta-xor"}[int(self)]


COMPRESSOR_BY_LABEL = {c.label: c for c in Compressor}
ENCODING_BY_LABEL = {e.label: e for e in Encoding}


def is_chunk_id(value: object) -> bool:
    """Return whether ``value`` is a well-formed chunk id (lowercase BLAKE2b-256 hex)."""
    return isinstance(value, str) and _CHUNK_ID_RE.fullmatch(value) is not None


def chunk_id_of(content: bytes | memoryview) -> str:
    """Return the chunk id of ``content``: its BLAKE2b-256 hex digest."""
    return hashlib.blake2b(content, digest_size=DIGEST_BYTES).hexdigest()


def chunk_path(chunks_dir: Path, chunk_id: str) -> Path:
    """Return where the chunk ``chunk_id`` lives under ``chunks_dir``."""
    return chunks_dir / chunk_id[:2] / chunk_id


@dataclass(frozen=True)
class ChunkHeader:
    """Parsed and range-checked header of a chunk file."""

    compressor: Compressor
    encoding: Encoding
    depth: int
    raw_length: int
    payload_length: int
    payload_crc: int
    base_id: str | None


@dataclass(frozen=True)
class EncodedChunk:
    """A chunk ready to be written: header bytes plus payload."""

    chunk_id: str
    header: bytes
    payload: bytes | memoryview
    compressor: Compressor
    encoding: Encoding
    base_id: str | None
    depth: int
    raw_length: int

    @property
    def stored_bytes(self) -> int:
        """Size of the chunk file on disk."""
        return len(self.header) + len(self.payload)


_local = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """Return this thread's zstd compressor for ``level``; compressor objects are not thread safe."""
    compressors = getattr(_local, "zstd", None)
    if compressors is None:
        compressors = _local.zstd = {}
    if level not in compressors:
        compressors[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return compressors[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    """Return this thread's zstd decompressor."""
    decompressor = getattr(_local, "unzstd", None)
    if decompressor is None:
        decompressor = _local.unzstd = zstandard.ZstdDecompressor()
    return decompressor


def compress(data: bytes | memoryview, compressor: Compressor, zstd_level: int = 3) -> tuple[Compressor, bytes | memoryview]:
    """Compress ``data``, falling back to no compression when that is not smaller.

    Parameters
    ----------
    data : bytes or memoryview
        Raw bytes.
    compressor : Compressor
        Compressor to try.
    zstd_level : int, default 3
        zstd level, used when ``compressor`` is ZSTD.

    Returns
    -------
    tuple of Compressor and bytes-like
        The compressor actually used and the payload. The payload is ``data`` itself
        (no copy) when it is stored uncompressed.
    """
    if compressor is not Compressor.NONE and not _sample_compresses(data, compressor, zstd_level):
        return Compressor.NONE, data
    if compressor is Compressor.LZ4:
        packed = lz4.block.compress(data, store_size=False)
    elif compressor is Compressor.ZSTD:
        packed = _zstd_compressor(zstd_level).compress(data)
    else:
        return Compressor.NONE, data

    if len(packed) >= len(data):
        return Compressor.NONE, data
    return compressor, packed


SAMPLE_BYTES = 1 << 14
"""Bytes of the trial compression that decides whether a large chunk is worth compressing."""
SAMPLE_MIN_GAIN = 0.97
"""A sample must shrink below this share of its size for the whole chunk to be compressed."""


def _sample_compresses(data: bytes | memoryview, compressor: Compressor, zstd_level: int) -> bool:
    """Return whether compressing ``data`` is worth trying, judged on samples from its start, middle and end.

    Quantized codes of trained weights are close to random bytes, and a compressor
    spends as long on them as on any other data to gain nothing, so a chunk of more
    than four samples is compressed only when its samples shrink.
    """
    if len(data) <= 4 * SAMPLE_BYTES:
        return True
    view = memoryview(data).cast("B")
    middle = (len(view) - SAMPLE_BYTES) // 2
    sample = b"".join(bytes(view[start:start + SAMPLE_BYTES]) for start in (0, middle, len(view) - SAMPLE_BYTES))
    if compressor is Compressor.LZ4:
        packed = lz4.block.compress(sample, store_size=False)
    else:
        packed = _zstd_compressor(zstd_level).compress(sample)
    return len(packed) < SAMPLE_MIN_GAIN * len(sample)


def _pack_header(compressor: Compressor, encoding: Encoding, depth: int, raw_length: int,
                 payload: bytes | memoryview, base_id: str | None) -> bytes:
    """Build the 56-byte header for a payload."""
    base = bytes.fromhex(base_id) if base_id is not None else _ZERO_BASE
    body = _HEADER.pack(CHUNK_MAGIC, CHUNK_FORMAT_VERSION, int(compressor), int(encoding), depth,
                        raw_length, len(payload), zlib.crc32(payload), base)
    return body + _HEADER_CRC.pack(zlib.crc32(body))


def encode_full(chunk_id: str, content: bytes | memoryview, compressor: Compressor,
                zstd_level: int = 3) -> EncodedChunk:
    """Encode ``content`` as a full chunk."""
    used, payload = compress(content, compressor, zstd_level)
    header = _pack_header(used, Encoding.FULL, 0, len(content), payload, None)
    return EncodedChunk(chunk_id, header, payload, used, Encoding.FULL, None, 0, len(content))


def delta_encoding_for(itemsize: int) -> Encoding:
    """Return the delta encoding for a buffer whose elements are ``itemsize`` bytes wide.

    One-byte buffers (quantized codes) use the byte-wise difference mod 256, which turns
    a code that moved by one step into a small value. Wider dtypes use XOR of the raw
    bytes, which zeroes the unchanged sign, exponent and high mantissa bits.
    """
    return Encoding.DELTA_SUB8 if itemsize == 1 else Encoding.DELTA_XOR


def _as_words(data: bytes | memoryview | bytearray) -> np.ndarray:
    """View ``data`` as uint64 words when its length allows, else as bytes."""
    array = np.frombuffer(data, dtype=np.uint8)
    if len(array) % 8 == 0:
        return array.view(np.uint64)
    return array


def compute_delta(encoding: Encoding, content: bytes | memoryview, base: bytes | memoryview) -> np.ndarray:
    """Return the delta that turns ``base`` into ``content``; both must have the same length."""
    if encoding is Encoding.DELTA_SUB8:
        return np.subtract(np.frombuffer(content, dtype=np.uint8), np.frombuffer(base, dtype=np.uint8))
    return np.bitwise_xor(_as_words(content), _as_words(base))


def apply_delta(encoding: Encoding, delta: bytes | memoryview, base: bytes | memoryview) -> bytes:
    """Return the content that ``delta`` encodes against ``base``."""
    if encoding is Encoding.DELTA_SUB8:
        return np.add(np.frombuffer(delta, dtype=np.uint8), np.frombuffer(base, dtype=np.uint8)).tobytes()
    return np.bitwise_xor(_as_words(delta), _as_words(base)).tobytes()


def encode_delta(chunk_id: str, content: bytes | memoryview, encoding: Encoding, base_id: str,
                 base: bytes | memoryview, base_depth: int, compressor: Compressor,
                 zstd_level: int = 3) -> EncodedChunk:
    """Encode ``content`` as a delta against the chunk ``base_id`` whose content is ``base``."""
    delta = compute_delta(encoding, content, base)
    used, payload = compress(memoryview(delta).cast("B"), compressor, zstd_level)
    if used is Compressor.NONE:
        payload = delta.tobytes()
    depth = base_depth + 1
    header = _pack_header(used, encoding, depth, len(content), payload, base_id)
    return EncodedChunk(chunk_id, header, payload, used, encoding, base_id, depth, len(content))


def parse_header(data: bytes | memoryview, path: str) -> ChunkHeader:
    """Parse and range-check a chunk header.

    Raises
    ------
    CorruptCheckpointError
        The header is short, has a wrong magic, version or checksum, or a field is out
        of range.
    """
    if len(data) < HEADER_BYTES:
        raise CorruptCheckpointError(f"chunk {path} is truncated: {len(data)} bytes, the header alone is {HEADER_BYTES}", path)

    body = bytes(data[: _HEADER.size])
    (stored_crc,) = _HEADER_CRC.unpack_from(data, _HEADER.size)
    if zlib.crc32(body) != stored_crc:
        raise CorruptCheckpointError(f"chunk {path} has a damaged header (header checksum mismatch)", path)

    magic, version, compressor, encoding, depth, raw_length, payload_length, payload_crc, base = _HEADER.unpack(body)
    if magic != CHUNK_MAGIC:
        raise CorruptCheckpointError(f"{path} is not a chunk file (magic {magic!r})", path)
    if version != CHUNK_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"chunk {path} has unknown format version {version}; this cb_mobile reads version {CHUNK_FORMAT_VERSION}", path)
    if compressor not in Compressor._value2member_map_ or encoding not in Encoding._value2member_map_:
        raise CorruptCheckpointError(f"chunk {path} names unknown compressor {compressor} or encoding {encoding}", path)
    if raw_length > MAX_CHUNK_BYTES or payload_length > raw_length:
        raise CorruptCheckpointError(
            f"chunk {path} declares raw length {raw_length} and payload length {payload_length}; "
            f"the payload must not exceed the raw length, which must not exceed {MAX_CHUNK_BYTES}", path)

    encoding = Encoding(encoding)
    is_full = encoding is Encoding.FULL
    if is_full != (depth == 0) or is_full != (base == _ZERO_BASE) or depth > MAX_CHAIN_DEPTH:
        raise CorruptCheckpointError(
            f"chunk {path} has inconsistent delta fields: encoding {encoding.label}, chain depth {depth}", path)

    return ChunkHeader(Compressor(compressor), encoding, depth, raw_length, payload_length, payload_crc,
                       None if is_full else base.hex())


def decompress_payload(header: ChunkHeader, payload: bytes | memoryview, path: str) -> bytes | memoryview:
    """Check the payload checksum and decompress it to exactly ``header.raw_length`` bytes."""
    if zlib.crc32(payload) != header.payload_crc:
        raise CorruptCheckpointError(f"chunk {path} failed its payload checksum", path)

    try:
        if header.compressor is Compressor.NONE:
            raw = payload
        elif header.compressor is Compressor.LZ4:
            raw = lz4.block.decompress(payload, uncompressed_size=header.raw_length)
        else:
            declared = zstandard.frame_content_size(payload)
            if declared != header.raw_length:
                raise CorruptCheckpointError(
                    f"chunk {path} holds a zstd frame of {declared} bytes but its header declares {header.raw_length}", path)
            raw = _zstd_decompressor().decompress(payload, max_output_size=header.raw_length)
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as error:
        raise CorruptCheckpointError(f"chunk {path} does not decompress: {error}", path) from error

    if len(raw) != header.raw_length:
        raise CorruptCheckpointError(
            f"chunk {path} decompressed to {len(raw)} bytes but its header declares {header.raw_length}", path)
    return raw


class ChunkReader:
    """Load chunks from one store's chunk folder, verifying every checksum on the way.

    Safe to share between threads.

    Parameters
    ----------
    chunks_dir : Path
        The ``chunks`` folder of a store root.
    cache_bytes : int, default 64 MiB
        Most decoded bytes kept for reuse, so a chunk that appears several times or that
        is the base of several deltas is read and checked once.
    """

    def __init__(self, chunks_dir: Path, cache_bytes: int = 64 << 20) -> None:
        self.chunks_dir = chunks_dir
        self.cache_bytes = cache_bytes
        self._cache: dict[str, tuple[bytes | memoryview, int]] = {}
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()

    def path(self, chunk_id: str) -> Path:
        """Return the file of ``chunk_id``."""
        return chunk_path(self.chunks_dir, chunk_id)

    def read_file(self, chunk_id: str) -> tuple[ChunkHeader, memoryview, str]:
        """Read one chunk file and parse its header without decoding the payload."""
        path = str(self.path(chunk_id))
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > HEADER_BYTES + MAX_CHUNK_BYTES:
                    raise CorruptCheckpointError(f"chunk {path} is {size} bytes, larger than any valid chunk", path)
                data = memoryview(handle.read(HEADER_BYTES + MAX_CHUNK_BYTES + 1))
        except FileNotFoundError as error:
            raise CorruptCheckpointError(f"chunk {path} is missing", path) from error
        except OSError as error:
            raise CorruptCheckpointError(f"chunk {path} cannot be read: {error}", path) from error

        header = parse_header(data, path)
        if len(data) != HEADER_BYTES + header.payload_length:
            raise CorruptCheckpointError(
                f"chunk {path} is {len(data)} bytes but its header declares {HEADER_BYTES + header.payload_length}", path)
        return header, data[HEADER_BYTES:], path

    def check_file(self, chunk_id: str) -> None:
        """Check one chunk file on its own, without following a delta's base.

        Checks the header, the payload checksum, decompression, and for a full chunk the
        content hash.

        Raises
        ------
        CorruptCheckpointError
            The file is missing or damaged.
        """
        header, payload, path = self.read_file(chunk_id)
        raw = decompress_payload(header, payload, path)
        if header.base_id is None and chunk_id_of(raw) != chunk_id:
            raise CorruptCheckpointError(f"chunk {path} decodes to content that does not match its id", path)

    def load(self, chunk_id: str, *, max_depth: int | None = None) -> bytes | memoryview:
        """Return the decoded content of ``chunk_id``.

        Checks the payload checksum, follows the delta chain (bounded by the chain depth
        recorded in each header) and checks that the result hashes to ``chunk_id``.

        Parameters
        ----------
        chunk_id : str
            Id of the chunk to load.
        max_depth : int or None, default None
            Largest chain depth allowed, when the chunk is a delta base. Each base
            must sit strictly lower in the chain than the delta that names it, so
            following bases always ends.

        Raises
        ------
        CorruptCheckpointError
            The chunk or one of its bases is missing or damaged. ``path`` names the file.
        """
        with self._cache_lock:
            cached = self._cache.get(chunk_id)
        if cached is not None and (max_depth is None or cached[1] <= max_depth):
            return cached[0]

        header, payload, path = self.read_file(chunk_id)
        if max_depth is not None and header.depth > max_depth:
            raise CorruptCheckpointError(
                f"chunk {path} has chain depth {header.depth}, but the delta that names it as base allows at most "
                f"{max_depth}", path)

        if header.compressor is Compressor.NONE and header.base_id is None:
            # The payload is the content, whose BLAKE2b-256 is checked against the id
            # below; that check is stronger than the CRC-32, so the CRC is not computed.
            raw = payload
        else:
            raw = decompress_payload(header, payload, path)
        if header.base_id is not None:
            raw = self._apply_base(header, raw, path)

        if chunk_id_of(raw) != chunk_id:
            raise CorruptCheckpointError(f"chunk {path} decodes to content that does not match its id", path)

        self._remember(chunk_id, raw, header.depth)
        return raw

    def _apply_base(self, header: ChunkHeader, delta: bytes | memoryview, path: str) -> bytes:
        """Decode a delta payload against its base chunk."""
        try:
            base = self.load(header.base_id, max_depth=header.depth - 1)
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(f"chunk {path} cannot be decoded because its delta base is damaged: {error}",
                                         path) from error

        if len(base) != header.raw_length:
            raise CorruptCheckpointError(
                f"chunk {path} is a delta of {header.raw_length} bytes against a base of {len(base)} bytes", path)
        return apply_delta(header.encoding, delta, base)

    def _remember(self, chunk_id: str, raw: bytes | memoryview, depth: int) -> None:
        """Keep ``raw`` in the cache, dropping the oldest entries beyond the byte budget."""
        if len(raw) > self.cache_bytes:
            return
        with self._cache_lock:
            if chunk_id in self._cache:
                return
            while self._cache and self._cached_bytes + len(raw) > self.cache_bytes:
                oldest = next(iter(self._cache))
                self._cached_bytes -= len(self._cache.pop(oldest)[0])
            self._cache[chunk_id] = (raw, depth)
            self._cached_bytes += len(raw)
