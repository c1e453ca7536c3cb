"""Tests of the content-addressed checkpoint store: dedup, deltas, checksums, cap, gc, verify, failures."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from cb_mobile import store as store_module
from cb_mobile.chunks import HEADER_BYTES, MAX_CHUNK_BYTES, Compressor, chunk_id_of, encode_full, parse_header
from cb_mobile.codec import EncodedTensor
from cb_mobile.errors import CheckpointError, CorruptCheckpointError, NoValidCheckpointError, StoreWriteError
from cb_mobile.manifest import _canonical_json
from cb_mobile.store import CheckpointInfo, CheckpointStore, CommitResult

REPO_ROOT = Path(__file__).resolve().parent.parent
CHUNK = 4096


def tensor(array: np.ndarray, codec: str = "lossless", **buffers: np.ndarray) -> EncodedTensor:
    """Wrap ``array`` (and extra buffers) as an EncodedTensor with a stand-in codec config."""
    return EncodedTensor({"id": codec, "version": 1}, tuple(array.shape), str(array.dtype),
                         {"codes": array, **buffers})


def meta(loss: float | None = 1.0, version: str = "0", **extra: object) -> dict[str, object]:
    return {"loss": loss, "model_version": version, **extra}


def open_store(root: Path, **options: object) -> CheckpointStore:
    options = {"chunk_bytes": CHUNK, "fsync": False, "workers": 1, **options}
    return CheckpointStore(root, **options)


def chunk_files(root: Path) -> dict[str, int]:
    """Return every chunk file under ``root`` with its size."""
    return {path.name: path.stat().st_size for path in (root / "chunks").glob("*/*")}


def disk_chunk_bytes(root: Path) -> int:
    return sum(chunk_files(root).values())


def random_codes(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, size, dtype=np.uint8)


def manifest_path(store: CheckpointStore, checkpoint_id: str) -> Path:
    return store.root / "devices" / store.device_id / "manifests" / f"{checkpoint_id}.json"


def resign(path: Path, document: dict) -> None:
    """Write ``document`` as a manifest with a valid checksum, as a careless or hostile writer could."""
    document.pop("checksum", None)
    import hashlib

    digest = hashlib.blake2b(_canonical_json(document), digest_size=32).hexdigest()
    document["checksum"] = "blake2b-256:" + digest
    path.write_bytes(_canonical_json(document))


def buffer_chunk_ids(store: CheckpointStore, checkpoint_id: str, index: int = 0) -> list[str]:
    """Return the chunk ids of the ``index``-th unpacked buffer entry of a manifest."""
    document = json.loads(manifest_path(store, checkpoint_id).read_bytes())
    return [document["chunks"][row][0] for row in document["buffers"][index]]


def rewrite_layout(store: CheckpointStore, checkpoint_id: str, change) -> None:
    """Store a changed copy of a checkpoint's layout as a new chunk and point the manifest at it."""
    path = manifest_path(store, checkpoint_id)
    document = json.loads(path.read_bytes())
    row = document["chunks"][document["layout"]["chunks"][0]]
    layout_file = store.root / "chunks" / row[0][:2] / row[0]
    header = parse_header(layout_file.read_bytes(), str(layout_file))
    layout = json.loads(zstandard.ZstdDecompressor().decompress(layout_file.read_bytes()[HEADER_BYTES:]))
    assert header.compressor is Compressor.ZSTD
    change(layout)

    data = json.dumps(layout).encode()
    chunk = encode_full(chunk_id_of(data), memoryview(data), Compressor.NONE)
    (store.root / "chunks" / chunk.chunk_id[:2]).mkdir(exist_ok=True)
    (store.root / "chunks" / chunk.chunk_id[:2] / chunk.chunk_id).write_bytes(chunk.header + bytes(chunk.payload))
    row[0], row[1], row[2] = chunk.chunk_id, chunk.stored_bytes, len(data)
    document["layout"]["nbytes"] = len(data)
    resign(path, document)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# ------------------------------------------------------------------ round trip


def test_roundtrip_exact(tmp_path, rng):
    store = open_store(tmp_path)
    codes = random_codes(rng, 3 * CHUNK + 17).reshape(1, -1)
    weights = rng.standard_normal((33, 7)).astype(np.float32)
    state = {
        "model/int8": tensor(codes, "int8", scale=np.float32([0.5]), minimum=np.float32([-1.0])),
        "model/w": tensor(weights),
        "optim/step": tensor(np.array(12, dtype=np.int64)),
        "empty": tensor(np.zeros((0, 4), dtype=np.float16)),
        "flags": tensor(np.array([True, False, True])),
    }

    result = store.commit(state, meta(0.25, "3", step=40, round=2))
    tensors, read_meta = store.read(result.checkpoint_id)

    assert result.committed
    assert read_meta == meta(0.25, "3", step=40, round=2)
    assert list(tensors) == list(state)
    for name, original in state.items():
        assert tensors[name].codec == original.codec
        assert tensors[name].shape == original.shape
        assert tensors[name].dtype == original.dtype
        for buffer_name, array in original.buffers.items():
            stored = tensors[name].buffers[buffer_name]
            assert stored.dtype == array.dtype
            assert stored.shape == array.shape
            assert np.array_equal(stored, array)
            assert stored.flags.writeable


def test_checkpoint_info(tmp_path, rng):
    store = open_store(tmp_path)
    first = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.5, step=5))
    second = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.4, step=10))

    infos = store.checkpoints()

    assert [info.checkpoint_id for info in infos] == [first.checkpoint_id, second.checkpoint_id]
    assert [info.seq for info in infos] == [1, 2]
    assert isinstance(infos[0], CheckpointInfo)
    assert infos[1].meta["step"] == 10
    assert infos[1].loss == 0.4
    assert infos[1].tensor_names == ("w",)
    assert infos[1].logical_bytes == 2 * CHUNK
    assert infos[0].added_bytes + infos[1].added_bytes == store.size_bytes()
    assert infos[1].added_bytes < infos[1].stored_bytes


def test_commit_result_fields(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, 3 * CHUNK))}, meta())

    assert isinstance(result, CommitResult)
    assert result.chunks_written == 3 + 1
    assert result.logical_bytes == 3 * CHUNK
    assert result.bytes_written == store.size_bytes()
    assert result.store_bytes == store.size_bytes()
    assert store.stats.commits == 1


# ------------------------------------------------------------------------ dedup


def test_dedup_unchanged_layers(tmp_path, rng):
    store = open_store(tmp_path, max_delta_chain=0)
    frozen = random_codes(rng, 8 * CHUNK)
    head = random_codes(rng, 2 * CHUNK)
    store.commit({"frozen": tensor(frozen), "head": tensor(head)}, meta())
    before = disk_chunk_bytes(tmp_path)

    result = store.commit({"frozen": tensor(frozen.copy()), "head": tensor(random_codes(rng, 2 * CHUNK))}, meta())

    assert result.chunks_deduplicated == 8 + 1
    assert result.chunks_written == 2
    assert disk_chunk_bytes(tmp_path) - before == 2 * (CHUNK + HEADER_BYTES)


def test_dedup_unchanged_quantized_blocks(tmp_path, rng):
    store = open_store(tmp_path, max_delta_chain=0)
    codes = random_codes(rng, 10 * CHUNK)
    store.commit({"w": tensor(codes, "int8")}, meta())
    before = len(chunk_files(tmp_path))

    changed = codes.copy()
    changed[3 * CHUNK + 5] ^= 1
    result = store.commit({"w": tensor(changed, "int8")}, meta())

    assert result.chunks_written == 1
    assert len(chunk_files(tmp_path)) == before + 1


def test_dedup_same_model_many_devices(tmp_path, rng):
    global_model = {"model/w": tensor(random_codes(rng, 6 * CHUNK)), "model/b": tensor(random_codes(rng, 100))}
    first = open_store(tmp_path, device_id="node-0")
    first.commit(global_model, meta(version="7"))
    one_copy = disk_chunk_bytes(tmp_path)

    results = [open_store(tmp_path, device_id=f"node-{index}").commit(global_model, meta(version="7"))
               for index in range(1, 6)]

    assert disk_chunk_bytes(tmp_path) == one_copy
    assert all(result.chunks_written == 0 for result in results)
    assert all(result.chunks_deduplicated == 6 + 2 for result in results)
    assert len(list((tmp_path / "devices").iterdir())) == 6


def test_dedup_devices_sharing_root(tmp_path, rng):
    shared = random_codes(rng, 4 * CHUNK)
    own = [random_codes(rng, CHUNK) for _ in range(3)]
    open_store(tmp_path / "alone").commit({"shared": tensor(shared), "private": tensor(own[0])}, meta())
    one_device = disk_chunk_bytes(tmp_path / "alone")

    for index, private in enumerate(own):
        open_store(tmp_path / "shared", device_id=f"phone-{index}").commit(
            {"shared": tensor(shared), "private": tensor(private)}, meta())

    assert disk_chunk_bytes(tmp_path / "shared") == one_device + 2 * (CHUNK + HEADER_BYTES)
    assert len(chunk_files(tmp_path / "shared")) == len(chunk_files(tmp_path / "alone")) + 2


def test_dedup_repeated_chunks_within_checkpoint(tmp_path):
    store = open_store(tmp_path)
    result = store.commit({"zeros": tensor(np.zeros(5 * CHUNK, dtype=np.uint8))}, meta())

    assert result.chunks_written == 1 + 1
    assert result.chunks_deduplicated == 4
    assert len(chunk_files(tmp_path)) == 1 + 1


def test_dedup_hit_reads_no_chunk(tmp_path, rng, monkeypatch):
    codes = random_codes(rng, 4 * CHUNK)
    open_store(tmp_path, device_id="a").commit({"w": tensor(codes)}, meta())
    store = open_store(tmp_path, device_id="a")
    opened = []
    real_open = open

    def tracking_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", tracking_open)
    store.commit({"w": tensor(codes.copy())}, meta())

    assert not any("/chunks/" in path for path in opened)


def test_small_buffers_share_pack(tmp_path, rng):
    store = open_store(tmp_path)
    small = {f"model/bias{index}": tensor(rng.standard_normal(16).astype(np.float32)) for index in range(20)}
    first = store.commit(small, meta())

    second = store.commit(small, meta())
    changed = dict(small, **{"model/bias3": tensor(rng.standard_normal(16).astype(np.float32))})
    third = store.commit(changed, meta())
    tensors, _ = store.read(third.checkpoint_id)

    assert first.chunks_written == 1 + 1
    assert second.chunks_written == 0
    assert third.chunks_written == 1
    assert third.chunks_delta == 1
    assert np.array_equal(tensors["model/bias3"].buffers["codes"], changed["model/bias3"].buffers["codes"])
    assert np.array_equal(tensors["model/bias19"].buffers["codes"], small["model/bias19"].buffers["codes"])


def test_layout_stored_once(tmp_path, rng):
    store = open_store(tmp_path)
    store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    manifests = tmp_path / "devices" / "device-0" / "manifests"

    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    manifest_bytes = manifest_path(store, result.checkpoint_id).stat().st_size

    assert result.chunks_deduplicated == 1
    assert result.bytes_written == CHUNK + HEADER_BYTES + manifest_bytes
    assert len(list(manifests.iterdir())) == 2


def test_usage_totals(tmp_path, rng):
    codes = random_codes(rng, 3 * CHUNK)
    for device in ("a", "b"):
        open_store(tmp_path, device_id=device).commit({"w": tensor(codes)}, meta())

    usage = open_store(tmp_path).usage()

    assert usage.devices == 2
    assert usage.manifests == 2
    assert usage.chunks == len(chunk_files(tmp_path))
    assert usage.chunk_bytes == disk_chunk_bytes(tmp_path)
    assert usage.logical_bytes == 2 * 3 * CHUNK
    assert usage.dedup_ratio > 1.5


# ------------------------------------------------------------------------ delta


def test_delta_sub8_for_quantized_codes(tmp_path, rng):
    store = open_store(tmp_path)
    codes = random_codes(rng, 4 * CHUNK)
    store.commit({"w": tensor(codes, "int8")}, meta())

    moved = codes.copy()
    moved[::3] += 1
    result = store.commit({"w": tensor(moved, "int8")}, meta())
    tensors, _ = store.read(result.checkpoint_id)
    rows = json.loads(manifest_path(store, result.checkpoint_id).read_bytes())["chunks"]

    assert result.chunks_delta == 4
    assert result.bytes_written < CHUNK
    assert np.array_equal(tensors["w"].buffers["codes"], moved)
    assert {row[4] for row in rows} == {"full", "delta-sub8"}
    assert {row[3] for row in rows if row[6] == 1} == {"zstd"}


def test_delta_xor_for_float_buffers(tmp_path, rng):
    store = open_store(tmp_path)
    weights = rng.standard_normal(4 * CHUNK // 4).astype(np.float32)
    store.commit({"w": tensor(weights)}, meta())

    nudged = weights + np.float32(1e-6) * np.sign(weights)
    result = store.commit({"w": tensor(nudged)}, meta())
    headers = [parse_header(path.read_bytes(), str(path)) for path in (tmp_path / "chunks").glob("*/*")]
    tensors, _ = store.read(result.checkpoint_id)

    assert result.chunks_delta == 4
    assert sum(header.encoding.label == "delta-xor" for header in headers) == 4
    assert all(header.compressor is Compressor.ZSTD for header in headers if header.depth == 1)
    assert np.array_equal(tensors["w"].buffers["codes"], nudged)


def test_delta_only_when_smaller(tmp_path, rng):
    store = open_store(tmp_path)
    store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())

    result = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())

    assert result.chunks_delta == 0
    assert result.chunks_written == 2


def test_delta_chain_bounded(tmp_path, rng):
    store = open_store(tmp_path, max_delta_chain=3)
    codes = random_codes(rng, 2 * CHUNK)
    ids = []
    for _ in range(9):
        codes = codes.copy()
        codes[::5] += 1
        ids.append(store.commit({"w": tensor(codes)}, meta()).checkpoint_id)

    depths = [parse_header(path.read_bytes(), str(path)).depth for path in (tmp_path / "chunks").glob("*/*")]
    tensors, _ = store.read(ids[-1])

    assert max(depths) == 3
    assert depths.count(0) == 2 * 3 + 1
    assert np.array_equal(tensors["w"].buffers["codes"], codes)


def test_delta_disabled(tmp_path, rng):
    store = open_store(tmp_path, max_delta_chain=0)
    codes = random_codes(rng, 2 * CHUNK)
    store.commit({"w": tensor(codes)}, meta())
    codes[::7] += 1

    result = store.commit({"w": tensor(codes)}, meta())

    assert result.chunks_delta == 0


def test_delta_after_reopen(tmp_path, rng):
    codes = random_codes(rng, 3 * CHUNK)
    open_store(tmp_path).commit({"w": tensor(codes)}, meta())
    codes[::4] += 3

    reopened = open_store(tmp_path)
    result = reopened.commit({"w": tensor(codes)}, meta())
    tensors, _ = reopened.read(result.checkpoint_id)

    assert result.chunks_delta == 3
    assert np.array_equal(tensors["w"].buffers["codes"], codes)


def test_delta_base_survives_eviction(tmp_path, rng):
    store = open_store(tmp_path, cap_bytes=6 * CHUNK, retain_best=0, max_delta_chain=2)
    codes = random_codes(rng, 2 * CHUNK)
    committed = []
    for _ in range(8):
        codes = codes.copy()
        codes[::9] += 1
        if store.commit({"w": tensor(codes)}, meta()).committed:
            committed.append(codes)

    info, tensors = store.read_latest()

    assert store.stats.evicted > 0
    assert np.array_equal(tensors["w"].buffers["codes"], committed[-1])
    assert store.verify().ok


def test_workers_give_same_chunks(tmp_path, rng):
    state = {"a": tensor(random_codes(rng, 7 * CHUNK + 3)), "b": tensor(rng.standard_normal(999).astype(np.float32))}
    serial = open_store(tmp_path / "serial", workers=1).commit(state, meta())
    threaded = open_store(tmp_path / "threaded", workers=3).commit(state, meta())

    assert serial.chunks_written == threaded.chunks_written
    assert chunk_files(tmp_path / "serial") == chunk_files(tmp_path / "threaded")


# ------------------------------------------------------------------ checksums


def test_chunk_payload_damage_detected(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    path = next((tmp_path / "chunks").glob("*/*"))
    flip_byte(path, HEADER_BYTES + 10)

    with pytest.raises(CorruptCheckpointError, match="payload checksum") as caught:
        store.read(result.checkpoint_id)

    assert caught.value.path == str(path)


def test_chunk_content_must_match_id(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    path = next((tmp_path / "chunks").glob("*/*"))
    impostor = random_codes(rng, CHUNK).tobytes()
    chunk = encode_full(chunk_id_of(impostor), memoryview(impostor), Compressor.NONE)
    path.write_bytes(chunk.header + bytes(chunk.payload))

    with pytest.raises(CorruptCheckpointError, match="does not match its id"):
        store.read(result.checkpoint_id)


def test_chunk_header_bounds(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    path = next((tmp_path / "chunks").glob("*/*"))
    data = bytearray(path.read_bytes())
    data[8:12] = (MAX_CHUNK_BYTES + 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError, match="header"):
        store.read(result.checkpoint_id)


def test_truncated_chunk_detected(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    path = next((tmp_path / "chunks").glob("*/*"))
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(CorruptCheckpointError, match="bytes"):
        store.read(result.checkpoint_id)


def test_manifest_checksum_detected(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta(0.125))
    path = manifest_path(store, result.checkpoint_id)
    path.write_bytes(path.read_bytes().replace(b"0.125", b"0.126"))

    with pytest.raises(CorruptCheckpointError, match="checksum") as caught:
        store.read(result.checkpoint_id)

    assert caught.value.path == str(path)
    assert store.checkpoints() == []


def test_read_latest_falls_back(tmp_path, rng, caplog):
    store = open_store(tmp_path, max_delta_chain=0)
    good = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    bad = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    newest_chunk = buffer_chunk_ids(store, bad.checkpoint_id)[0]
    damaged = tmp_path / "chunks" / newest_chunk[:2] / newest_chunk
    flip_byte(damaged, HEADER_BYTES + 1)

    with caplog.at_level(logging.WARNING, logger="cb_mobile.store"):
        info, _ = store.read_latest()

    assert info.checkpoint_id == good.checkpoint_id
    assert str(damaged) in caplog.text


def test_read_latest_skips_damaged_manifest(tmp_path, rng, caplog):
    store = open_store(tmp_path)
    good = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    bad = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    path = manifest_path(store, bad.checkpoint_id)
    path.write_bytes(path.read_bytes()[:50])

    with caplog.at_level(logging.WARNING, logger="cb_mobile.store"):
        info, _ = store.read_latest()

    assert info.checkpoint_id == good.checkpoint_id
    assert str(path) in caplog.text


def test_read_latest_none_valid(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    manifest_path(store, result.checkpoint_id).write_text("{}")

    with pytest.raises(NoValidCheckpointError, match="device-0"):
        store.read_latest()


def test_read_latest_empty_store(tmp_path):
    with pytest.raises(NoValidCheckpointError):
        open_store(tmp_path).read_latest()


def test_commit_after_damaged_manifest(tmp_path, rng):
    store = open_store(tmp_path)
    first = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    manifest_path(store, first.checkpoint_id).write_text("garbage")

    second = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())

    assert second.committed
    assert second.checkpoint_id.startswith("00000002-")


# ------------------------------------------------------------- hostile input


@pytest.mark.parametrize("field, value, message", [
    ("chunk id", "../../../../etc/passwd", "lowercase hex"),
    ("chunk id", "A" * 64, "lowercase hex"),
    ("format_version", 99, "unknown format version 99"),
    ("logical_bytes", 12, "logical_bytes"),
    ("base row", 5, "base row"),
    ("buffer row", 99, "row 99"),
])
def test_manifest_rejects_hostile_fields(tmp_path, rng, field, value, message):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())
    path = manifest_path(store, result.checkpoint_id)
    document = json.loads(path.read_bytes())
    if field == "chunk id":
        document["chunks"][0][0] = value
    elif field == "base row":
        document["chunks"][1][4:7] = ["delta-xor", value, 1]
    elif field == "buffer row":
        document["buffers"][0][0] = value
    else:
        document[field] = value
    resign(path, document)

    with pytest.raises(CorruptCheckpointError, match=message) as caught:
        store.read(result.checkpoint_id)

    assert caught.value.path == str(path)


@pytest.mark.parametrize("field, value, message", [
    ("name", "../../etc/passwd", "segment"),
    ("name", "/abs", "segment"),
    ("shape", [2**41, 2**41], "shape"),
    ("buffer dtype", "|O", "dtype"),
    ("buffer shape", [2 * CHUNK - 8], "do not add up"),
    ("codec", "pickle", "codec"),
])
def test_layout_rejects_hostile_fields(tmp_path, rng, field, value, message):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())

    def change(layout: dict) -> None:
        entry = layout["tensors"][0]
        if field.startswith("buffer "):
            entry["buffers"][0][field.removeprefix("buffer ")] = value
        else:
            entry[field] = value

    rewrite_layout(store, result.checkpoint_id, change)

    with pytest.raises(CorruptCheckpointError, match=message) as caught:
        store.read(result.checkpoint_id)

    assert caught.value.path == str(manifest_path(store, result.checkpoint_id))


def test_manifest_rejects_nan_constant(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta(0.5))
    path = manifest_path(store, result.checkpoint_id)
    path.write_bytes(path.read_bytes().replace(b'"loss":0.5', b'"loss":NaN'))

    with pytest.raises(CorruptCheckpointError, match="JSON"):
        store.read(result.checkpoint_id)


@pytest.mark.parametrize("name", ["../evil", "/root", "a//b", "a/./b", "tab\there", ""])
def test_commit_rejects_bad_tensor_name(tmp_path, name):
    with pytest.raises(CheckpointError, match="tensor name"):
        open_store(tmp_path).commit({name: tensor(np.zeros(3, dtype=np.float32))}, meta())


def test_commit_rejects_object_buffer(tmp_path):
    with pytest.raises(CheckpointError, match="dtype"):
        open_store(tmp_path).commit({"w": tensor(np.array([object()], dtype=object))}, meta())


@pytest.mark.parametrize("bad_meta, message", [
    ({"loss": float("nan"), "model_version": "0"}, "loss"),
    ({"loss": 1.0}, "model_version"),
    ({"loss": 1.0, "model_version": 3}, "model_version"),
    ({"loss": 1.0, "model_version": "0", "when": object()}, "JSON"),
])
def test_commit_rejects_bad_meta(tmp_path, bad_meta, message):
    with pytest.raises(CheckpointError, match=message):
        open_store(tmp_path).commit({"w": tensor(np.zeros(3, dtype=np.float32))}, bad_meta)


@pytest.mark.parametrize("device_id", ["../x", "", "a/b", ".hidden"])
def test_store_rejects_bad_device_id(tmp_path, device_id):
    with pytest.raises(CheckpointError, match="device_id"):
        CheckpointStore(tmp_path, device_id=device_id)


def test_read_rejects_bad_checkpoint_id(tmp_path):
    with pytest.raises(CheckpointError, match="invalid checkpoint id"):
        open_store(tmp_path).read("../../00000001-abcdef01")


def test_open_rejects_non_store(tmp_path):
    with pytest.raises(CheckpointError, match="not a cb-mobile store"):
        CheckpointStore(tmp_path, create=False)


# ------------------------------------------------------------------ cap, evict


def test_cap_never_exceeded(tmp_path, rng):
    cap = 12 * CHUNK
    store = open_store(tmp_path, cap_bytes=cap)
    codes = random_codes(rng, 3 * CHUNK)
    for step in range(12):
        codes = codes.copy() if step % 3 else random_codes(rng, 3 * CHUNK)
        codes[::11] += 1
        result = store.commit({"w": tensor(codes)}, meta(loss=1.0 / (step + 1)))

        assert result.store_bytes <= cap
        assert store.size_bytes() <= cap
    assert store.stats.evicted > 0


def test_cap_delta_chains_never_block_commits(tmp_path, rng):
    # Small changes give small deltas, so without a bound the chain behind the
    # latest checkpoint would grow until nothing new fits under the cap.
    size = 4 * CHUNK
    cap = 4 * size
    store = open_store(tmp_path, cap_bytes=cap, max_delta_chain=16)
    codes = random_codes(rng, size)
    for step in range(40):
        codes = codes.copy()
        codes[rng.integers(0, size, size // 20)] += 1
        result = store.commit({"w": tensor(codes)}, meta(loss=1.0 / (step + 1)))

        assert result.committed, result.reason
        assert store.size_bytes() <= cap
    assert store.stats.chunks_delta > 0
    assert store.stats.skipped == 0


def test_cap_keeps_last_committed(tmp_path, rng):
    store = open_store(tmp_path, cap_bytes=int(1.5 * (3 * CHUNK)), max_delta_chain=0)
    first = store.commit({"w": tensor(random_codes(rng, 3 * CHUNK))}, meta())
    files_before = chunk_files(tmp_path)

    second = store.commit({"w": tensor(random_codes(rng, 3 * CHUNK))}, meta())
    info, _ = store.read_latest()

    assert not second.committed
    assert second.checkpoint_id is None
    assert "cap" in second.reason
    assert info.checkpoint_id == first.checkpoint_id
    assert store.stats.skipped == 1
    assert chunk_files(tmp_path) == files_before


def test_cap_skips_checkpoint_too_large_alone(tmp_path, rng, caplog):
    store = open_store(tmp_path, cap_bytes=2 * CHUNK, device_id="phone-3")

    with caplog.at_level(logging.WARNING, logger="cb_mobile.store"):
        result = store.commit({"w": tensor(random_codes(rng, 3 * CHUNK))}, meta())

    assert not result.committed
    assert "more than the cap" in result.reason
    assert "phone-3" in caplog.text
    assert chunk_files(tmp_path) == {}
    assert store.stats.skipped == 1


def test_cap_keeps_best_loss(tmp_path, rng):
    store = open_store(tmp_path, cap_bytes=4 * (2 * CHUNK + 1500), max_delta_chain=0, retain_best=1)
    losses = [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.4]
    ids = [store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(loss)).checkpoint_id for loss in losses]

    kept = [info.checkpoint_id for info in store.checkpoints()]

    assert ids[1] in kept
    assert ids[0] not in kept
    assert ids[2] not in kept
    assert kept[-1] == ids[-1]


def test_cap_best_loss_of_latest_version_only(tmp_path, rng):
    store = open_store(tmp_path, cap_bytes=3 * (2 * CHUNK + 1500), max_delta_chain=0, retain_best=1)
    old_best = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.01, version="1")).checkpoint_id
    for loss in (0.5, 0.4, 0.3, 0.2):
        store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(loss, version="2"))

    kept = [info.checkpoint_id for info in store.checkpoints()]

    assert old_best not in kept
    assert all(info.model_version == "2" for info in store.checkpoints())


def test_cap_best_loss_of_current_run_only(tmp_path, rng):
    store = open_store(tmp_path, cap_bytes=3 * (2 * CHUNK + 1500), max_delta_chain=0, retain_best=1)
    stale = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.01, version="1")).checkpoint_id
    store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.5, version="2"))
    for loss in (0.4, 0.3, 0.2):
        store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(loss, version="1"))

    kept = [info.checkpoint_id for info in store.checkpoints()]

    assert stale not in kept
    assert len(kept) == 3


def test_cap_skip_keeps_best_and_last(tmp_path, rng):
    size = 2 * CHUNK + 1500
    store = open_store(tmp_path, cap_bytes=2 * size + size // 2, max_delta_chain=0, retain_best=1)
    best = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.1)).checkpoint_id
    last = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.5)).checkpoint_id

    result = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta(0.6))

    assert not result.committed
    assert [info.checkpoint_id for info in store.checkpoints()] == [best, last]


def test_eviction_frees_disk(tmp_path, rng):
    store = open_store(tmp_path, cap_bytes=3 * (2 * CHUNK + 1500), max_delta_chain=0, retain_best=0)
    for _ in range(8):
        store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())

    assert disk_chunk_bytes(tmp_path) <= store.cap_bytes
    assert len(chunk_files(tmp_path)) == 2 * len(store.checkpoints()) + 1


# ---------------------------------------------------------------------- gc


def test_gc_removes_orphans_and_temp_files(tmp_path, rng):
    store = open_store(tmp_path)
    store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())
    orphan = random_codes(rng, CHUNK).tobytes()
    orphan_id = chunk_id_of(orphan)
    chunk = encode_full(orphan_id, memoryview(orphan), Compressor.NONE)
    (tmp_path / "chunks" / orphan_id[:2]).mkdir(exist_ok=True)
    (tmp_path / "chunks" / orphan_id[:2] / orphan_id).write_bytes(chunk.header + bytes(chunk.payload))
    (tmp_path / "chunks" / orphan_id[:2] / f"{orphan_id}.123-abcd.tmp").write_bytes(b"x" * 10)
    (tmp_path / "devices" / "device-0" / "manifests" / "00000009-00000000.json.1-2.tmp").write_bytes(b"{")

    report = store.gc()

    assert report.chunks_removed == 1
    assert report.chunk_bytes_freed == CHUNK + HEADER_BYTES
    assert report.temp_files_removed == 2
    assert len(chunk_files(tmp_path)) == 2 + 1
    assert store.read_latest()[0].seq == 1


def test_delete_keeps_shared_chunks(tmp_path, rng):
    shared = random_codes(rng, 2 * CHUNK)
    phone = open_store(tmp_path, device_id="phone")
    station = open_store(tmp_path, device_id="station")
    mine = phone.commit({"shared": tensor(shared), "own": tensor(random_codes(rng, CHUNK))}, meta())
    station.commit({"shared": tensor(shared)}, meta())

    phone.delete(mine.checkpoint_id)

    assert len(chunk_files(tmp_path)) == 2 + 1
    assert phone.checkpoints() == []
    assert station.read_latest()[0].seq == 1


def test_delete_unknown_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_store(tmp_path).delete("00000001-00000000")


def test_eviction_keeps_chunks_of_other_devices(tmp_path, rng):
    shared = random_codes(rng, 2 * CHUNK)
    other = open_store(tmp_path, device_id="other")
    other.commit({"w": tensor(shared)}, meta())
    capped = open_store(tmp_path, device_id="capped", cap_bytes=3 * (2 * CHUNK + 1500), max_delta_chain=0,
                        retain_best=0)
    capped.commit({"w": tensor(shared)}, meta())
    for _ in range(5):
        capped.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())

    _, tensors = other.read_latest()

    assert np.array_equal(tensors["w"].buffers["codes"], shared)


def test_rewrites_orphan_delta_with_missing_base(tmp_path, rng):
    store = open_store(tmp_path)
    codes = random_codes(rng, CHUNK)
    base = store.commit({"w": tensor(codes)}, meta())
    moved = codes.copy()
    moved[::4] += 1
    delta = store.commit({"w": tensor(moved)}, meta())
    base_chunk = chunk_id_of(codes.tobytes())
    for result in (base, delta):
        manifest_path(store, result.checkpoint_id).unlink()
    (tmp_path / "chunks" / base_chunk[:2] / base_chunk).unlink()

    fresh = open_store(tmp_path)
    result = fresh.commit({"w": tensor(moved)}, meta())
    tensors, _ = fresh.read(result.checkpoint_id)

    assert result.chunks_written == 1
    assert np.array_equal(tensors["w"].buffers["codes"], moved)


# ------------------------------------------------------------------- verify


def test_verify_clean(tmp_path, rng):
    store = open_store(tmp_path)
    codes = random_codes(rng, 3 * CHUNK)
    for _ in range(3):
        codes[::6] += 1
        store.commit({"w": tensor(codes.copy())}, meta())

    report = store.verify()

    assert report.ok
    assert report.chunks_checked == len(chunk_files(tmp_path))
    assert report.manifests_checked == 3


def test_verify_reports_damage(tmp_path, rng):
    store = open_store(tmp_path)
    codes = random_codes(rng, CHUNK)
    first = store.commit({"w": tensor(codes)}, meta())
    moved = codes.copy()
    moved[::3] += 1
    second = store.commit({"w": tensor(moved)}, meta())
    base_chunk = chunk_id_of(codes.tobytes())
    base_path = tmp_path / "chunks" / base_chunk[:2] / base_chunk
    base_path.unlink()

    report = store.verify()
    reasons = {Path(item.path).name: item.reason for item in report.damaged}
    delta_chunk = chunk_id_of(moved.tobytes())

    assert not report.ok
    assert "missing" in reasons[delta_chunk]
    assert "missing chunk" in reasons[f"{first.checkpoint_id}.json"]
    assert "chunk" in reasons[f"{second.checkpoint_id}.json"]


def test_verify_marks_unreferenced_damage(tmp_path, rng):
    store = open_store(tmp_path)
    codes = random_codes(rng, CHUNK)
    first = store.commit({"w": tensor(codes)}, meta())
    moved = codes.copy()
    moved[::3] += 1
    store.commit({"w": tensor(moved)}, meta())
    store.delete(first.checkpoint_id)
    base_chunk = chunk_id_of(codes.tobytes())
    flip_byte(tmp_path / "chunks" / base_chunk[:2] / base_chunk, HEADER_BYTES + 3)
    for path in (tmp_path / "devices" / "device-0" / "manifests").iterdir():
        path.unlink()

    report = store.verify()

    assert [Path(item.path).name for item in report.damaged] == [base_chunk]
    assert "cb-mobile gc" in report.damaged[0].reason
    assert report.unreferenced_chunks == 3
    assert store.gc().chunks_removed == 3
    assert store.verify().ok


def test_verify_ignores_orphan_delta(tmp_path, rng):
    store = open_store(tmp_path)
    codes = random_codes(rng, CHUNK)
    first = store.commit({"w": tensor(codes)}, meta())
    moved = codes.copy()
    moved[::3] += 1
    second = store.commit({"w": tensor(moved)}, meta())
    manifest_path(store, second.checkpoint_id).unlink()
    store.delete(first.checkpoint_id)

    report = store.verify()

    assert report.ok, report.damaged
    assert report.unreferenced_chunks == 1


def test_verify_reports_damaged_manifest(tmp_path, rng):
    store = open_store(tmp_path)
    result = store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    path = manifest_path(store, result.checkpoint_id)
    flip_byte(path, 30)

    report = store.verify()

    assert [item.path for item in report.damaged] == [str(path)]


# ------------------------------------------------------------- write failures


def _failing_writev(matcher, error_number=errno.ENOSPC):
    real_writev = os.writev

    def writev(fd, buffers):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if matcher(target):
            raise OSError(error_number, os.strerror(error_number))
        return real_writev(fd, buffers)

    return writev


@pytest.mark.parametrize("target", ["chunk", "manifest"])
def test_disk_full_keeps_previous(tmp_path, rng, monkeypatch, target):
    store = open_store(tmp_path, fsync=True)
    first = store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())
    files_before = chunk_files(tmp_path)
    is_target = (lambda path: ".json." in path) if target == "manifest" else (lambda path: "/chunks/" in path)
    monkeypatch.setattr(os, "writev", _failing_writev(is_target))

    with pytest.raises(StoreWriteError, match="free space") as caught:
        store.commit({"w": tensor(random_codes(rng, 2 * CHUNK))}, meta())
    monkeypatch.undo()
    info, _ = store.read_latest()

    assert ".tmp" in str(caught.value)
    assert info.checkpoint_id == first.checkpoint_id
    assert chunk_files(tmp_path) == files_before
    assert not list(tmp_path.rglob("*.tmp"))


def test_fsync_failure_raises_store_write_error(tmp_path, rng, monkeypatch):
    store = open_store(tmp_path, fsync=True)

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StoreWriteError, match="could not write"):
        store.commit({"w": tensor(random_codes(rng, CHUNK))}, meta())
    monkeypatch.undo()

    assert store.checkpoints() == []


def test_short_writes_are_completed(tmp_path, rng, monkeypatch):
    real_writev = os.writev

    def short_writev(fd, buffers):
        first = bytes(buffers[0])
        return real_writev(fd, [first[: max(1, len(first) // 3)]])

    monkeypatch.setattr(os, "writev", short_writev)
    store = open_store(tmp_path)
    codes = random_codes(rng, 2 * CHUNK + 5)
    result = store.commit({"w": tensor(codes)}, meta())
    monkeypatch.undo()

    tensors, _ = store.read(result.checkpoint_id)
    assert np.array_equal(tensors["w"].buffers["codes"], codes)


# ---------------------------------------------------- processes: kill, share


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from cb_mobile.codec import EncodedTensor
    from cb_mobile.store import CheckpointStore
    root, device, count, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = CheckpointStore(root, device_id=device, chunk_bytes=4096, cap_bytes=cap or None, fsync=False)
    rng = np.random.default_rng(sum(map(ord, device)))
    shared = np.random.default_rng(0).integers(0, 256, 8 * 4096, dtype=np.uint8)
    codes = rng.integers(0, 256, 8 * 4096, dtype=np.uint8)
    for step in range(count):
        codes[rng.integers(0, codes.size, 500)] += 1
        state = {"shared": EncodedTensor({"id": "lossless", "version": 1}, shared.shape, "uint8", {"codes": shared}),
                 "own": EncodedTensor({"id": "lossless", "version": 1}, codes.shape, "uint8", {"codes": codes.copy()})}
        store.commit(state, {"loss": 1.0 / (step + 1), "model_version": "0", "step": step})
        print(step, flush=True)
""")


def _writer(root: Path, device: str, count: int, cap: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(root), device, str(count), str(cap)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_kill_during_commits_leaves_store_loadable(tmp_path):
    for attempt, delay in enumerate((0.4, 1.1)):
        writer = _writer(tmp_path, "victim", 100_000, cap=200_000)
        first_line = writer.stdout.readline()
        assert first_line, writer.stderr.read()
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()

        store = CheckpointStore(tmp_path, device_id="victim", chunk_bytes=4096, fsync=False)
        info, tensors = store.read_latest()
        store.gc()
        report = store.verify()

        assert info.meta["step"] >= 0
        assert tensors["own"].buffers["codes"].shape == (8 * 4096,)
        assert report.ok, f"attempt {attempt}: {report.damaged}"
        assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_many_kills_leave_store_loadable(tmp_path):
    kill_rng = np.random.default_rng(11)
    for attempt in range(25):
        writer = _writer(tmp_path, "victim", 100_000, cap=120_000)
        assert writer.stdout.readline(), writer.stderr.read()
        time.sleep(float(kill_rng.uniform(0.0, 0.4)))
        writer.send_signal(signal.SIGKILL)
        writer.wait()

        store = CheckpointStore(tmp_path, device_id="victim", chunk_bytes=4096, fsync=False)
        info, _ = store.read_latest()
        if attempt % 5 == 4:
            store.gc()
            report = store.verify()
            assert report.ok, f"attempt {attempt}: {report.damaged}"


def test_processes_share_root(tmp_path):
    writers = [_writer(tmp_path, f"node-{index}", 15, cap=150_000) for index in range(2)]
    outputs = [writer.communicate(timeout=120) for writer in writers]

    assert [writer.returncode for writer in writers] == [0, 0], outputs
    for index in range(2):
        store = CheckpointStore(tmp_path, device_id=f"node-{index}", chunk_bytes=4096, fsync=False)
        info, _ = store.read_latest()
        assert info.meta["step"] == 14
        assert store.size_bytes() <= 150_000
    assert store.verify().ok
    assert store.gc().chunks_removed == 0


def test_store_module_exports():
    assert store_module.CheckpointStore is CheckpointStore
    assert store_module.CommitResult is CommitResult


# Compression trial on samples of large chunks.


def test_incompressible_large_chunk_stored_raw():
    content = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()

    chunk = encode_full(chunk_id_of(content), content, Compressor.ZSTD)

    assert chunk.compressor is Compressor.NONE


def test_compressible_large_chunk_compressed():
    content = bytes(1 << 20)

    chunk = encode_full(chunk_id_of(content), content, Compressor.LZ4)

    assert chunk.compressor is Compressor.LZ4


def test_raw_large_chunk_reads_back(tmp_path):
    codes = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    store = CheckpointStore(tmp_path, fsync=False)
    store.commit({"w": EncodedTensor({"id": "lossless", "version": 1}, (codes.size,), "uint8", {"codes": codes})},
                 meta())

    tensors, _ = store.read(store.checkpoints()[-1].checkpoint_id)

    assert np.array_equal(tensors["w"].buffers["codes"], codes)


def test_raw_chunk_damage_detected(tmp_path):
    codes = np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8)
    store = CheckpointStore(tmp_path, fsync=False)
    store.commit({"w": EncodedTensor({"id": "lossless", "version": 1}, (codes.size,), "uint8", {"codes": codes})},
                 meta())
    path = max((tmp_path / "chunks").glob("*/*"), key=lambda item: item.stat().st_size)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError, match="does not match its id"):
        store.read(store.checkpoints()[-1].checkpoint_id)
