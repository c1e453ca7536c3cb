"""Hostile files: fuzzed manifests, chunks and codec configs raise only cb_mobile's own errors.

Every input goes through the real parser (``parse_manifest``, ``ChunkReader.load``,
``decode_tensor``) or through a real store (``checkpoints``, ``read_latest``,
``verify``, ``cb-mobile inspect``). Anything other than a subclass of
:class:`~cb_mobile.errors.CheckpointError` fails the test, including MemoryError: the
tests run under an address-space limit of the current size plus 1 GiB, so an
allocation sized from a hostile length field fails instead of succeeding lazily.
pytest-timeout catches a hang.

Manifests carry a checksum over their canonical JSON body, and chunks carry CRCs of
header and payload, so random damage stops at the checksum. To reach the field checks
behind it, most generated inputs are re-signed: the checksum matches the hostile
content.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cb_mobile import chunks as chunk_format
from cb_mobile import cli
from cb_mobile.codec import EncodedTensor, decode_tensor
from cb_mobile.errors import CheckpointError, CorruptCheckpointError
from cb_mobile.manifest import parse_layout, parse_manifest, place_buffers, tensor_name_problem

from . import hostile
from .stores import PopulatedStore, populate

DEFAULT_EXAMPLES = {
    "manifest_bytes": 40, "manifest_mutated": 40, "manifest_fields": 100, "layout_bytes": 30, "layout_mutated": 40,
    "layout_fields": 100, "manifest_in_store": 30, "layout_in_store": 30, "chunk_bytes": 30, "chunk_mutated": 40,
    "chunk_headers": 60, "codec": 40,
}
SLOW_FACTOR = 25
"""The slow suite runs every fuzz test with SLOW_FACTOR times the default examples."""


@dataclass
class Failures:
    """Non-library exceptions seen while fuzzing, grouped by type and raising line, with one input each."""

    signatures: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def record(self, error: BaseException, value: Any) -> None:
        """Count ``error`` under its signature and keep the first input that raised it."""
        frame = traceback.extract_tb(error.__traceback__)[-1]
        key = f"{type(error).__name__} at {Path(frame.filename).name}:{frame.lineno}: {str(error)[:100]}"
        self.signatures[key] += 1
        self.examples.setdefault(key, repr(value)[:400])

    def summary(self) -> str:
        """One paragraph per signature: count, signature and an input that raised it."""
        return "\n".join(f"{count} x {key}\n    input: {self.examples[key]}" for key, count in self.signatures.most_common())


def fuzz(strategy: st.SearchStrategy, check: Callable[[Any], None], examples: int, slow: bool,
         failures: Failures) -> int:
    """Run ``check`` on ``examples`` inputs drawn from ``strategy``; return how many ran.

    Exceptions other than pytest outcomes go to ``failures`` instead of stopping the
    run, so one known bug does not hide the others and every input is tried. The
    default suite is derandomized so it is reproducible; the slow suite draws fresh
    inputs on each run.
    """
    count = 0

    @settings(max_examples=examples, deadline=None, database=None, derandomize=not slow,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value: Any) -> None:
        nonlocal count
        count += 1
        try:
            check(value)
        except (KeyboardInterrupt, SystemExit, pytest.fail.Exception, pytest.skip.Exception):
            raise
        except BaseException as error:  # noqa: BLE001 - every escaping exception is a finding to report
            failures.record(error, value)

    run()
    return count


def only_library_errors(call: Callable[[], Any]) -> Any:
    """Run ``call``; return its result, or None when it raised a CheckpointError. Anything else propagates."""
    try:
        return call()
    except CheckpointError:
        return None


def _check_manifest_invariants(manifest: Any) -> None:
    """A manifest that parsed must reference only well-formed chunk ids, so no path can leave the chunk folder."""
    assert all(chunk_format.is_chunk_id(chunk_id) for chunk_id in manifest.chunks)
    for chunk_id in (*manifest.layout.chunks, *manifest.pack.chunks):
        assert chunk_id in manifest.chunks
    for chunks in manifest.placements:
        assert chunks is None or all(chunk_id in manifest.chunks for chunk_id in chunks)


# Manifests --------------------------------------------------------------------------


def _parse(data: bytes) -> None:
    manifest = only_library_errors(lambda: parse_manifest(data, "fuzzed.json"))
    if manifest is not None:
        _check_manifest_invariants(manifest)


@st.composite
def mutated_manifests(draw: Callable[..., Any]) -> bytes:
    """Valid manifest bytes with bytes replaced, inserted or removed, re-signed half of the time."""
    data = bytearray(hostile.sign(hostile.valid_document(draw(st.integers(0, 3)))))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[position]
    if draw(st.booleans()):
        try:
            return hostile.sign(json.loads(bytes(data)))
        except (ValueError, TypeError, RecursionError):
            pass
    return bytes(data)


def _parse_layout(data: bytes) -> None:
    """Parse a layout, and place it against the genuine manifest when it parses: only CheckpointErrors."""
    layout = only_library_errors(lambda: parse_layout(data, "fuzzed-layout"))
    if layout is None:
        return
    for tensor in layout:
        assert tensor_name_problem(tensor.name) is None, tensor.name
    manifest = parse_manifest(hostile.sign(hostile.valid_document(0)), "genuine.json")
    only_library_errors(lambda: place_buffers(manifest, layout, "genuine.json"))


def _layout_bytes(document: dict[str, Any]) -> bytes:
    return hostile.canonical_json(document)


@st.composite
def mutated_layouts(draw: Callable[..., Any]) -> bytes:
    """Genuine layout bytes with bytes replaced, inserted or removed."""
    data = bytearray(_layout_bytes(hostile.valid_layout(draw(st.integers(0, 1)))))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[position]
    return bytes(data)


hostile_layouts = hostile.hostile_documents(base=hostile.valid_layout).map(_layout_bytes)


def _run_manifest_fuzz(slow: bool, failures: Failures, record_figure: Callable[[str, object], None]) -> int:
    factor = SLOW_FACTOR if slow else 1
    failures_before = sum(failures.signatures.values())
    counts = {
        "manifest_bytes": fuzz(st.binary(max_size=600), _parse, DEFAULT_EXAMPLES["manifest_bytes"] * factor, slow, failures),
        "manifest_mutated": fuzz(mutated_manifests(), _parse, DEFAULT_EXAMPLES["manifest_mutated"] * factor, slow, failures),
        "manifest_fields": fuzz(hostile.hostile_documents().map(hostile.sign), _parse,
                                DEFAULT_EXAMPLES["manifest_fields"] * factor, slow, failures),
        "layout_bytes": fuzz(st.binary(max_size=600), _parse_layout, DEFAULT_EXAMPLES["layout_bytes"] * factor, slow, failures),
        "layout_mutated": fuzz(mutated_layouts(), _parse_layout, DEFAULT_EXAMPLES["layout_mutated"] * factor, slow, failures),
        "layout_fields": fuzz(hostile_layouts, _parse_layout, DEFAULT_EXAMPLES["layout_fields"] * factor, slow, failures),
    }
    record_figure(f"{'slow_' if slow else ''}hostile_manifest_inputs",
                  {**counts, "non_library_exceptions": sum(failures.signatures.values()) - failures_before})
    return sum(counts.values())


@pytest.mark.timeout(180)
def test_manifest_parser_fuzz(address_space_limit: int, record_figure) -> None:
    failures = Failures()
    total = _run_manifest_fuzz(False, failures, record_figure)

    assert total >= 300
    assert not failures.signatures, f"parsers raised non-library exceptions:\n{failures.summary()}"


@pytest.mark.parametrize("declared, chunk_bytes", [(1 << 40, 1 << 12), (1 << 40, 1), (1 << 36, 64)])
@pytest.mark.timeout(60)
def test_manifest_huge_declared_stream(address_space_limit: int, declared: int, chunk_bytes: int) -> None:
    data = hostile.sign(hostile.huge_stream_document(declared, chunk_bytes))

    with pytest.raises(CorruptCheckpointError):
        parse_manifest(data, "huge.json")


@pytest.mark.parametrize("declared", [1 << 40, 1 << 36])
@pytest.mark.timeout(60)
def test_layout_huge_declared_buffer(address_space_limit: int, declared: int) -> None:
    manifest = parse_manifest(hostile.sign(hostile.valid_document(0)), "genuine.json")
    layout = parse_layout(_layout_bytes(hostile.huge_buffer_layout(declared)), "huge-layout")

    with pytest.raises(CorruptCheckpointError):
        place_buffers(manifest, layout, "genuine.json")


@pytest.mark.timeout(60)
def test_store_huge_declared_buffer(tmp_path: Path, address_space_limit: int) -> None:
    populated = populate(tmp_path / "store", 2)
    hostile.forge_checkpoint(populated, _layout_bytes(hostile.huge_buffer_layout(1 << 40)))
    store = populated.open()

    info, _ = store.read_latest()

    assert info.checkpoint_id == populated.ids[-1]


@pytest.mark.timeout(60)
def test_store_huge_declared_stream(tmp_path: Path) -> None:
    populated = populate(tmp_path / "store", 2)
    document = hostile.huge_stream_document(1 << 40, 1)
    document.update(seq=98, checkpoint_id="00000098-0000abcd")
    populated.manifest_path("00000098-0000abcd").write_bytes(hostile.sign(document))
    store = populated.open()

    info, _ = store.read_latest()

    assert info.checkpoint_id == populated.ids[-1]


@pytest.mark.timeout(60)
def test_manifest_deep_nesting() -> None:
    limit = sys.getrecursionlimit()
    outcomes = Counter()
    for depth in [*range(max(1, limit - 300), limit + 20), 10 * limit, 100_000]:
        try:
            parse_manifest(hostile.deep_document(depth), "deep.json")
        except CorruptCheckpointError:
            outcomes["rejected"] += 1
        except RecursionError as error:
            pytest.fail(f"nesting depth {depth} raised RecursionError instead of CorruptCheckpointError: {error}")
        else:
            outcomes["parsed"] += 1

    assert outcomes["rejected"] > 0


# Hostile files planted in a real store -----------------------------------------------


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> PopulatedStore:
    """A store with two genuine checkpoints; fuzz tests plant extra manifests next to them."""
    return populate(tmp_path_factory.mktemp("hostile") / "store", 2)


def _files_outside(root: Path) -> set[tuple[str, int]]:
    """Return the files next to the store root (not under it), with their sizes."""
    return {(str(path), path.stat().st_size) for path in root.parent.rglob("*")
            if path.is_file() and root not in path.parents}


def _load_planted(populated: PopulatedStore, planted: Path, tally: Counter) -> None:
    """List, load, verify and inspect a store with a planted file: only CheckpointErrors, no stray files."""
    before = _files_outside(populated.root)
    try:
        store = populated.open()
        only_library_errors(store.checkpoints)
        try:
            info, tensors = store.read_latest()
        except CheckpointError as error:
            raise AssertionError(f"a planted file made read_latest raise {type(error).__name__} although genuine "
                                 f"checkpoints exist: {error}") from error
        if info.checkpoint_id in populated.ids:
            assert info.checkpoint_id == populated.ids[-1]
            tally["read_latest_fell_back"] += 1
        else:
            tally["read_latest_loaded_planted"] += 1
            for encoded in tensors.values():
                only_library_errors(lambda: decode_tensor(encoded))
        report = only_library_errors(store.verify)
        if report is not None:
            tally["verify_flagged" if not report.ok else "verify_ok"] += 1
        only_library_errors(store.size_bytes)
    finally:
        planted.unlink(missing_ok=True)

    assert _files_outside(populated.root) == before, "loading a planted file touched files outside the store"


@st.composite
def planted_manifests(draw: Callable[..., Any]) -> tuple[bytes, str]:
    """A hostile manifest and the file name to plant it under (its own checkpoint id when it looks valid)."""
    document = draw(hostile.hostile_documents())
    checkpoint_id = document.get("checkpoint_id")
    if not (isinstance(checkpoint_id, str) and checkpoint_id.count("-") == 1 and len(checkpoint_id) == 17):
        checkpoint_id = "00000099-00000000"
    return hostile.sign(document), f"{checkpoint_id}.json"


def _run_store_fuzz(populated: PopulatedStore, slow: bool, failures: Failures,
                    record_figure: Callable[[str, object], None]) -> int:
    tally: Counter = Counter()
    folder = populated.manifest_path(populated.ids[0]).parent
    factor = SLOW_FACTOR if slow else 1
    failures_before = sum(failures.signatures.values())

    def plant_manifest(item: tuple[bytes, str]) -> None:
        path = folder / item[1]
        path.write_bytes(item[0])
        _load_planted(populated, path, tally)

    def plant_layout(layout: bytes) -> None:
        _load_planted(populated, hostile.forge_checkpoint(populated, layout), tally)

    counts = {
        "manifests": fuzz(planted_manifests(), plant_manifest, DEFAULT_EXAMPLES["manifest_in_store"] * factor, slow,
                          failures),
        "layouts": fuzz(hostile_layouts | mutated_layouts(), plant_layout, DEFAULT_EXAMPLES["layout_in_store"] * factor,
                        slow, failures),
    }
    record_figure(f"{'slow_' if slow else ''}hostile_files_in_store",
                  {**counts, **tally, "non_library_exceptions": sum(failures.signatures.values()) - failures_before})
    return sum(counts.values())


@pytest.mark.timeout(180)
def test_store_planted_file_fuzz(planted_store: PopulatedStore, address_space_limit: int, record_figure) -> None:
    failures = Failures()
    count = _run_store_fuzz(planted_store, False, failures, record_figure)

    assert count >= 40
    assert not failures.signatures, f"loading planted files raised non-library exceptions:\n{failures.summary()}"


def _lossless_floats(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.float32)


CODEC_CASES = {
    "unknown codec id": EncodedTensor({"id": "no-such-codec", "version": 1}, (16,), "float32",
                                      {"codes": _lossless_floats(16)}),
    "future codec version": EncodedTensor({"id": "int8", "version": 99}, (16,), "float32",
                                          {"codes": np.zeros(16, np.uint8), "scale": _lossless_floats(1),
                                           "minimum": _lossless_floats(1)}),
    "unknown codec parameter": EncodedTensor({"id": "lossless", "version": 1, "__class__": "os.system"}, (16,),
                                             "float32", {"codes": _lossless_floats(16)}),
    "shape larger than buffers": EncodedTensor({"id": "lossless", "version": 1}, (4096, 4096), "float32",
                                               {"codes": _lossless_floats(16)}),
    "absurd shape": EncodedTensor({"id": "lossless", "version": 1}, (2**40,), "float32",
                                  {"codes": _lossless_floats(16)}),
    "dtype wider than buffers": EncodedTensor({"id": "lossless", "version": 1}, (16,), "float64",
                                              {"codes": _lossless_floats(16)}),
    "unsupported dtype": EncodedTensor({"id": "lossless", "version": 1}, (16,), "complex32",
                                       {"codes": _lossless_floats(16)}),
    "int8 codes as int16": EncodedTensor({"id": "int8", "version": 1}, (16,), "float32",
                                         {"codes": np.zeros(16, np.int16), "scale": _lossless_floats(1),
                                          "minimum": _lossless_floats(1)}),
    "int8 without scale": EncodedTensor({"id": "int8", "version": 1}, (16,), "float32",
                                        {"codes": np.zeros(16, np.uint8)}),
}


@pytest.mark.parametrize("case", sorted(CODEC_CASES))
@pytest.mark.timeout(60)
def test_store_hostile_codec_fields(tmp_path: Path, address_space_limit: int, case: str,
                                    capsys: pytest.CaptureFixture) -> None:
    populated = populate(tmp_path / "store", 1)
    store = populated.open()
    committed = store.commit({"model/weight": CODEC_CASES[case]}, {"loss": 0.1, "model_version": "v1"})

    info, tensors = store.read_latest()
    assert info.checkpoint_id == committed.checkpoint_id
    with pytest.raises(CheckpointError):
        decode_tensor(tensors["model/weight"])

    output = tmp_path / "export.pt"
    status = cli.main(["export", str(populated.root), "--device", "device-0", "--format", "torch", "-o", str(output)])
    assert status == cli.EXIT_ERROR, capsys.readouterr()
    assert not output.exists()


# Chunks -----------------------------------------------------------------------------


BASE_CONTENT = bytes(range(256)) * 4


@pytest.fixture(scope="module")
def chunk_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chunk folder holding one genuine full chunk that hostile deltas may name as base."""
    folder = tmp_path_factory.mktemp("chunks") / "chunks"
    chunk = chunk_format.encode_full(chunk_format.chunk_id_of(BASE_CONTENT), BASE_CONTENT, chunk_format.Compressor.LZ4)
    path = chunk_format.chunk_path(folder, chunk.chunk_id)
    path.parent.mkdir(parents=True)
    path.write_bytes(chunk.header + bytes(chunk.payload))
    return folder


def _load_chunk(folder: Path, chunk_id: str, data: bytes) -> None:
    """Write ``data`` as chunk ``chunk_id`` and load it; a success must hash to the id."""
    path = chunk_format.chunk_path(folder, chunk_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    try:
        raw = only_library_errors(lambda: chunk_format.ChunkReader(folder).load(chunk_id))
        if raw is not None:
            assert chunk_format.chunk_id_of(raw) == chunk_id
    finally:
        if chunk_id != chunk_format.chunk_id_of(BASE_CONTENT):
            path.unlink(missing_ok=True)


@st.composite
def hostile_chunks(draw: Callable[..., Any]) -> tuple[str, bytes]:
    """A chunk file with chosen header fields and valid header CRC, under a chosen id."""
    content = draw(st.binary(max_size=1500))
    compressor = draw(st.sampled_from([0, 1, 2]) | st.integers(0, 255))
    encoding = draw(st.sampled_from([0, 1, 2]) | st.integers(0, 255))
    payload = draw(st.sampled_from(["compressed", "raw", "random"]))
    if payload == "compressed" and compressor in (1, 2):
        stored = hostile.compressed(content, compressor)
    elif payload == "random":
        stored = draw(st.binary(max_size=300))
    else:
        stored = content

    base_choice = draw(st.sampled_from(["zero", "genuine", "self", "random"]))
    depth = draw(st.sampled_from([0, 1, 2, 64, 65, 255]))
    raw_length = draw(st.sampled_from([len(content), 0, len(content) + 1, len(BASE_CONTENT), 1 << 26, (1 << 26) + 1,
                                       2**32 - 1]) | st.integers(0, 2**32 - 1))
    payload_length = draw(st.sampled_from([None, 0, 1, 2**32 - 1]) | st.integers(0, 2**32 - 1))
    payload_crc = draw(st.sampled_from([None, 0]))
    version = draw(st.sampled_from([chunk_format.CHUNK_FORMAT_VERSION, 0, 2, 255]))
    magic = draw(st.sampled_from([chunk_format.CHUNK_MAGIC, b"CBCX", b"\0\0\0\0"]))

    chunk_id = draw(st.sampled_from([chunk_format.chunk_id_of(content), chunk_format.chunk_id_of(BASE_CONTENT + b"x"),
                                     "ab" * 32]))
    base = {
        "zero": bytes(32), "genuine": bytes.fromhex(chunk_format.chunk_id_of(BASE_CONTENT)),
        "self": bytes.fromhex(chunk_id), "random": draw(st.binary(min_size=32, max_size=32)),
    }[base_choice]
    data = hostile.pack_chunk(magic, version, compressor, encoding, depth, raw_length, stored, base,
                              payload_length, payload_crc)
    return chunk_id, data


@st.composite
def mutated_chunks(draw: Callable[..., Any]) -> tuple[str, bytes]:
    """A genuine full or delta chunk with bytes changed, CRCs recomputed half of the time."""
    content = draw(st.binary(min_size=len(BASE_CONTENT), max_size=len(BASE_CONTENT)))
    chunk_id = chunk_format.chunk_id_of(content)
    if draw(st.booleans()):
        chunk = chunk_format.encode_full(chunk_id, content, draw(st.sampled_from(list(chunk_format.Compressor))))
    else:
        chunk = chunk_format.encode_delta(chunk_id, content, chunk_format.Encoding.DELTA_XOR,
                                          chunk_format.chunk_id_of(BASE_CONTENT), BASE_CONTENT, 0,
                                          draw(st.sampled_from(list(chunk_format.Compressor))))
    data = bytearray(chunk.header + bytes(chunk.payload))
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))

    if draw(st.booleans()):
        fields = hostile.HEADER.unpack(bytes(data[: hostile.HEADER.size]))
        payload = bytes(data[chunk_format.HEADER_BYTES:])
        data = bytearray(hostile.pack_chunk(*fields[:6], payload, fields[8], payload_length=fields[6]))
    return chunk_id, bytes(data)


def _run_chunk_fuzz(folder: Path, slow: bool, failures: Failures, record_figure: Callable[[str, object], None]) -> int:
    factor = SLOW_FACTOR if slow else 1

    def load(item: tuple[str, bytes]) -> None:
        _load_chunk(folder, item[0], item[1])

    failures_before = sum(failures.signatures.values())
    counts = {
        "chunk_bytes": fuzz(st.binary(max_size=400).map(lambda data: ("cd" * 32, data)), load,
                            DEFAULT_EXAMPLES["chunk_bytes"] * factor, slow, failures),
        "chunk_mutated": fuzz(mutated_chunks(), load, DEFAULT_EXAMPLES["chunk_mutated"] * factor, slow, failures),
        "chunk_headers": fuzz(hostile_chunks(), load, DEFAULT_EXAMPLES["chunk_headers"] * factor, slow, failures),
    }
    record_figure(f"{'slow_' if slow else ''}hostile_chunk_inputs",
                  {**counts, "non_library_exceptions": sum(failures.signatures.values()) - failures_before})
    return sum(counts.values())


@pytest.mark.timeout(180)
def test_chunk_parser_fuzz(chunk_folder: Path, address_space_limit: int, record_figure) -> None:
    failures = Failures()
    total = _run_chunk_fuzz(chunk_folder, False, failures, record_figure)

    assert total >= 100
    assert not failures.signatures, f"chunk loading raised non-library exceptions:\n{failures.summary()}"


# Codec configs and encoded tensors ---------------------------------------------------


@st.composite
def hostile_encoded(draw: Callable[..., Any]) -> EncodedTensor:
    """An EncodedTensor as a hostile manifest could describe it: any config, shape, dtype and buffers."""
    codec = draw(st.sampled_from(hostile.HOSTILE_CODECS + [{"id": "int8", "version": 1}, {"id": "int4", "version": 1},
                                                            {"id": "fp16", "version": 1},
                                                            {"id": "lossless", "version": 1}]))
    shape = draw(st.sampled_from(hostile.HOSTILE_SHAPES) | st.lists(st.integers(0, 6), max_size=3))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "complex64", "float8_e4m3fn",
                                  "qint8", "object", "", 5]))
    buffers = {}
    for name in draw(st.lists(st.sampled_from(["codes", "scale", "minimum", "../x", "data"]), max_size=3, unique=True)):
        numpy_dtype = draw(st.sampled_from(["|u1", "<f4", "<f2", "<i8", "|b1", "<u2", "<c8"]))
        size = draw(st.integers(0, 64))
        buffers[name] = np.frombuffer(draw(st.binary(min_size=size * np.dtype(numpy_dtype).itemsize,
                                                     max_size=size * np.dtype(numpy_dtype).itemsize)),
                                      dtype=numpy_dtype).copy()
    return EncodedTensor(codec, shape, dtype, buffers)


def _decode(encoded: EncodedTensor) -> None:
    decoded = only_library_errors(lambda: decode_tensor(encoded))
    if decoded is not None:
        assert isinstance(decoded, torch.Tensor)
        assert tuple(decoded.shape) == tuple(encoded.shape)


@pytest.mark.timeout(120)
def test_codec_decode_fuzz(address_space_limit: int, record_figure) -> None:
    failures = Failures()
    count = fuzz(hostile_encoded(), _decode, DEFAULT_EXAMPLES["codec"], False, failures)
    record_figure("hostile_codec_inputs", {"inputs": count, "non_library_exceptions": sum(failures.signatures.values())})

    assert count >= 30
    assert not failures.signatures, f"decode raised non-library exceptions:\n{failures.summary()}"


# Slow suite -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_hostile_fuzz_slow(planted_store: PopulatedStore, chunk_folder: Path, address_space_limit: int,
                           record_figure) -> None:
    failures = Failures()
    total = _run_manifest_fuzz(True, failures, record_figure)
    total += _run_store_fuzz(planted_store, True, failures, record_figure)
    total += _run_chunk_fuzz(chunk_folder, True, failures, record_figure)
    codec_count = fuzz(hostile_encoded(), _decode, DEFAULT_EXAMPLES["codec"] * SLOW_FACTOR, True, failures)
    record_figure("slow_hostile_codec_inputs", codec_count)
    total += codec_count
    record_figure("slow_hostile_inputs_total", {"inputs": total, "non_library_exceptions": dict(failures.signatures)})

    assert total >= 10_000
    assert not failures.signatures, f"non-library exceptions:\n{failures.summary()}"
