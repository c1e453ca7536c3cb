"""Tests of the tensor codecs: round trips, error bounds, configs and damaged buffers."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cb_mobile import codec as codec_module
from cb_mobile.codec import (
    MAX_NUMEL,
    Codec,
    EncodedTensor,
    Fp16Codec,
    Int4Codec,
    Int8Codec,
    LosslessCodec,
    codec_from_config,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    get_codec,
    quantization_error_bound,
    register_codec,
)
from cb_mobile.errors import CheckpointError, CodecError

CODEC_NAMES = ["int8", "int4", "fp16", "lossless"]
QUANTIZERS = ["int8", "int4"]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def as_stored(encoded: EncodedTensor) -> EncodedTensor:
    """Return ``encoded`` as a reader gets it back from disk.

    The config and shape go through JSON, and each buffer becomes a read-only array
    over a bytes copy, as ``np.frombuffer`` returns it.
    """
    header = json.loads(json.dumps({"codec": encoded.codec, "shape": list(encoded.shape), "dtype": encoded.dtype}))
    buffers = {name: np.frombuffer(array.tobytes(), dtype=array.dtype.str) for name, array in encoded.buffers.items()}
    return EncodedTensor(header["codec"], tuple(header["shape"]), header["dtype"], buffers)


def round_trip(tensor: torch.Tensor, codec: str | Codec) -> tuple[EncodedTensor, torch.Tensor]:
    encoded = as_stored(encode_tensor(tensor, codec))
    return encoded, decode_tensor(encoded)


def max_abs_error(original: torch.Tensor, decoded: torch.Tensor) -> float:
    if original.numel() == 0:
        return 0.0
    return float((original.double() - decoded.double()).abs().max())


def same_bits(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Compare two tensors bit for bit, so that NaN payloads and -0.0 count."""
    if first.dtype != second.dtype or first.shape != second.shape:
        return False
    layout = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}
    size = first.element_size()
    if first.dtype == torch.bool:
        return torch.equal(first, second)
    if size == 16:
        return torch.equal(torch.view_as_real(first).view(torch.int64), torch.view_as_real(second).view(torch.int64))
    return torch.equal(first.contiguous().view(layout[size]), second.contiguous().view(layout[size]))


def tensor_kinds() -> dict[str, Callable[[], torch.Tensor]]:
    """Factories of the tensor shapes, layouts and dtypes every codec must accept."""
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    def shared_views() -> torch.Tensor:
        base = normal(4, 6)
        return base[1:3]

    return {
        "0-d": lambda: torch.tensor(-2.75),
        "1-D": lambda: normal(17),
        "2-D": lambda: normal(8, 5),
        "4-D conv": lambda: normal(6, 3, 3, 3),
        "empty 1-D": lambda: torch.empty(0),
        "empty rows": lambda: torch.empty(0, 5),
        "empty columns": lambda: torch.empty(5, 0),
        "transposed": lambda: normal(5, 8).t(),
        "strided slice": lambda: normal(9, 10)[::2, 1::3],
        "expanded": lambda: normal(4, 1).expand(4, 6),
        "view of shared storage": shared_views,
        "permuted 3-D": lambda: normal(3, 4, 5).permute(2, 0, 1),
        "bfloat16": lambda: normal(7, 9, dtype=torch.bfloat16),
        "transposed bfloat16": lambda: normal(9, 7, dtype=torch.bfloat16).t(),
        "float16": lambda: normal(7, 9, dtype=torch.float16),
        "float64": lambda: normal(7, 9, dtype=torch.float64),
        "requires grad": lambda: torch.nn.Parameter(normal(4, 4)),
        "constant": lambda: torch.full((3, 4), 0.125),
    }


KINDS = tensor_kinds()


# Round trips of every tensor kind.


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_dtype_and_shape(name, kind):
    tensor = KINDS[kind]()
    _, decoded = round_trip(tensor, name)

    assert decoded.dtype == tensor.dtype
    assert decoded.shape == tensor.shape
    assert decoded.is_contiguous()
    assert decoded.device.type == "cpu"
    assert not decoded.requires_grad


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_within_bound(name, kind):
    tensor = KINDS[kind]()
    encoded, decoded = round_trip(tensor, name)

    assert max_abs_error(tensor.detach(), decoded) <= quantization_error_bound(encoded)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_with_encoding_codec(name):
    codec = get_codec(name)
    tensor = torch.randn(6, 4)

    decoded = codec.decode(codec.encode(tensor))

    assert decoded.shape == tensor.shape


def test_lossless_float_bits_exact():
    special = [0.0, -0.0, 1.0, -1.5, float("inf"), float("-inf"), float("nan"), 1e-40, 3.0e38]
    for dtype in FLOAT_DTYPES:
        tensor = torch.tensor(special, dtype=torch.float64).to(dtype)
        _, decoded = round_trip(tensor, "lossless")
        assert same_bits(decoded, tensor), dtype


def test_lossless_nan_payload_kept():
    bits = torch.tensor([0x7FC00001, 0x7F800123, -0x00400001], dtype=torch.int32)
    tensor = bits.view(torch.float32)

    _, decoded = round_trip(tensor, "lossless")

    assert torch.equal(decoded.view(torch.int32), bits)


def test_lossless_bfloat16_stored_as_uint16():
    encoded = encode_tensor(torch.randn(3, 2).bfloat16(), "lossless")

    assert encoded.buffers["codes"].dtype == np.uint16


def test_lossless_random_float64_exact():
    tensor = torch.randn(50, 7, dtype=torch.float64) * 1e200

    _, decoded = round_trip(tensor, "lossless")

    assert same_bits(decoded, tensor)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(12345, dtype=torch.int64),
        torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64),
        torch.arange(-5, 5, dtype=torch.int32).reshape(2, 5),
        torch.tensor([[True, False], [False, True]]),
        torch.tensor([0, 255, 7], dtype=torch.uint8),
        torch.tensor([-128, 127], dtype=torch.int8),
        torch.tensor([-(2**15), 2**15 - 1], dtype=torch.int16),
        torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64),
        torch.empty(0, 3, dtype=torch.int64),
    ],
    ids=lambda tensor: f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}",
)
def test_non_float_stored_exactly(name, tensor):
    encoded, decoded = round_trip(tensor, name)

    assert encoded.codec["id"] == "lossless"
    assert same_bits(decoded, tensor)


def test_num_batches_tracked_exact():
    batch_norm = torch.nn.BatchNorm1d(4)
    batch_norm(torch.randn(8, 4))
    state = batch_norm.state_dict()

    decoded = {key: round_trip(value, "int4")[1] for key, value in state.items()}

    assert torch.equal(decoded["num_batches_tracked"], state["num_batches_tracked"])
    assert decoded["num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decoded_state_dict_loads(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    decoded = {key: round_trip(value, name)[1] for key, value in model.state_dict().items()}

    model.load_state_dict(decoded)
    decoded["0.weight"].add_(1.0)

    assert torch.isfinite(model(torch.randn(5, 4))).all()


def test_float8_goes_lossless():
    tensor = torch.randn(5).to(torch.float8_e4m3fn)

    encoded, decoded = round_trip(tensor, "int8")

    assert encoded.codec["id"] == "lossless"
    assert same_bits(decoded, tensor)


# Views, copies and inputs.


def test_shared_storage_views_encode_own_values():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    top, bottom = base[:2], base[2:]

    for codec in CODEC_NAMES:
        top_encoded = encode_tensor(top, codec)
        bottom_encoded = encode_tensor(bottom, codec)
        assert top_encoded.buffers["codes"].size <= top.numel(), codec
        assert torch.equal(decode_tensor(bottom_encoded).round(), bottom), codec


def test_lossless_encode_copies_values():
    tensor = torch.zeros(4)
    encoded = encode_tensor(tensor, "lossless")

    tensor.add_(1.0)

    assert torch.equal(decode_tensor(encoded), torch.zeros(4))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_returns_new_tensor(name):
    encoded = encode_tensor(torch.randn(3, 3), name)
    first = decode_tensor(encoded)

    first.fill_(123.0)

    assert not torch.equal(decode_tensor(encoded), first)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_unaligned_buffers(name):
    tensor = torch.randn(5, 3)
    encoded = encode_tensor(tensor, name)
    unaligned = {}
    for key, array in encoded.buffers.items():
        raw = b"\x00" + array.tobytes()
        unaligned[key] = np.frombuffer(raw, dtype=array.dtype, offset=1)

    decoded = decode_tensor(replace(encoded, buffers=unaligned))

    assert torch.equal(decoded, decode_tensor(encoded))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_buffers_contiguous_1d(name):
    encoded = encode_tensor(torch.randn(5, 4).t(), name)

    for buffer in encoded.buffers.values():
        assert buffer.ndim == 1
        assert buffer.flags.c_contiguous


def test_encode_requires_grad_detached():
    layer = torch.nn.Linear(3, 2)
    loss = layer(torch.randn(4, 3)).sum()

    encoded = encode_tensor(layer.weight, "int8")
    loss.backward()

    assert encoded.shape == (2, 3)


@pytest.mark.parametrize(
    "value",
    [
        "not a tensor",
        torch.empty(3, 3, device="meta"),
        torch.eye(3).to_sparse(),
    ],
    ids=["str", "meta", "sparse"],
)
def test_encode_rejects_unusable_input(value):
    with pytest.raises(CodecError):
        encode_tensor(value, "int8")


def test_codec_error_is_checkpoint_error():
    with pytest.raises(CheckpointError):
        get_codec("int3")


# Quantization error bounds.


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_channel_error_within_half_step(name, dtype):
    channel_scale = torch.logspace(-3, 3, 16).reshape(16, 1, 1)
    tensor = (torch.randn(16, 8, 9) * channel_scale + 5 * channel_scale).to(dtype)

    encoded, decoded = round_trip(tensor, name)
    errors = (tensor.double() - decoded.double()).abs().reshape(16, -1).amax(dim=1).numpy()
    half_step = encoded.buffers["scale"].astype(np.float64) / 2
    # The codec computes in float32, so float64 tensors get float32 rounding too.
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    rounding = 4 * eps * tensor.double().abs().reshape(16, -1).amax(dim=1).numpy()

    assert (errors <= half_step + rounding).all()


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_channel_error_within_channel_bounds(name, dtype):
    tensor = (torch.randn(12, 30) * torch.logspace(-4, 4, 12).reshape(12, 1)).to(dtype)

    encoded, decoded = round_trip(tensor, name)
    errors = (tensor.double() - decoded.double()).abs().amax(dim=1).numpy()

    assert (errors <= get_codec(name).channel_error_bounds(encoded)).all()


def test_float32_bound_tight():
    tensor = torch.randn(32, 100)

    encoded = encode_tensor(tensor, "int8")
    half_step = float(encoded.buffers["scale"].max()) / 2

    assert quantization_error_bound(encoded) <= half_step + 1e-5


@pytest.mark.parametrize("name, levels", [("int8", 255), ("int4", 15)])
def test_extremes_get_end_codes(name, levels):
    tensor = torch.linspace(-3.0, 5.0, 101)

    encoded = encode_tensor(tensor, name)
    decoded = decode_tensor(encoded)

    assert float(decoded[0]) == pytest.approx(-3.0, abs=1e-6)
    assert float(decoded[-1]) == pytest.approx(5.0, abs=1e-5)
    assert float(encoded.buffers["scale"][0]) == pytest.approx(8.0 / levels)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_per_channel_scales(name):
    tensor = torch.stack([torch.linspace(0, 1e-3, 50), torch.linspace(-1e3, 1e3, 50)])

    encoded, decoded = round_trip(tensor, name)

    assert encoded.buffers["scale"].shape == (2,)
    assert max_abs_error(tensor[0], decoded[0]) < 1e-4


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("shape", [(), (1,), (40,)])
def test_per_tensor_below_two_dims(name, shape):
    encoded = encode_tensor(torch.randn(shape), name)

    assert encoded.buffers["scale"].shape == (1,)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_per_channel_false_one_scale(name):
    codec = codec_from_config({"id": name, "version": 1, "per_channel": False})
    tensor = torch.randn(6, 5)

    encoded, decoded = round_trip(tensor, codec)

    assert encoded.buffers["scale"].shape == (1,)
    assert max_abs_error(tensor, decoded) <= quantization_error_bound(encoded)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_constant_channels_exact(name, dtype):
    tensor = torch.tensor([[0.0, 0.0, 0.0], [2.5, 2.5, 2.5], [-7.0, 1.0, 3.0]], dtype=dtype)

    encoded, decoded = round_trip(tensor, name)

    assert not torch.isnan(decoded).any()
    assert torch.equal(decoded[:2], tensor[:2])
    assert encoded.buffers["scale"][0] == 0


@pytest.mark.parametrize("name", QUANTIZERS)
def test_tiny_range_no_nan(name):
    tensor = torch.tensor([[1e-42, 2e-42, 3e-42], [1.0, 1.0 + 2**-23, 1.0]])

    encoded, decoded = round_trip(tensor, name)

    assert torch.isfinite(decoded).all()
    assert max_abs_error(tensor, decoded) <= quantization_error_bound(encoded)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_large_offset_within_bound(name):
    tensor = 1e6 + torch.rand(4, 64, dtype=torch.float64) * 1e-3

    encoded, decoded = round_trip(tensor, name)

    assert max_abs_error(tensor, decoded) <= quantization_error_bound(encoded)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("block", [1, 7, 64])
@pytest.mark.parametrize("shape", [(3, 10), (5, 3, 3), (23,), (2, 131)])
def test_small_blocks_same_result(monkeypatch, name, block, shape):
    tensor = torch.randn(shape)
    reference = encode_tensor(tensor, name)
    reference_decoded = decode_tensor(reference)

    monkeypatch.setattr(codec_module, "BLOCK_NUMEL", block)
    blocked = encode_tensor(tensor, name)
    decoded = decode_tensor(as_stored(blocked))

    assert np.array_equal(blocked.buffers["codes"], reference.buffers["codes"])
    assert torch.equal(decoded, reference_decoded)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_rows_longer_than_block(name):
    tensor = torch.randn(3, codec_module.BLOCK_NUMEL + 4)

    encoded, decoded = round_trip(tensor[:, 1:], name)

    assert max_abs_error(tensor[:, 1:], decoded) <= quantization_error_bound(encoded)


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
        elements=st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32),
    ),
    name=st.sampled_from(QUANTIZERS),
)
def test_bound_holds_property(data, name):
    tensor = torch.from_numpy(data.copy())

    encoded, decoded = round_trip(tensor, name)

    assert max_abs_error(tensor, decoded) <= quantization_error_bound(encoded)


def test_int4_codes_packed():
    tensor = torch.randn(5, 3)

    encoded = encode_tensor(tensor, "int4")

    assert encoded.buffers["codes"].shape == (8,)
    assert encoded.buffers["codes"][-1] >> 4 == 0


def test_int8_nbytes():
    encoded = encode_tensor(torch.randn(1000), "int8")

    assert encoded.nbytes == 1000 + 4 + 4


# Non-finite and out-of-range values.


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantizer_rejects_non_finite(name, bad):
    tensor = torch.randn(4, 4)
    tensor[2, 1] = bad

    with pytest.raises(CodecError, match="lossless"):
        encode_tensor(tensor, name)


def test_nan_error_counts_values():
    tensor = torch.zeros(10)
    tensor[[1, 4]] = float("nan")
    tensor[7] = float("inf")

    with pytest.raises(CodecError, match="2 NaN and 1 infinite"):
        encode_tensor(tensor, "int8")


def test_float64_beyond_float32_rejected():
    tensor = torch.tensor([1e300, -1.0], dtype=torch.float64)

    with pytest.raises(CodecError, match="lossless"):
        encode_tensor(tensor, "int8")


def test_span_beyond_float32_rejected():
    tensor = torch.tensor([-3e38, 3e38])

    with pytest.raises(CodecError, match="too wide"):
        encode_tensor(tensor, "int8")


def test_fp16_clamps_with_warning(caplog):
    tensor = torch.tensor([1.0, 1e6, -7e4, 3.0])

    with caplog.at_level(logging.WARNING, logger="cb_mobile.codec"):
        encoded, decoded = round_trip(tensor, "fp16")

    assert decoded.tolist() == [1.0, 65504.0, -65504.0, 3.0]
    assert "clamped 2 of 4 values" in caplog.text
    assert quantization_error_bound(encoded) == math.inf


def test_fp16_overflow_raise_mode():
    codec = Fp16Codec(overflow="raise")

    with pytest.raises(CodecError, match="65504"):
        codec.encode(torch.tensor([1e5], dtype=torch.float64))


def test_fp16_keeps_nan_and_inf():
    tensor = torch.tensor([float("nan"), float("inf"), float("-inf"), 2.0, 1e9])

    _, decoded = round_trip(tensor, Fp16Codec(overflow="clamp"))

    assert torch.isnan(decoded[0])
    assert decoded[1:4].tolist() == [float("inf"), float("-inf"), 2.0]
    assert decoded[4] == 65504.0


def test_fp16_float16_input_exact():
    tensor = torch.randn(20).half()

    encoded, decoded = round_trip(tensor, "fp16")

    assert same_bits(decoded, tensor)
    assert quantization_error_bound(encoded) == 0.0


def test_fp16_relative_error():
    tensor = torch.randn(1000, dtype=torch.float64) * 100

    encoded, decoded = round_trip(tensor, "fp16")
    relative = ((decoded.double() - tensor) / tensor).abs().max()

    assert float(relative) <= 2.0**-11


# Configs.


@pytest.mark.parametrize(
    "codec",
    [Int8Codec(), Int8Codec(per_channel=False), Int4Codec(), Fp16Codec(), Fp16Codec(overflow="raise"), LosslessCodec()],
    ids=repr,
)
def test_config_json_round_trip(codec):
    config = json.loads(json.dumps(codec.get_config()))

    rebuilt = codec_from_config(config)

    assert rebuilt == codec
    assert type(rebuilt) is type(codec)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encoded_config_json_round_trip(name):
    encoded = encode_tensor(torch.randn(3, 3), name)

    config = json.loads(json.dumps(encoded.codec))

    assert codec_from_config(config).get_config() == encoded.codec


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_get_codec_names(name):
    codec = get_codec(name)

    assert codec.codec_id == name
    assert codec.get_config()["version"] == 1


def test_get_codec_accepts_codec_and_config():
    codec = Int4Codec(per_channel=False)

    assert get_codec(codec) is codec
    assert get_codec(codec.get_config()) == codec


@pytest.mark.parametrize(
    "config, message",
    [
        ({"id": "int3", "version": 1}, "unknown codec id"),
        ({"version": 1}, "unknown codec id"),
        ({"id": "int8", "version": 2}, "version 2 is not supported"),
        ({"id": "int8", "version": "1"}, "version '1' is not supported"),
        ({"id": "int8", "version": True}, "version True is not supported"),
        ({"id": "lossless"}, "version None is not supported"),
        ({"id": "int8", "version": 1, "bits": 3}, "unknown parameters"),
        ({"id": "lossless", "version": 1, "per_channel": True}, "unknown parameters"),
        ({"id": "int8", "version": 1, "per_channel": "yes"}, "per_channel"),
        ({"id": "fp16", "version": 1, "overflow": "wrap"}, "overflow"),
    ],
)
def test_bad_config_rejected(config, message):
    with pytest.raises(CodecError, match=message):
        codec_from_config(config)


@pytest.mark.parametrize("config", [None, "int8", ["int8", 1]], ids=["None", "str", "list"])
def test_non_mapping_config_rejected(config):
    with pytest.raises(CodecError):
        codec_from_config(config)


def test_get_codec_unknown_name():
    with pytest.raises(CodecError, match="choose one of"):
        get_codec("int16")


def test_register_duplicate_id_rejected():
    class Other(LosslessCodec):
        pass

    with pytest.raises(CodecError, match="already registered"):
        register_codec(Other)


def test_decode_delegates_to_writer():
    encoded = encode_tensor(torch.randn(4, 4), Int8Codec(per_channel=False))

    decoded = LosslessCodec().decode(encoded)

    assert decoded.shape == (4, 4)
    assert max_abs_error(decode_tensor(encoded), decoded) == 0.0


def test_decode_unsupported_version():
    encoded = encode_tensor(torch.randn(3), "int8")
    future = replace(encoded, codec={**encoded.codec, "version": 9})

    with pytest.raises(CodecError, match="version 9"):
        Int8Codec().decode(future)


# Damaged buffers, as a reader may get them from a bad file.


def with_buffer(encoded: EncodedTensor, name: str, value: object) -> EncodedTensor:
    return replace(encoded, buffers={**encoded.buffers, name: value})


def retyped(encoded: EncodedTensor, name: str, dtype: type) -> EncodedTensor:
    return with_buffer(encoded, name, encoded.buffers[name].astype(dtype))


def without_buffer(encoded: EncodedTensor, name: str) -> EncodedTensor:
    return replace(encoded, buffers={key: value for key, value in encoded.buffers.items() if key != name})


DAMAGE: dict[str, tuple[str, Callable[[EncodedTensor], EncodedTensor], str]] = {
    "missing codes": ("int8", lambda e: without_buffer(e, "codes"), "missing buffers"),
    "missing scale": ("int4", lambda e: without_buffer(e, "scale"), "missing buffers"),
    "missing lossless codes": ("lossless", lambda e: without_buffer(e, "codes"), "missing buffers"),
    "extra buffer": ("int8", lambda e: with_buffer(e, "zero_point", np.zeros(4, np.float32)), "unexpected buffers"),
    "codes wrong dtype": ("int8", lambda e: retyped(e, "codes", np.int16), "dtype int16"),
    "scale wrong dtype": ("int8", lambda e: retyped(e, "scale", np.float64), "dtype float64"),
    "lossless wrong dtype": ("lossless", lambda e: retyped(e, "codes", np.int32), "dtype int32"),
    "fp16 codes as float32": ("fp16", lambda e: retyped(e, "codes", np.float32), "dtype float32"),
    "codes truncated": ("int8", lambda e: with_buffer(e, "codes", e.buffers["codes"][:-1]), "elements, expected"),
    "int4 codes too long": ("int4", lambda e: with_buffer(e, "codes", np.zeros(40, np.uint8)), "elements, expected"),
    "lossless truncated": ("lossless", lambda e: with_buffer(e, "codes", e.buffers["codes"][:5]), "elements, expected"),
    "fp16 truncated": ("fp16", lambda e: with_buffer(e, "codes", e.buffers["codes"][:5]), "elements, expected"),
    "scale too short": ("int8", lambda e: with_buffer(e, "scale", e.buffers["scale"][:2]), "elements, expected"),
    "codes as bytes": ("int8", lambda e: with_buffer(e, "codes", e.buffers["codes"].tobytes()), "numpy array"),
    "scale NaN": ("int8", lambda e: with_buffer(e, "scale", np.full(4, np.nan, np.float32)), "finite"),
    "scale negative": ("int4", lambda e: with_buffer(e, "scale", np.full(4, -1.0, np.float32)), ">= 0"),
    "minimum infinite": ("int8", lambda e: with_buffer(e, "minimum", np.full(4, np.inf, np.float32)), "minimum"),
    "scale overflows": ("int8", lambda e: with_buffer(e, "scale", np.full(4, 3e37, np.float32)), "float32 range"),
    "negative dim": ("int8", lambda e: replace(e, shape=(-4, -4)), "negative"),
    "huge shape": ("int8", lambda e: replace(e, shape=(MAX_NUMEL, 2)), "limit"),
    "float dim": ("lossless", lambda e: replace(e, shape=(4.0, 4)), "non-integer"),
    "bool dim": ("lossless", lambda e: replace(e, shape=(True, 16)), "bool"),
    "too many dims": ("lossless", lambda e: replace(e, shape=(1,) * 65 + (16,)), "dims"),
    "shape not a sequence": ("fp16", lambda e: replace(e, shape="4,4"), "tuple of ints"),
    "unknown dtype": ("lossless", lambda e: replace(e, dtype="float128"), "unknown dtype"),
    "torch-prefixed dtype": ("fp16", lambda e: replace(e, dtype="torch.float32"), "unknown dtype"),
    "quantized int dtype": ("int8", lambda e: replace(e, dtype="int64"), "only writes"),
    "buffers not a mapping": ("lossless", lambda e: replace(e, buffers=[e.buffers["codes"]]), "mapping"),
    "config not a mapping": ("int8", lambda e: replace(e, codec="int8"), "mapping"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_buffers_rejected(case):
    name, damage, message = DAMAGE[case]
    encoded = as_stored(encode_tensor(torch.randn(4, 4), name))

    with pytest.raises(CodecError, match=message):
        decode_tensor(damage(encoded))


def test_int4_padding_nibble_checked():
    encoded = as_stored(encode_tensor(torch.randn(5, 3), "int4"))
    codes = encoded.buffers["codes"].copy()
    codes[-1] |= 0xF0

    with pytest.raises(CodecError, match="padding"):
        decode_tensor(with_buffer(encoded, "codes", codes))


def test_decode_rejects_non_encoded():
    with pytest.raises(CodecError, match="EncodedTensor"):
        decode_tensor({"codes": np.zeros(3)})


def test_error_bound_checks_buffers():
    encoded = encode_tensor(torch.randn(4, 4), "int8")

    with pytest.raises(CodecError):
        quantization_error_bound(without_buffer(encoded, "scale"))


# Stable quantization grid against a reference encoding.


def spread(rows: int, width: int) -> torch.Tensor:
    """Return random weights whose row extremes (-3 and 3) sit in the last two columns."""
    weights = torch.randn(rows, width).clamp(-2.5, 2.5)
    weights[:, -2], weights[:, -1] = -3.0, 3.0
    return weights


def drifted(tensor: torch.Tensor, moved: int, step: float = 1e-3) -> torch.Tensor:
    """Return a copy of ``tensor`` whose first ``moved`` values of each row moved by ``step``."""
    copy = tensor.clone()
    copy[:, :moved] += step
    return copy


def test_reference_keeps_grid():
    weights = spread(8, 64)
    first = encode_tensor(weights, "int8")

    second = Int8Codec().encode(drifted(weights, 4) * 0.99, first)

    assert np.array_equal(second.buffers["scale"], first.buffers["scale"])


def test_reference_keeps_unchanged_codes():
    weights = spread(8, 64)
    first = encode_tensor(weights, "int8")

    second = Int8Codec().encode(drifted(weights, 4), first)

    assert np.array_equal(second.buffers["codes"].reshape(8, 64)[:, 4:], first.buffers["codes"].reshape(8, 64)[:, 4:])


def test_reference_refits_channel_out_of_range():
    weights = torch.randn(8, 64)
    first = encode_tensor(weights, "int8")
    moved = weights.clone()
    moved[0, 0] = weights[0].max() + 1.0

    second = Int8Codec().encode(moved, first)

    assert second.buffers["scale"][0] > first.buffers["scale"][0]


def test_reference_refits_shrunken_channel():
    weights = torch.randn(8, 64)
    first = encode_tensor(weights, "int8")

    second = Int8Codec().encode(weights * 0.3, first)

    assert (second.buffers["scale"] < first.buffers["scale"]).all()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_reference_error_within_bound(name):
    weights = torch.randn(16, 32)
    first = encode_tensor(weights, name)
    moved = weights + 0.05 * torch.randn(16, 32)

    second = get_codec(name).encode(moved, first)

    assert (decode_tensor(second) - moved).abs().max().item() <= quantization_error_bound(second)


@pytest.mark.parametrize(
    "reference",
    [
        encode_tensor(torch.randn(4, 64), "int8"),
        encode_tensor(torch.randn(8, 64), "int4"),
        encode_tensor(torch.randn(8, 64, dtype=torch.float64), "int8"),
    ],
    ids=["shape", "codec", "dtype"],
)
def test_mismatched_reference_ignored(reference):
    weights = torch.randn(8, 64)

    encoded = Int8Codec().encode(weights, reference)

    assert np.array_equal(encoded.buffers["scale"], encode_tensor(weights, "int8").buffers["scale"])


def test_damaged_reference_ignored():
    weights = torch.randn(8, 64)
    reference = encode_tensor(weights, "int8")
    damaged = with_buffer(reference, "scale", np.full(8, np.nan, dtype=np.float32))

    encoded = Int8Codec().encode(weights, damaged)

    assert np.array_equal(encoded.buffers["scale"], reference.buffers["scale"])


def test_reference_needs_no_codes():
    weights = torch.randn(8, 64)
    reference = without_buffer(encode_tensor(weights, "int8"), "codes")

    encoded = Int8Codec().encode(weights * 0.99, reference)

    assert np.array_equal(encoded.buffers["scale"], reference.buffers["scale"])


def test_reference_nan_rejected():
    weights = torch.randn(8, 64)
    reference = encode_tensor(weights, "int8")
    weights[3, 3] = math.nan

    with pytest.raises(CodecError, match="NaN"):
        Int8Codec().encode(weights, reference)


def test_decode_tensors_parallel():
    encoded = {f"t{index}": encode_tensor(torch.randn(700, 1000), "int8") for index in range(3)}

    decoded = decode_tensors(encoded, workers=2)

    assert all(torch.equal(decoded[name], decode_tensor(item)) for name, item in encoded.items())


def test_decode_tensors_names_tensor():
    encoded = {"good": encode_tensor(torch.randn(4), "int8"), "bad": encode_tensor(torch.randn(4), "int8")}
    encoded["bad"] = without_buffer(encoded["bad"], "scale")

    with pytest.raises(CodecError, match="'bad'"):
        decode_tensors(encoded)
