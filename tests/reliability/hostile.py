"""Builders of valid and hostile manifests and chunk files for the fuzz tests."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.block
import zstandard
from hypothesis import strategies as st

from cb_mobile.chunks import ChunkReader, Compressor, chunk_id_of, chunk_path, encode_full
from cb_mobile.manifest import parse_manifest

from .stores import PopulatedStore, populate

CHECKSUM_PREFIX = "blake2b-256:"
HEADER = struct.Struct("<4sBBBBIII32s")

HOSTILE_NAMES = [
    "../../etc/passwd", "/etc/passwd", "model/../../x", "model/./w", "a//b", "..", ".", "", "a\\b",
    "a\x00b", "x" * 600, "model/\n", "C:\\Windows\\system32", "model/w/", "/",
]
HOSTILE_CHUNK_IDS = [
    "../../etc/passwd", "..", "0" * 63, "0" * 65, "F" * 64, "g" * 64, "00/" + "0" * 61,
    "/" + "0" * 63, "0" * 62 + "/.", "",
]
HOSTILE_SHAPES = [
    [2**40], [2**62], [2**64], [-1], [1.5], ["3"], [True], [[3]], [None], [1] * 40, [2**20, 2**20, 2**20],
    [0, 2**63], [], "3", None, {"0": 3},
]
HOSTILE_DTYPES = ["O", "|O", "<U10", "|V8", "<M8[s]", "<f16", "<c32", "float128", "|u3", "<i0", "int8", "<b1",
                  "|b1", ">f4", 5, None]
HOSTILE_CODECS = [
    {"id": "int8", "version": 99}, {"id": "no-such-codec", "version": 1}, {"id": "int8", "version": "1"},
    {"id": 8, "version": 1}, {"version": 1}, {"id": "../../x", "version": 1}, {"id": "int8", "version": 2**70}, [], None,
]
HOSTILE_NUMBERS = [0, -1, 1, 2**31, 2**32, 2**40, 2**63, 2**64, 2**70, -(2**70), 1.5, 1e308, True, False, None, "1", [1]]


def canonical_json(value: Any) -> bytes:
    """Serialize like the manifest writer: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign(document: dict[str, Any]) -> bytes:
    """Return manifest bytes for ``document`` with a checksum that matches its canonical body."""
    body = {key: value for key, value in document.items() if key != "checksum"}
    digest = hashlib.blake2b(canonical_json(body), digest_size=32).hexdigest()
    return canonical_json({**body, "checksum": CHECKSUM_PREFIX + digest})


@dataclass(frozen=True)
class Genuine:
    """JSON documents of a genuine checkpoint written by a real store: its manifest and its layout."""

    manifest: dict[str, Any]
    layout: dict[str, Any]


_GENUINE: dict[int, Genuine] = {}


def genuine(seed: int = 0) -> Genuine:
    """Return the manifest and layout documents of a genuine checkpoint with delta and shared chunks.

    A real store writes two checkpoints of :func:`stores.make_state`; the second one's
    documents are returned. They are cached per seed, so the fuzzers always start from
    the manifest format the store writes today.
    """
    if seed not in _GENUINE:
        with tempfile.TemporaryDirectory() as folder:
            populated = populate(Path(folder) / "store", 2, seed=seed)
            path = populated.manifest_path(populated.ids[-1])
            _GENUINE[seed] = Genuine(json.loads(path.read_bytes()), json.loads(read_layout(populated, path)))
    return copy.deepcopy(_GENUINE[seed])


def valid_document(seed: int = 0) -> dict[str, Any]:
    """Return the JSON document of a genuine manifest (see :func:`genuine`)."""
    return genuine(seed).manifest


def valid_layout(seed: int = 0) -> dict[str, Any]:
    """Return the JSON document of a genuine layout (see :func:`genuine`)."""
    return genuine(seed).layout


def read_layout(populated: PopulatedStore, manifest_path: Path) -> bytes:
    """Return the layout bytes of a checkpoint, read through the chunks its manifest lists."""
    manifest = parse_manifest(manifest_path.read_bytes(), str(manifest_path))
    reader = ChunkReader(populated.root / "chunks")
    return b"".join(bytes(reader.load(chunk_id)) for chunk_id in manifest.layout.chunks)


def forge_checkpoint(populated: PopulatedStore, layout: bytes, *, seq: int = 98,
                     edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Write a checkpoint newer than all others whose layout is ``layout``, with valid chunk CRCs and checksum.

    The layout bytes become full chunks; the newest genuine manifest is copied with
    its layout entry pointing at them, ``edit`` applied, and re-signed. Returns the
    manifest path.
    """
    source = populated.manifest_path(populated.ids[-1])
    document = json.loads(source.read_bytes())
    chunk_bytes = document["chunk_bytes"]
    rows = {row[0]: index for index, row in enumerate(document["chunks"])}
    layout_rows = []
    for start in range(0, len(layout), chunk_bytes):
        piece = layout[start:start + chunk_bytes]
        chunk = encode_full(chunk_id_of(piece), piece, Compressor.NONE)
        path = chunk_path(populated.root / "chunks", chunk.chunk_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(chunk.header + bytes(chunk.payload))
        if chunk.chunk_id not in rows:
            rows[chunk.chunk_id] = len(document["chunks"])
            document["chunks"].append([chunk.chunk_id, chunk.stored_bytes, len(piece), "none", "full", None, 0])
        layout_rows.append(rows[chunk.chunk_id])

    checkpoint_id = f"{seq:08d}-0000abcd"
    document.update(seq=seq, checkpoint_id=checkpoint_id, layout={"nbytes": len(layout), "chunks": layout_rows})
    if edit is not None:
        edit(document)
    target = source.parent / f"{checkpoint_id}.json"
    target.write_bytes(sign(document))
    return target


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Return the path of every node below ``value``."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


def _pool_for(key: Any) -> list[Any]:
    """Return hostile values that suit the field ``key``, or every hostile value for an unnamed field."""
    pools: dict[Any, list[Any]] = {
        "name": HOSTILE_NAMES, "shape": HOSTILE_SHAPES, "dtype": HOSTILE_DTYPES, "codec": HOSTILE_CODECS,
        "chunks": [[-1], [2**40], ["0" * 64], HOSTILE_CHUNK_IDS, [0] * 1000, [], {}, None],
        "checkpoint_id": HOSTILE_NAMES + ["99999999-00000000"], "device_id": HOSTILE_NAMES + ["device-1"],
    }
    everything = HOSTILE_NAMES + HOSTILE_CHUNK_IDS + HOSTILE_SHAPES + HOSTILE_DTYPES + HOSTILE_CODECS + HOSTILE_NUMBERS
    return pools.get(key, everything)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile_documents(draw: Callable[..., Any], base: Callable[[int], dict[str, Any]] = valid_document) -> dict[str, Any]:
    """Draw a genuine document (a manifest, unless ``base`` builds another kind) with one to three hostile edits.

    An edit replaces a value (by a hostile value that suits the field, or by any JSON
    value), renames a key or deletes an entry.
    """
    document = base(draw(st.integers(0, 1)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]

        action = draw(st.sampled_from(["pool", "json", "rename", "delete"]))
        if action == "delete":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            new_key = draw(st.sampled_from(HOSTILE_CHUNK_IDS + HOSTILE_NAMES) | st.text(max_size=10))
            parent[new_key] = parent.pop(key)
        elif action == "pool":
            field = key
            if not isinstance(key, str) and len(path) > 1:
                field = path[-2]
            parent[key] = copy.deepcopy(draw(st.sampled_from(_pool_for(field))))
        else:
            parent[key] = draw(json_values)
    return document


def huge_stream_document(declared_bytes: int, chunk_bytes: int) -> dict[str, Any]:
    """Return a genuine manifest document whose pack declares ``declared_bytes`` bytes in chunks of ``chunk_bytes``.

    The layout entry is emptied, so that it stays consistent with any ``chunk_bytes``
    and the parser reaches the pack.
    """
    document = valid_document(0)
    document["chunk_bytes"] = chunk_bytes
    document["layout"] = {"nbytes": 0, "chunks": []}
    document["pack"]["nbytes"] = declared_bytes
    return document


def huge_buffer_layout(declared_bytes: int) -> dict[str, Any]:
    """Return a genuine layout document whose largest buffer declares ``declared_bytes`` bytes of uint8."""
    layout = valid_layout(0)
    largest = max((buffer for tensor in layout["tensors"] for buffer in tensor["buffers"]),
                  key=lambda buffer: buffer["shape"][0] if buffer["shape"] else 0)
    largest.update(dtype="|u1", shape=[declared_bytes])
    return layout


def deep_document(depth: int) -> bytes:
    """Return manifest bytes whose ``meta`` contains a list nested ``depth`` levels deep, with a matching checksum.

    The checksum is computed over text built by hand, because ``json.dumps`` itself
    fails on very deep nesting.
    """
    body = valid_document(0)
    body["meta"] = {"loss": 0.25, "model_version": "v1", "deep": None}
    text = canonical_json(body).decode()
    nested = "[" * depth + "]" * depth
    text = text.replace('"deep":null', f'"deep":{nested}')
    digest = hashlib.blake2b(text.encode(), digest_size=32).hexdigest()
    return (text[:-1] + f',"checksum":"{CHECKSUM_PREFIX}{digest}"}}').encode()


# Chunk files ----------------------------------------------------------------------


def pack_chunk(magic: bytes, version: int, compressor: int, encoding: int, depth: int, raw_length: int,
               payload: bytes, base: bytes, payload_length: int | None = None, payload_crc: int | None = None) -> bytes:
    """Return a chunk file with the given header fields and valid header checksum."""
    length = len(payload) if payload_length is None else payload_length
    crc = zlib.crc32(payload) if payload_crc is None else payload_crc
    body = HEADER.pack(magic, version, compressor, encoding, depth, raw_length, length, crc, base)
    return body + struct.pack("<I", zlib.crc32(body)) + payload


def compressed(content: bytes, compressor: int) -> bytes:
    """Compress ``content`` the way a chunk payload would be, by compressor code."""
    if compressor == 1:
        return lz4.block.compress(content, store_size=False)
    if compressor == 2:
        return zstandard.ZstdCompressor(write_content_size=True).compress(content)
    return content
