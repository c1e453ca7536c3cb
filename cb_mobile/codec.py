"""Tensor codecs: turn a torch tensor into named numpy buffers and back.

Contract
--------
``Codec.encode(tensor)`` returns an :class:`EncodedTensor`: the codec's JSON config
(with ``"id"`` and ``"version"``), the tensor's shape and torch dtype name, and named
numpy buffers. The bulk of the data sits in the buffer ``"codes"``; small side data such
as scales and minimums sit in other buffers. ``Codec.decode(encoded)`` returns a new
contiguous CPU tensor with the original shape and dtype. A reader needs only the config
stored beside the buffers to rebuild the codec, through :func:`codec_from_config`.

Integer, bool, complex and float8 tensors are always encoded by :class:`LosslessCodec`,
whatever codec is requested, and the returned ``EncodedTensor`` then carries the
lossless config. Every codec's ``decode`` hands an ``EncodedTensor`` written by another
registered codec to that codec, so ``codec.decode(codec.encode(t))`` works for every
supported ``t``. Buffers are in the host's byte order, which is little-endian on x86 and
on the ARM cores of phones.

Codecs
------
``int8``, ``int4``
    Asymmetric affine quantization: ``value = minimum + code * scale`` with codes in
    ``0..255`` or ``0..15``. One ``(minimum, scale)`` pair per tensor for 0-d and 1-D
    tensors, one per output channel (dim 0) for tensors of 2 or more dims. The error
    is at most half a quantization step per channel, plus float rounding
    (:func:`quantization_error_bound`). NaN or infinite values raise ``CodecError``.
``fp16``
    IEEE half precision. Finite magnitudes above 65504 are clamped with a warning, or
    raise with ``overflow="raise"``. NaN and infinities are stored as they are.
``lossless``
    The raw bits of the tensor in its own dtype.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from cb_mobile.errors import CodecError

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_NUMEL",
    "CODEC_REGISTRY",
    "Codec",
    "EncodedTensor",
    "Fp16Codec",
    "GRID_HEADROOM",
    "GRID_MIN_SPAN",
    "Int4Codec",
    "Int8Codec",
    "LosslessCodec",
    "MAX_NDIM",
    "MAX_NUMEL",
    "codec_from_config",
    "codec_workers",
    "decode_tensor",
    "decode_tensors",
    "encode_tensor",
    "get_codec",
    "quantization_error_bound",
    "register_codec",
]

MAX_NUMEL = 2**31
"""Largest element count a codec encodes or decodes (8 GiB of float32).

A stored shape above it is treated as damage instead of being allocated."""

MAX_NDIM = 64
"""Largest number of dimensions a codec accepts in a stored shape."""

BLOCK_NUMEL = 1 << 17
"""Elements per step of the quantize and dequantize loops.

A float32 block of this size (512 KiB) fits the L2 cache of most current cores, so the
elementwise steps of one block do not go back to main memory, and no tensor-sized
float32 temporary is allocated. Smaller blocks spend more time in the Python loop.

The loops run in numpy, single-threaded. The same loop in torch, with its intra-op
thread pool, measured about 25 times slower on a 2-core machine shared with other jobs
(2.7 s against 0.1 s for 25M float32 values). The likely cause is that each small
parallel op waits for its worker threads.
"""

FLOAT16_MAX = float(torch.finfo(torch.float16).max)

GRID_HEADROOM = 1 / 16
"""Share of a channel's span added on each side when ``int8`` or ``int4`` fits a new
grid against a reference encoding, so values that drift a little keep the grid."""

GRID_MIN_SPAN = 0.5
"""Smallest share of a reused grid's span that a channel's values must still cover.

A channel whose values shrank below it is fitted again, so a reused grid never makes
the quantization step more than twice the exact fit's."""

_QUANTIZABLE_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor after encoding, ready for the store.

    Attributes
    ----------
    codec : dict
        JSON-serializable codec config, including ``"id"`` and ``"version"``.
    shape : tuple of int
        Shape of the original tensor.
    dtype : str
        Torch dtype name of the original tensor, for example ``"float32"``.
    buffers : dict of str to numpy.ndarray
        Named contiguous arrays. ``"codes"`` contains the bulk of the data.
    """

    codec: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Total size of the buffers in bytes, before any compression."""
        return sum(int(buffer.nbytes) for buffer in self.buffers.values())


class Codec(ABC):
    """A symmetric tensor encoder and decoder with a JSON config."""

    codec_id: ClassVar[str]
    version: ClassVar[int]

    @abstractmethod
    def encode(self, tensor: torch.Tensor, reference: EncodedTensor | None = None) -> EncodedTensor:
        """Encode ``tensor`` into buffers.

        ``reference`` is the previous encoding of the same tensor, for example from the
        previous checkpoint. A codec may reuse parts of it (the quantizers reuse its
        grid) so that unchanged values keep their codes; any codec may ignore it.
        """

    @abstractmethod
    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        """Rebuild a tensor from ``encoded``."""

    def get_config(self) -> dict[str, Any]:
        """Return the JSON config that :func:`codec_from_config` turns back into this codec."""
        return {"id": self.codec_id, "version": self.version}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        """Build the codec described by ``config``.

        Raises
        ------
        CodecError
            If the id or version does not match this class, or the config has
            parameters this codec does not take.
        """
        parameters = _split_config(cls, config)
        _reject_unknown_parameters(cls, parameters, allowed=())
        return cls()

    def error_bound(self, encoded: EncodedTensor) -> float:
        """Return the largest absolute error that decoding ``encoded`` can have.

        The default is ``inf``, meaning the codec gives no guarantee.
        """
        return math.inf

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codec):
            return NotImplemented
        return self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(json.dumps(self.get_config(), sort_keys=True))

    def __repr__(self) -> str:
        parameters = {key: value for key, value in self.get_config().items() if key not in ("id", "version")}
        arguments = ", ".join(f"{key}={value!r}" for key, value in parameters.items())
        return f"{type(self).__name__}({arguments})"


CODEC_REGISTRY: dict[str, type[Codec]] = {}
"""Codec classes by ``codec_id``, where :func:`codec_from_config` looks ids up."""


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Add ``cls`` to :data:`CODEC_REGISTRY` under its ``codec_id``, as a decorator or a call.

    Raises
    ------
    CodecError
        If another class is already registered under the same id.
    """
    registered = CODEC_REGISTRY.get(cls.codec_id)
    if registered is not None and registered is not cls:
        raise CodecError(
            f"codec id {cls.codec_id!r} is already registered by {registered.__name__}. "
            f"Give {cls.__name__} another codec_id."
        )

    CODEC_REGISTRY[cls.codec_id] = cls
    return cls


def codec_from_config(config: Mapping[str, Any]) -> Codec:
    """Rebuild a codec from its JSON config, as stored in a manifest.

    Parameters
    ----------
    config : Mapping
        A config returned by ``Codec.get_config``, possibly after a JSON round trip.

    Returns
    -------
    Codec
        A codec equal to the one that wrote ``config``.

    Raises
    ------
    CodecError
        On an unknown id, an unsupported version or an invalid parameter.
    """
    if not isinstance(config, Mapping):
        raise CodecError(f"codec config must be a mapping with 'id' and 'version', got {type(config).__name__}")

    codec_id = config.get("id")
    cls = CODEC_REGISTRY.get(codec_id) if isinstance(codec_id, str) else None
    if cls is None:
        raise CodecError(
            f"unknown codec id {codec_id!r} in config {dict(config)!r}. "
            f"Known ids: {', '.join(sorted(CODEC_REGISTRY))}"
        )

    return cls.from_config(config)


def get_codec(spec: str | Codec | Mapping[str, Any] = "int8") -> Codec:
    """Return the codec named by ``spec``.

    Parameters
    ----------
    spec : str, Codec or Mapping, default "int8"
        A codec id (``"int8"``, ``"int4"``, ``"fp16"``, ``"lossless"`` or any registered
        id) for that codec with default parameters, a config for
        :func:`codec_from_config`, or a codec, which is returned as it is.

    Raises
    ------
    CodecError
        If the name or config is unknown or invalid.
    """
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, Mapping):
        return codec_from_config(spec)
    if not isinstance(spec, str):
        raise CodecError(f"codec must be a name, a config or a Codec, got {type(spec).__name__}")

    cls = CODEC_REGISTRY.get(spec)
    if cls is None:
        raise CodecError(f"unknown codec {spec!r}, choose one of: {', '.join(sorted(CODEC_REGISTRY))}")
    return cls()


def encode_tensor(tensor: torch.Tensor, codec: str | Codec | Mapping[str, Any] = "int8") -> EncodedTensor:
    """Encode ``tensor`` with ``codec``, or losslessly when it is an integer or bool tensor.

    Parameters
    ----------
    tensor : torch.Tensor
        Any strided tensor, on any device, with or without autograd history.
    codec : str, Codec or Mapping, default "int8"
        Anything :func:`get_codec` accepts.
    """
    return get_codec(codec).encode(tensor)


def decode_tensor(encoded: EncodedTensor) -> torch.Tensor:
    """Decode ``encoded`` with the codec its own config names."""
    return codec_from_config(_encoded_config(encoded)).decode(encoded)


PARALLEL_CODEC_BYTES = 1 << 22
"""Bytes of float32 values above which a whole checkpoint is encoded or decoded on threads."""


def codec_workers() -> int:
    """Return the threads that encode or decode a large checkpoint: the usable CPUs, at most 4."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def decode_tensors(encoded: Mapping[str, EncodedTensor], workers: int | None = None) -> dict[str, torch.Tensor]:
    """Decode every tensor of a checkpoint with the codec its config names.

    numpy releases the GIL in the dequantize loops, so when the checkpoint is larger
    than :data:`PARALLEL_CODEC_BYTES` the tensors are decoded on ``workers`` threads
    (None uses the CPUs this process may run on, at most 4).

    Raises
    ------
    CodecError
        If a tensor does not decode; the message names it.
    """
    def decode_one(item: tuple[str, EncodedTensor]) -> torch.Tensor:
        name, value = item
        try:
            return decode_tensor(value)
        except CodecError as error:
            raise CodecError(f"tensor {name!r} does not decode: {error}") from error

    def numel(value: EncodedTensor) -> int:
        # Shapes are checked by the decoder; a malformed one counts as empty here.
        try:
            return math.prod(_check_shape(value.shape))
        except (AttributeError, CodecError):
            return 0

    items = list(encoded.items())
    if workers is None:
        workers = codec_workers()
    sizes = [numel(value) for _, value in items]
    if workers <= 1 or len(items) <= 1 or 4 * sum(sizes) < PARALLEL_CODEC_BYTES:
        return {name: tensor for (name, _), tensor in zip(items, map(decode_one, items))}

    # Large tensors first, so that the last one to finish is small.
    order = sorted(range(len(items)), key=lambda index: -sizes[index])
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cb-decode") as pool:
        decoded = dict(zip(order, pool.map(lambda index: decode_one(items[index]), order)))
    return {name: decoded[index] for index, (name, _) in enumerate(items)}


def quantization_error_bound(encoded: EncodedTensor) -> float:
    """Return the largest absolute error between the original tensor and its decoded copy.

    For ``int8`` and ``int4`` this is the largest per-channel bound. It is half the
    channel's quantization step (``scale / 2``) plus float rounding: four float32
    epsilons of the channel's largest magnitude, and half an epsilon of the original
    dtype when that is float16 or bfloat16 (see ``channel_error_bounds``).

    ``lossless`` gives 0, and so does ``fp16`` on a float16 tensor. Otherwise ``fp16``
    gives ``2**-11`` of the largest finite magnitude (half a float16 step), plus the
    bfloat16 rounding for bfloat16 tensors, or ``inf`` when a value may have been clamped
    at 65504. NaN and infinite values stored by ``fp16`` decode as they were and are
    left out of the bound.

    Raises
    ------
    CodecError
        If ``encoded`` is malformed.
    """
    return codec_from_config(_encoded_config(encoded)).error_bound(encoded)


# Dtypes and tensor preparation.


@dataclass(frozen=True)
class _DtypeLayout:
    """Numpy storage of one torch dtype: the same-size dtype whose bits a buffer contains."""

    torch_dtype: torch.dtype
    storage_dtype: torch.dtype
    numpy_dtype: np.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _build_dtype_layouts() -> dict[str, _DtypeLayout]:
    # Dtypes that numpy supports keep their own type. bfloat16 and the float8 formats
    # have no numpy type, so their bits are stored as unsigned integers of the same size.
    native = [
        "float32", "float64", "float16", "complex64", "complex128", "bool",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    ]
    as_bits = {
        "bfloat16": "uint16",
        "float8_e4m3fn": "uint8",
        "float8_e4m3fnuz": "uint8",
        "float8_e5m2": "uint8",
        "float8_e5m2fnuz": "uint8",
        "float8_e8m0fnu": "uint8",
    }
    pairs = [(name, name) for name in native] + list(as_bits.items())

    layouts = {}
    for name, storage_name in pairs:
        dtype = getattr(torch, name, None)
        storage = getattr(torch, storage_name, None)
        if isinstance(dtype, torch.dtype) and isinstance(storage, torch.dtype):
            numpy_dtype = torch.empty(0, dtype=storage).numpy().dtype
            layouts[name] = _DtypeLayout(dtype, storage, numpy_dtype)
    return layouts


_DTYPE_LAYOUTS = _build_dtype_layouts()


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype} tensor of shape {tuple(shape)}"


def _prepare_tensor(tensor: torch.Tensor, codec_id: str) -> torch.Tensor:
    """Return ``tensor`` detached, on the CPU, in a dtype the codecs support."""
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"the {codec_id} codec encodes torch.Tensor values, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise CodecError(
            f"the {codec_id} codec encodes dense tensors, got layout {tensor.layout}. Call .to_dense() first."
        )
    if tensor.is_quantized:
        raise CodecError(
            f"the {codec_id} codec cannot encode a torch quantized tensor ({tensor.dtype}). Call .dequantize() first."
        )
    if tensor.device.type == "meta":
        raise CodecError(
            f"the {codec_id} codec cannot encode a meta tensor of shape {tuple(tensor.shape)}, because it has no data"
        )
    if tensor.ndim > MAX_NDIM:
        raise CodecError(f"the {codec_id} codec encodes at most {MAX_NDIM} dims, got {tensor.ndim}")
    if tensor.numel() > MAX_NUMEL:
        raise CodecError(
            f"the {codec_id} codec encodes at most {MAX_NUMEL} elements per tensor, got {tensor.numel()} "
            f"in shape {tuple(tensor.shape)}. Split the tensor."
        )
    if _dtype_name(tensor.dtype) not in _DTYPE_LAYOUTS:
        raise CodecError(
            f"the {codec_id} codec cannot encode dtype {_dtype_name(tensor.dtype)}. "
            f"Supported dtypes: {', '.join(sorted(_DTYPE_LAYOUTS))}"
        )

    prepared = tensor.detach()
    if prepared.device.type != "cpu":
        # NOTE: untested here, because the tests run on a CPU-only torch build.
        prepared = prepared.to("cpu")
    if prepared.is_complex():
        prepared = prepared.resolve_conj().resolve_neg()
    return prepared


# Config checks.


def _split_config(cls: type[Codec], config: Mapping[str, Any]) -> dict[str, Any]:
    """Check the id and version of ``config`` against ``cls`` and return the other keys."""
    if not isinstance(config, Mapping):
        raise CodecError(f"codec config must be a mapping, got {type(config).__name__}")
    if config.get("id") != cls.codec_id:
        raise CodecError(f"{cls.__name__} reads configs with id {cls.codec_id!r}, got {config.get('id')!r}")

    version = config.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version != cls.version:
        raise CodecError(
            f"codec {cls.codec_id!r} version {version!r} is not supported, this build reads version {cls.version}. "
            "Decode the checkpoint with the cb_mobile release that wrote it, or write it again."
        )

    return {key: value for key, value in config.items() if key not in ("id", "version")}


def _reject_unknown_parameters(cls: type[Codec], parameters: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(parameters) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise CodecError(f"codec {cls.codec_id!r} got unknown parameters {unknown}. Accepted parameters: {accepted}")


def _encoded_config(encoded: EncodedTensor) -> Mapping[str, Any]:
    if not isinstance(encoded, EncodedTensor):
        raise CodecError(f"expected an EncodedTensor, got {type(encoded).__name__}")
    if not isinstance(encoded.codec, Mapping):
        raise CodecError(f"encoded tensor has codec config of type {type(encoded.codec).__name__}, expected a mapping")
    return encoded.codec


def _codec_for(encoded: EncodedTensor, current: Codec) -> Codec:
    """Return the codec that wrote ``encoded``: ``current`` when the configs agree."""
    writer = codec_from_config(_encoded_config(encoded))
    if writer.get_config() == current.get_config():
        return current
    return writer


# Buffer checks, for buffers that may come from a damaged or hostile file.


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)):
        raise CodecError(f"encoded shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise CodecError(f"encoded shape has {len(shape)} dims, but at most {MAX_NDIM} are accepted")

    dims = []
    for dim in shape:
        if isinstance(dim, bool):
            raise CodecError(f"encoded shape {shape!r} contains a bool")
        try:
            size = operator.index(dim)
        except TypeError:
            raise CodecError(f"encoded shape {shape!r} contains a non-integer {dim!r}") from None
        if size < 0:
            raise CodecError(f"encoded shape {shape!r} has a negative dim")
        dims.append(size)

    numel = math.prod(dims)
    if numel > MAX_NUMEL:
        raise CodecError(f"encoded shape {tuple(dims)} has {numel} elements, more than the limit of {MAX_NUMEL}")
    return tuple(dims)


def _read_header(encoded: EncodedTensor, codec_id: str) -> tuple[tuple[int, ...], _DtypeLayout]:
    """Check the shape, dtype and buffer mapping of ``encoded``."""
    shape = _check_shape(encoded.shape)

    layout = _DTYPE_LAYOUTS.get(encoded.dtype) if isinstance(encoded.dtype, str) else None
    if layout is None:
        raise CodecError(
            f"{codec_id} encoded tensor has unknown dtype {encoded.dtype!r}. "
            f"Supported dtypes: {', '.join(sorted(_DTYPE_LAYOUTS))}"
        )

    if not isinstance(encoded.buffers, Mapping):
        raise CodecError(
            f"{codec_id} encoded tensor has buffers of type {type(encoded.buffers).__name__}, expected a mapping"
        )
    return shape, layout


def _check_buffer_names(encoded: EncodedTensor, codec_id: str, expected: tuple[str, ...]) -> None:
    names = set(encoded.buffers)
    missing = [name for name in expected if name not in names]
    if missing:
        raise CodecError(
            f"{codec_id} {_describe(encoded.dtype, encoded.shape)} is missing buffers {missing} "
            f"(it has {sorted(names)}). The checkpoint is incomplete or was written by another codec."
        )

    unexpected = sorted(names - set(expected))
    if unexpected:
        raise CodecError(
            f"{codec_id} {_describe(encoded.dtype, encoded.shape)} has unexpected buffers {unexpected}, "
            f"expected exactly {list(expected)}"
        )


def _buffer(encoded: EncodedTensor, codec_id: str, name: str, dtype: np.dtype | type, size: int) -> np.ndarray:
    """Return buffer ``name`` as a 1-D array after checking its type, dtype and size."""
    array = encoded.buffers[name]
    context = f"{codec_id} buffer {name!r} of a {_describe(encoded.dtype, encoded.shape)}"

    if not isinstance(array, np.ndarray):
        raise CodecError(f"{context} is a {type(array).__name__}, expected a numpy array")
    if array.dtype != np.dtype(dtype):
        raise CodecError(f"{context} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.size != size:
        raise CodecError(
            f"{context} has {array.size} elements, expected {size}. "
            "The buffer is truncated or belongs to another tensor."
        )
    return array.reshape(-1)


# Blocked elementwise work.


def _blocks(rows: int, width: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(row_start, row_stop, column_start, column_stop)`` blocks of a ``rows x width`` matrix.

    Each block has at most :data:`BLOCK_NUMEL` elements and lies within whole rows, or
    within one row when a row is longer than a block.
    """
    if rows == 0 or width == 0:
        return

    if width <= BLOCK_NUMEL:
        rows_per_block = BLOCK_NUMEL // width
        for row in range(0, rows, rows_per_block):
            yield row, min(rows, row + rows_per_block), 0, width
        return

    for row in range(rows):
        for column in range(0, width, BLOCK_NUMEL):
            yield row, row + 1, column, min(width, column + BLOCK_NUMEL)


def _leaves_float32_range(minimum: np.ndarray, scale: np.ndarray, levels: int) -> bool:
    """Return whether ``levels * scale`` or ``minimum + levels * scale`` overflows float32 in some channel."""
    limit = float(np.finfo(np.float32).max)
    top = levels * scale.astype(np.float64)
    return bool(((top > limit) | (np.abs(minimum.astype(np.float64) + top) > limit)).any())


def _empty_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Return an uninitialized contiguous CPU tensor whose memory numpy allocated.

    On Linux numpy requests transparent huge pages (``madvise``) for large arrays, as
    its "Global State" documentation describes. torch's CPU allocator does so only when
    the environment variable ``THP_MEM_ALLOC_ENABLE`` is set. With the kernel's THP mode
    at ``madvise``, the first write to a fresh 100 MB numpy array took about a third of
    the time of the same write to ``torch.empty`` memory (2-core AMD EPYC, torch 2.13,
    numpy 2.4).
    """
    # NOTE: decoded tensors share this numpy memory, so ``resize_`` on them raises
    # "Trying to resize storage that is not resizable". In-place ops and
    # load_state_dict work as usual.
    array = np.empty(math.prod(shape), dtype=_DTYPE_LAYOUTS[_dtype_name(dtype)].numpy_dtype)
    return torch.from_numpy(array).view(dtype).reshape(shape)


def _float_array(matrix: torch.Tensor) -> np.ndarray:
    """Return a numpy view of ``matrix``, with bfloat16 values as their uint16 bits."""
    if matrix.dtype == torch.bfloat16:
        return matrix.view(torch.uint16).numpy()
    return matrix.numpy()


def _as_float32_or_float64(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Return ``values`` if they are float32 or float64, else their exact float32 copy in ``out``.

    ``values`` are float16, or bfloat16 given as uint16 bits. A bfloat16 is the upper
    half of a float32, so its float32 bits are ``bits << 16``.
    """
    if values.dtype in (np.float32, np.float64):
        return values

    if values.dtype == np.uint16:
        wide = out.view(np.uint32)
        np.copyto(wide, values)
        np.left_shift(wide, 16, out=wide)
    else:
        np.copyto(out, values)
    return out


def _row_range(row: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Return the minimum and maximum of ``row`` as float64 arrays of length 1."""
    return np.array([float(row.amin())]), np.array([float(row.amax())])


# Codecs.


@register_codec
class LosslessCodec(Codec):
    """Store the raw bits of a tensor in its own dtype, so that decoding is bit exact.

    ``"codes"`` contains the elements in row-major order, in the tensor's numpy dtype, or
    as unsigned integers of the same size for bfloat16 and float8 formats.
    """

    codec_id: ClassVar[str] = "lossless"
    version: ClassVar[int] = 1

    def encode(self, tensor: torch.Tensor, reference: EncodedTensor | None = None) -> EncodedTensor:
        """Copy the bits of ``tensor`` into a ``"codes"`` buffer; ``reference`` is ignored.

        The copy contains only this tensor's elements, even when ``tensor`` is a view into a
        larger storage, and later changes to ``tensor`` do not reach it.
        """
        prepared = _prepare_tensor(tensor, self.codec_id)
        dtype = _dtype_name(prepared.dtype)
        layout = _DTYPE_LAYOUTS[dtype]

        copy = _empty_tensor(tuple(prepared.shape), prepared.dtype)
        copy.copy_(prepared)
        codes = copy.view(layout.storage_dtype).reshape(-1).numpy()
        return EncodedTensor(self.get_config(), tuple(prepared.shape), dtype, {"codes": codes})

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        """Rebuild the tensor bit for bit.

        Raises
        ------
        CodecError
            If a buffer is missing, has the wrong dtype or the wrong size.
        """
        writer = _codec_for(encoded, self)
        if writer is not self:
            return writer.decode(encoded)

        shape, layout = _read_header(encoded, self.codec_id)
        _check_buffer_names(encoded, self.codec_id, ("codes",))
        codes = _buffer(encoded, self.codec_id, "codes", layout.numpy_dtype, math.prod(shape))

        values = torch.from_numpy(np.array(codes, order="C", copy=True))
        return values.view(layout.torch_dtype).reshape(shape)

    def error_bound(self, encoded: EncodedTensor) -> float:
        """Return 0: decoding restores every bit."""
        writer = _codec_for(encoded, self)
        if writer is not self:
            return writer.error_bound(encoded)
        return 0.0


_LOSSLESS = LosslessCodec()


class _FloatCodec(Codec):
    """Base of the codecs that change float values.

    ``encode`` sends tensors whose dtype is not float16, bfloat16, float32 or float64 to
    the lossless codec, and ``decode`` sends encoded tensors written by another codec or
    config to that codec.
    """

    def encode(self, tensor: torch.Tensor, reference: EncodedTensor | None = None) -> EncodedTensor:
        """Encode a float tensor with this codec, any other dtype losslessly."""
        prepared = _prepare_tensor(tensor, self.codec_id)
        dtype = _dtype_name(prepared.dtype)

        if dtype not in _QUANTIZABLE_DTYPES:
            logger.debug("%s codec stores a %s losslessly", self.codec_id, _describe(dtype, tuple(prepared.shape)))
            return _LOSSLESS.encode(prepared)
        return self._encode_float(prepared, dtype, reference)

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        """Rebuild a new contiguous CPU tensor of the original dtype and shape.

        Raises
        ------
        CodecError
            If the config, shape, dtype or a buffer is invalid.
        """
        writer = _codec_for(encoded, self)
        if writer is not self:
            return writer.decode(encoded)

        shape, layout = self._read_float_header(encoded)
        return self._decode_float(encoded, shape, layout.torch_dtype)

    def _read_float_header(self, encoded: EncodedTensor) -> tuple[tuple[int, ...], _DtypeLayout]:
        shape, layout = _read_header(encoded, self.codec_id)
        if encoded.dtype not in _QUANTIZABLE_DTYPES:
            raise CodecError(
                f"{self.codec_id} encoded tensor has dtype {encoded.dtype}, but this codec only writes "
                f"{', '.join(sorted(_QUANTIZABLE_DTYPES))}. The manifest entry is damaged."
            )
        return shape, layout

    @abstractmethod
    def _encode_float(self, tensor: torch.Tensor, dtype: str, reference: EncodedTensor | None) -> EncodedTensor:
        """Encode a CPU tensor whose dtype is in ``_QUANTIZABLE_DTYPES``, possibly reusing ``reference``."""

    @abstractmethod
    def _decode_float(self, encoded: EncodedTensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Decode buffers whose header has been checked."""


@register_codec
class Fp16Codec(_FloatCodec):
    """Store float tensors as IEEE float16.

    Parameters
    ----------
    overflow : {"clamp", "raise"}, default "clamp"
        What to do with finite values whose magnitude exceeds 65504, the largest
        float16: clamp them to +-65504 and log a warning, or raise ``CodecError``.
        NaN and infinities are stored as they are in both modes.
    """

    codec_id: ClassVar[str] = "fp16"
    version: ClassVar[int] = 1
    overflow_modes: ClassVar[tuple[str, ...]] = ("clamp", "raise")

    def __init__(self, *, overflow: str = "clamp") -> None:
        if overflow not in self.overflow_modes:
            raise CodecError(f"fp16 overflow must be one of {list(self.overflow_modes)}, got {overflow!r}")
        self.overflow = overflow

    def get_config(self) -> dict[str, Any]:
        """Return the config, including the overflow mode."""
        return {"id": self.codec_id, "version": self.version, "overflow": self.overflow}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Fp16Codec:
        """Build the codec from ``config``, where a missing ``"overflow"`` means ``"clamp"``."""
        parameters = _split_config(cls, config)
        _reject_unknown_parameters(cls, parameters, allowed=("overflow",))
        return cls(overflow=parameters.get("overflow", "clamp"))

    def error_bound(self, encoded: EncodedTensor) -> float:
        """Return the largest error over finite values, as :func:`quantization_error_bound` describes."""
        writer = _codec_for(encoded, self)
        if writer is not self:
            return writer.error_bound(encoded)

        shape, layout = self._read_float_header(encoded)
        codes = self._codes(encoded, shape)
        if encoded.dtype == "float16":
            return 0.0

        finite = np.abs(codes[np.isfinite(codes)]).astype(np.float64)
        if finite.size == 0:
            return 0.0
        peak = float(finite.max())
        if peak >= FLOAT16_MAX:
            return math.inf

        # Round to nearest float16 moves a value by at most 2**-11 of its magnitude, or
        # by half the smallest subnormal (2**-25) near zero. float32 and float64 hold
        # every float16 exactly. bfloat16 does not, so its cast adds half its own eps.
        relative = 2.0**-11
        absolute = 2.0**-25
        if layout.torch_dtype == torch.bfloat16:
            bfloat16 = torch.finfo(torch.bfloat16)
            relative += bfloat16.eps / 2
            absolute += bfloat16.tiny * bfloat16.eps / 2
        return relative * peak * (1 + 2.0**-10) + absolute

    def _encode_float(self, tensor: torch.Tensor, dtype: str, reference: EncodedTensor | None) -> EncodedTensor:
        shape = tuple(tensor.shape)
        half = _empty_tensor(shape, torch.float16)
        half.copy_(tensor if tensor.dtype == torch.float16 else self._limit_range(tensor, dtype))
        return EncodedTensor(self.get_config(), shape, dtype, {"codes": half.reshape(-1).numpy()})

    def _limit_range(self, tensor: torch.Tensor, dtype: str) -> torch.Tensor:
        """Return ``tensor`` with finite magnitudes above 65504 clamped, or raise."""
        if tensor.numel() == 0:
            return tensor

        # One reduction settles the common case. NaN fails both comparisons and takes
        # the slow path, which then finds nothing to clamp.
        low, high = torch.aminmax(tensor)
        if bool(low >= -FLOAT16_MAX) and bool(high <= FLOAT16_MAX):
            return tensor

        overflowing = torch.isfinite(tensor) & (tensor.abs() > FLOAT16_MAX)
        count = int(overflowing.sum())
        if count == 0:
            return tensor

        peak = float(tensor.abs()[overflowing].max())
        where = f"{count} of {tensor.numel()} values of a {_describe(dtype, tuple(tensor.shape))}"
        if self.overflow == "raise":
            raise CodecError(
                f"fp16 cannot store {where}: their magnitude exceeds 65504, the largest float16 "
                f"(max |value| {peak:.6g}). Use the 'lossless' codec, or fp16 with overflow='clamp'."
            )

        logger.warning(
            "fp16 codec clamped %s to +-65504 (max |value| %.6g). Use the lossless codec to keep them.",
            where,
            peak,
        )
        return torch.where(overflowing, tensor.clamp(-FLOAT16_MAX, FLOAT16_MAX), tensor)

    def _codes(self, encoded: EncodedTensor, shape: tuple[int, ...]) -> np.ndarray:
        _check_buffer_names(encoded, self.codec_id, ("codes",))
        return _buffer(encoded, self.codec_id, "codes", np.float16, math.prod(shape))

    def _decode_float(self, encoded: EncodedTensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        codes = self._codes(encoded, shape)

        # torch casts float16 about five times faster than numpy 2.4 does. Read-only
        # arrays are copied first because torch warns on them, and misaligned ones as a
        # precaution for CPUs that fault on misaligned loads.
        if not (codes.flags.writeable and codes.flags.aligned):
            codes = codes.copy()

        values = _empty_tensor(shape, dtype)
        values.view(-1).copy_(torch.from_numpy(codes))
        return values


class _AffineCodec(_FloatCodec):
    """Asymmetric affine quantization to ``bits``-bit codes, per tensor or per channel.

    Each channel ``c`` (a slice along dim 0, or the whole tensor) gets
    ``minimum[c] = min(x)`` and ``scale[c] = (max(x) - min(x)) / levels`` and each value
    the code ``round((x - minimum[c]) / scale[c])``, clamped to ``0..levels``. Decoding
    computes ``minimum[c] + code * scale[c]`` in float32 and casts to the original
    dtype. The buffers are ``"codes"`` (uint8), ``"scale"`` and ``"minimum"`` (float32,
    one per channel). A constant channel has scale 0 and decodes to its value, exactly
    unless the tensor is float64, whose minimum is rounded to float32.

    Parameters
    ----------
    per_channel : bool, default True
        One scale per output channel (dim 0) for tensors of 2 or more dims. With
        ``False`` every tensor gets a single scale. 0-d and 1-D tensors always get one.
    """

    bits: ClassVar[int]
    codes_per_byte: ClassVar[int]

    def __init__(self, *, per_channel: bool = True) -> None:
        if not isinstance(per_channel, bool):
            raise CodecError(f"{self.codec_id} per_channel must be true or false, got {per_channel!r}")
        self.per_channel = per_channel

    @property
    def levels(self) -> int:
        """Largest code: 255 for 8 bits, 15 for 4 bits."""
        return (1 << self.bits) - 1

    def get_config(self) -> dict[str, Any]:
        """Return the config, including ``per_channel``."""
        return {"id": self.codec_id, "version": self.version, "per_channel": self.per_channel}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _AffineCodec:
        """Build the codec from ``config``, where a missing ``"per_channel"`` means ``True``."""
        parameters = _split_config(cls, config)
        _reject_unknown_parameters(cls, parameters, allowed=("per_channel",))
        return cls(per_channel=parameters.get("per_channel", True))

    def channel_layout(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Return ``(channels, values per channel)`` for a tensor of ``shape``."""
        if self.per_channel and len(shape) >= 2:
            return shape[0], math.prod(shape[1:])
        return 1, math.prod(shape)

    def channel_error_bounds(self, encoded: EncodedTensor) -> np.ndarray:
        """Return the largest absolute decoding error of each channel, as float64.

        The bound is ``scale / 2 + 4 * eps32 * M + 4 * s32``, where ``M`` is the
        channel's largest magnitude, ``eps32`` the float32 machine epsilon and ``s32``
        the smallest float32 subnormal. These extra terms cover the float32 rounding of
        quantizing and dequantizing. A float16 or bfloat16 tensor adds half its own
        ``eps * M`` and half its smallest subnormal for the final cast.
        """
        writer = _codec_for(encoded, self)
        if not isinstance(writer, _AffineCodec):
            raise CodecError(f"{writer.codec_id} tensors have no per-channel error bound")
        if writer is not self:
            return writer.channel_error_bounds(encoded)

        shape, layout = self._read_float_header(encoded)
        minimum, scale = self._side_buffers(encoded, shape)

        single = torch.finfo(torch.float32)
        relative = 4 * single.eps
        absolute = 4 * single.tiny * single.eps
        if layout.torch_dtype in (torch.float16, torch.bfloat16):
            output = torch.finfo(layout.torch_dtype)
            relative += output.eps / 2
            absolute += output.tiny * output.eps / 2

        low = minimum.astype(np.float64)
        step = scale.astype(np.float64)
        magnitude = np.maximum(np.abs(low), np.abs(low + self.levels * step))
        return step / 2 + relative * magnitude + absolute

    def error_bound(self, encoded: EncodedTensor) -> float:
        """Return the largest of :meth:`channel_error_bounds`, or 0 for an empty tensor."""
        writer = _codec_for(encoded, self)
        if writer is not self:
            return writer.error_bound(encoded)

        bounds = self.channel_error_bounds(encoded)
        return float(bounds.max()) if bounds.size else 0.0

    # Encoding.

    def _encode_float(self, tensor: torch.Tensor, dtype: str, reference: EncodedTensor | None) -> EncodedTensor:
        shape = tuple(tensor.shape)
        previous = self._reference_grid(reference, shape, dtype)
        codes, minimum, scale = self._quantize(tensor, dtype, previous)
        buffers = {"codes": self._pack(codes), "scale": scale, "minimum": minimum}
        return EncodedTensor(self.get_config(), shape, dtype, buffers)

    def _reference_grid(self, reference: EncodedTensor | None, shape: tuple[int, ...],
                        dtype: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Return the ``(minimum, scale)`` of ``reference`` when it is a valid encoding of the same tensor, else None.

        Only the config, shape, dtype and the ``"minimum"`` and ``"scale"`` buffers of
        ``reference`` are read, so a caller may drop its ``"codes"`` to save memory.
        """
        if reference is None:
            return None
        if (not isinstance(reference, EncodedTensor) or reference.codec != self.get_config()
                or tuple(reference.shape) != shape or reference.dtype != dtype
                or not isinstance(reference.buffers, Mapping)):
            return None

        rows, _ = self.channel_layout(shape)
        try:
            minimum = _buffer(reference, self.codec_id, "minimum", np.float32, rows)
            scale = _buffer(reference, self.codec_id, "scale", np.float32, rows)
        except (CodecError, KeyError):
            return None
        if not (np.isfinite(minimum).all() and np.isfinite(scale).all() and (scale >= 0).all()):
            return None
        return minimum, scale

    def _quantize(self, tensor: torch.Tensor, dtype: str,
                  previous: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quantize ``tensor`` and return its codes, minimum and scale.

        The codes are in row-major order, zero-padded to whole bytes. The minimum and
        scale are float32 arrays with one value per channel. ``previous`` is the
        ``(minimum, scale)`` of a previous encoding; see :meth:`_channel_grid`.
        """
        rows, width = self.channel_layout(tuple(tensor.shape))
        matrix = tensor.reshape(rows, width)
        numel = rows * width

        minimum = np.zeros(rows, dtype=np.float32)
        scale = np.zeros(rows, dtype=np.float32)
        codes = np.empty(self._packed_size(numel) * self.codes_per_byte, dtype=np.uint8)
        codes[numel:] = 0
        grid = codes[:numel].reshape(rows, width)

        # Each block is read from memory once: its channel ranges and its codes are both
        # computed while it is in cache. Only a row longer than a block needs a separate
        # pass for its range.
        source = _float_array(matrix)
        scratch = np.empty(min(BLOCK_NUMEL, numel), dtype=np.float32)
        for row_start, row_stop, column_start, column_stop in _blocks(rows, width):
            channels, columns = slice(row_start, row_stop), slice(column_start, column_stop)
            block = scratch[: (row_stop - row_start) * (column_stop - column_start)].reshape(row_stop - row_start, -1)
            values = _as_float32_or_float64(source[channels, columns], block)

            if column_start == 0:
                if column_stop == width:
                    low, high = values.min(axis=1), values.max(axis=1)
                else:
                    low, high = _row_range(matrix[row_start])
                minimum[channels], scale[channels] = self._channel_grid(
                    low, high, tensor, dtype,
                    None if previous is None else (previous[0][channels], previous[1][channels]))

            divisor = np.where(scale[channels] > 0, scale[channels], np.float32(1))
            np.subtract(values, minimum[channels, None], out=block)
            np.divide(block, divisor[:, None], out=block)
            np.rint(block, out=block)
            np.clip(block, 0, self.levels, out=block)
            np.copyto(grid[channels, columns], block, casting="unsafe")
        return codes, minimum, scale

    def _channel_grid(
        self, low: np.ndarray, high: np.ndarray, tensor: torch.Tensor, dtype: str,
        grid: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the float32 minimum and scale of channels spanning ``low`` to ``high``.

        Without ``grid`` each channel gets the exact fit of :meth:`_channel_ranges`.
        With the ``(minimum, scale)`` of a previous encoding, a channel keeps that grid
        while its values lie inside it (within a quarter step) and span at least :data:`GRID_MIN_SPAN` of it,
        so a value that did not move keeps its code and a delta against the previous
        codes is mostly zeros. Any other channel is fitted again, widened by
        :data:`GRID_HEADROOM` of its span on each side so that it keeps its new grid
        while its values drift a little. Reusing or widening a grid keeps the error
        bound of half a step, with a step up to ``1 + 2 * GRID_HEADROOM`` times (or,
        for a shrinking channel, ``1 / GRID_MIN_SPAN`` times) the exact fit's.
        """
        if grid is None:
            return self._channel_ranges(low, high, tensor, dtype)

        low = np.asarray(low, dtype=np.float64)
        high = np.asarray(high, dtype=np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise self._non_finite_error(tensor, dtype)

        old_minimum = grid[0].astype(np.float64)
        old_step = grid[1].astype(np.float64)
        old_span = self.levels * old_step
        # The top is computed as the decoder computes it, in float32. A value up to a
        # quarter step beyond either end is clamped to the end code, an error below
        # the half-step bound; that slack also keeps an exact fit whose float32 top
        # rounded just below the channel's maximum.
        old_top = (grid[0] + np.float32(self.levels) * grid[1]).astype(np.float64)
        slack = old_step / 4
        keep = ((grid[1] > 0) & (low >= old_minimum - slack) & (high <= old_top + slack)
                & (high - low >= GRID_MIN_SPAN * old_span))

        pad = GRID_HEADROOM * (high - low)
        minimum, scale = self._channel_ranges(low - pad, high + pad, tensor, dtype)
        minimum[keep] = grid[0][keep]
        scale[keep] = grid[1][keep]
        return minimum, scale

    def _channel_ranges(
        self, low: np.ndarray, high: np.ndarray, tensor: torch.Tensor, dtype: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the float32 minimum and scale of channels whose values span ``low`` to ``high``."""
        # numpy and torch minimum and maximum both propagate NaN, so a non-finite value
        # shows up here without another pass over the tensor.
        low = low.astype(np.float64)
        high = high.astype(np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise self._non_finite_error(tensor, dtype)

        with np.errstate(over="ignore"):
            minimum = low.astype(np.float32)
            scale = ((high - low) / self.levels).astype(np.float32)
        if _leaves_float32_range(minimum, scale, self.levels):
            raise CodecError(
                f"{self.codec_id} cannot quantize a {_describe(dtype, tuple(tensor.shape))}: values spanning "
                f"[{low.min():.6g}, {high.max():.6g}] are too wide for float32 dequantization. "
                "Use the 'lossless' codec."
            )
        return minimum, scale

    def _non_finite_error(self, tensor: torch.Tensor, dtype: str) -> CodecError:
        nan_count = int(torch.isnan(tensor).sum())
        inf_count = int(torch.isinf(tensor).sum())
        return CodecError(
            f"{self.codec_id} cannot quantize a {_describe(dtype, tuple(tensor.shape))}: it contains "
            f"{nan_count} NaN and {inf_count} infinite values. Find where training diverged, or store "
            "the tensor with the 'lossless' codec to keep the values as they are."
        )

    # Decoding.

    def _side_buffers(self, encoded: EncodedTensor, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Return the checked ``minimum`` and ``scale`` buffers."""
        _check_buffer_names(encoded, self.codec_id, ("codes", "scale", "minimum"))
        rows, _ = self.channel_layout(shape)

        minimum = _buffer(encoded, self.codec_id, "minimum", np.float32, rows)
        scale = _buffer(encoded, self.codec_id, "scale", np.float32, rows)
        if not np.isfinite(minimum).all():
            raise CodecError(
                f"{self.codec_id} buffer 'minimum' of a {_describe(encoded.dtype, shape)} "
                "contains NaN or infinite values"
            )
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise CodecError(
                f"{self.codec_id} buffer 'scale' of a {_describe(encoded.dtype, shape)} must be finite and >= 0"
            )
        if _leaves_float32_range(minimum, scale, self.levels):
            raise CodecError(
                f"{self.codec_id} buffers 'minimum' and 'scale' of a {_describe(encoded.dtype, shape)} decode to "
                "values beyond the float32 range. The buffers are damaged."
            )
        return minimum, scale

    def _decode_float(self, encoded: EncodedTensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        minimum, scale = self._side_buffers(encoded, shape)
        rows, width = self.channel_layout(shape)
        packed = _buffer(encoded, self.codec_id, "codes", np.uint8, self._packed_size(rows * width))
        self._check_padding(packed, rows * width, encoded)

        output = _empty_tensor(shape, dtype)
        self._dequantize(packed, minimum, scale, output.view(rows, width))
        return output

    def _dequantize(self, packed: np.ndarray, minimum: np.ndarray, scale: np.ndarray, grid: torch.Tensor) -> None:
        """Write ``minimum + code * scale`` into the ``channels x width`` view ``grid``, block by block."""
        # float32 output is computed in place. Other dtypes are computed in a float32
        # scratch block, then cast by numpy, or by torch for bfloat16.
        rows, width = grid.shape
        block_numel = min(BLOCK_NUMEL, grid.numel())
        code_scratch = np.empty(block_numel + 2, dtype=np.uint8)
        direct = grid.dtype == torch.float32
        target_array = None if grid.dtype == torch.bfloat16 else grid.numpy()
        scratch = np.empty(block_numel, dtype=np.float32)

        for row_start, row_stop, column_start, column_stop in _blocks(rows, width):
            channels, columns = slice(row_start, row_stop), slice(column_start, column_stop)
            shape = (row_stop - row_start, column_stop - column_start)
            start = row_start * width + column_start
            codes = self._read_codes(packed, start, start + shape[0] * shape[1], code_scratch)
            block = target_array[channels, columns] if direct else scratch[: codes.size].reshape(shape)

            np.copyto(block, codes.reshape(shape))
            np.multiply(block, scale[channels, None], out=block)
            np.add(block, minimum[channels, None], out=block)

            if target_array is None:
                grid[channels, columns].copy_(torch.from_numpy(block))
            elif not direct:
                np.copyto(target_array[channels, columns], block)

    def _check_padding(self, packed: np.ndarray, numel: int, encoded: EncodedTensor) -> None:
        """Raise ``CodecError`` if the bits after the last code are not zero."""

    @abstractmethod
    def _packed_size(self, numel: int) -> int:
        """Return the length of the ``"codes"`` buffer for ``numel`` values."""

    @abstractmethod
    def _pack(self, codes: np.ndarray) -> np.ndarray:
        """Pack one-byte codes, zero-padded to fill whole bytes, into the ``"codes"`` buffer."""

    @abstractmethod
    def _read_codes(self, packed: np.ndarray, start: int, stop: int, scratch: np.ndarray) -> np.ndarray:
        """Return codes ``start`` to ``stop`` of the ``"codes"`` buffer, one per byte.

        ``scratch`` is a uint8 array of at least ``stop - start + 2`` bytes that the
        result may view.
        """


@register_codec
class Int8Codec(_AffineCodec):
    """8-bit asymmetric affine quantization with one uint8 code per value in ``"codes"``."""

    codec_id: ClassVar[str] = "int8"
    version: ClassVar[int] = 1
    bits: ClassVar[int] = 8
    codes_per_byte: ClassVar[int] = 1

    def _packed_size(self, numel: int) -> int:
        return numel

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        return codes

    def _read_codes(self, packed: np.ndarray, start: int, stop: int, scratch: np.ndarray) -> np.ndarray:
        return packed[start:stop]


@register_codec
class Int4Codec(_AffineCodec):
    """4-bit asymmetric affine quantization, two codes per byte.

    Value ``2 * i`` sits in the low nibble of byte ``i`` and value ``2 * i + 1`` in its
    high nibble. With an odd count the last high nibble is 0.
    """

    codec_id: ClassVar[str] = "int4"
    version: ClassVar[int] = 1
    bits: ClassVar[int] = 4
    codes_per_byte: ClassVar[int] = 2

    def _packed_size(self, numel: int) -> int:
        return (numel + 1) // 2

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        packed = np.left_shift(codes[1::2], 4)
        return np.bitwise_or(packed, codes[0::2], out=packed)

    def _check_padding(self, packed: np.ndarray, numel: int, encoded: EncodedTensor) -> None:
        if numel % 2 and packed[-1] >> 4:
            raise CodecError(
                f"int4 buffer 'codes' of a {_describe(encoded.dtype, encoded.shape)} has a nonzero padding "
                "nibble in its last byte. The buffer is damaged."
            )

    def _read_codes(self, packed: np.ndarray, start: int, stop: int, scratch: np.ndarray) -> np.ndarray:
        # Unpack the whole bytes that contain codes start..stop, then drop the low
        # nibble of the first byte when start is odd.
        byte_start, byte_stop = start // 2, (stop + 1) // 2
        raw = packed[byte_start:byte_stop]

        pairs = scratch[: 2 * raw.size].reshape(raw.size, 2)
        np.bitwise_and(raw, 0x0F, out=pairs[:, 0])
        np.right_shift(raw, 4, out=pairs[:, 1])
        offset = start % 2
        return scratch[offset : offset + stop - start]
