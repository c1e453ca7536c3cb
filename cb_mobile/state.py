"""Training state capture: a TrainingState to named tensors plus JSON metadata, and back.

Contract
--------
:func:`flatten_state` turns a :class:`TrainingState` into a flat mapping of names to CPU
tensors and a JSON-serializable ``meta`` dict. :func:`unflatten_state` reverses it and
validates what it reads. Tensor names are:

- ``"model/<state_dict key>"`` for the model state_dict;
- ``"optim/state/<param index>/<buffer name>"`` for optimizer buffers such as Adam's
  ``exp_avg`` (nested lists or dicts in a buffer add ``/<index or key>``);
- ``"optim/param_groups/<group index>/<key>"`` for a hyperparameter that is a tensor;
- ``"rng/torch"``, ``"rng/numpy"`` and ``"rng/python"`` for the global RNG states, and
  ``"rng/generator/<name>"`` for a torch or numpy generator passed by the caller.

Everything that is not a tensor (counters, loss, param_groups, scalar optimizer entries,
RNG positions) lives in ``meta``. ``meta["loss"]`` is a finite float or None and
``meta["model_version"]`` is a string, as the checkpoint store expects. Values JSON
cannot express directly (tuples, non-finite floats, integers outside int64, dicts with
non-string keys) are written as small tagged objects, so the round trip keeps their
types. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from cb_mobile.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

STATE_FORMAT = "cb_mobile.training_state"
STATE_FORMAT_VERSION = 1

MODEL_PREFIX = "model/"
OPTIMIZER_STATE_PREFIX = "optim/state/"
OPTIMIZER_GROUP_PREFIX = "optim/param_groups/"
RNG_TORCH = "rng/torch"
RNG_NUMPY = "rng/numpy"
RNG_PYTHON = "rng/python"
RNG_GENERATOR_PREFIX = "rng/generator/"

# Tags of the JSON objects that carry values JSON has no type for.
_TAG_TENSOR = "__tensor__"
_TAG_NDARRAY = "__ndarray__"
_TAG_TUPLE = "__tuple__"
_TAG_FLOAT = "__float__"
_TAG_INT = "__int__"
_TAG_DICT = "__dict__"
_TAGS = frozenset({_TAG_TENSOR, _TAG_NDARRAY, _TAG_TUPLE, _TAG_FLOAT, _TAG_INT, _TAG_DICT})

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_MT19937_WORDS = 624

Generator = torch.Generator | np.random.Generator
TensorRole = Literal["model", "optimizer", "exact"]


@dataclass
class TrainingState:
    """Everything a device needs to resume training exactly where it stopped.

    Attributes
    ----------
    model : dict of str to torch.Tensor
        The model state_dict.
    optimizer : dict or None
        ``optimizer.state_dict()``, or None when no optimizer is checkpointed.
    step : int
        Optimizer steps taken so far.
    epoch : int
        Passes over the local data so far.
    data_position : int
        Index of the next sample or batch within the current epoch.
    loss : float or None
        Training loss at the checkpoint; None when no loss was recorded yet.
    round : int
        Federated round the state belongs to.
    model_version : str
        Version of the global model this local training started from.
    rng : dict or None
        Output of :func:`capture_rng_state`.
    extra : dict
        Caller data; it must be JSON-serializable.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    step: int = 0
    epoch: int = 0
    data_position: int = 0
    loss: float | None = None
    round: int = 0
    model_version: str = "0"
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# RNG capture and restore
# ---------------------------------------------------------------------------


def capture_rng_state(generators: Mapping[str, Generator] | None = None) -> dict[str, Any]:
    """Capture the global torch, numpy and Python RNG states, plus optional generators.

    Parameters
    ----------
    generators : mapping of str to torch.Generator or numpy.random.Generator, optional
        Generators the training loop owns, for example a data-shuffling generator. Their
        states are stored under their names and restored by :func:`restore_rng_state`.

    Returns
    -------
    dict
        ``{"torch": uint8 tensor, "numpy": np.random.get_state() tuple,
        "python": random.getstate() tuple, "generators": {name: {"kind", "state"}}}``.
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=True),
        "python": random.getstate(),
        "generators": {},
    }

    for name, generator in (generators or {}).items():
        state["generators"][name] = _capture_generator(name, generator)

    # NOTE: CUDA RNG states are not captured; this runtime targets CPU devices.
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, Generator] | None = None
) -> None:
    """Restore the global RNG states and, in place, the caller's generators.

    Parameters
    ----------
    state : mapping
        Output of :func:`capture_rng_state`, possibly after a checkpoint round trip.
    generators : mapping of str to torch.Generator or numpy.random.Generator, optional
        Generators to restore, matched to the saved ones by name.

    Raises
    ------
    CheckpointError
        If a generator is not in ``state`` or is of another kind than the saved one.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])

    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(
                f"generator {name!r} is not in the checkpointed RNG state, which has "
                f"{sorted(saved)}; pass the same generator names when saving and restoring"
            )
        _restore_generator(name, generator, saved[name])


def _capture_generator(name: str, generator: Generator) -> dict[str, Any]:
    if isinstance(generator, torch.Generator):
        return {"kind": "torch", "state": generator.get_state()}
    if isinstance(generator, np.random.Generator):
        return {"kind": "numpy", "state": generator.bit_generator.state}
    raise CheckpointError(
        f"generator {name!r} has type {type(generator).__name__}; pass a torch.Generator "
        "or a numpy.random.Generator"
    )


def _restore_generator(name: str, generator: Generator, saved: Mapping[str, Any]) -> None:
    kind = saved.get("kind")
    if isinstance(generator, torch.Generator) and kind == "torch":
        generator.set_state(saved["state"])
        return
    if isinstance(generator, np.random.Generator) and kind == "numpy":
        generator.bit_generator.state = saved["state"]
        return
    raise CheckpointError(
        f"generator {name!r} is a {type(generator).__name__} but the checkpoint contains a "
        f"{kind} generator state under that name; restore it into a generator of the saved type"
    )


# ---------------------------------------------------------------------------
# Flatten
# ---------------------------------------------------------------------------


def flatten_state(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``state`` into named CPU tensors and JSON metadata.

    Parameters
    ----------
    state : TrainingState
        The state to flatten. Tensors are detached and moved to the CPU but not copied
        when they already live there, so encode them before training changes them.

    Returns
    -------
    tensors : dict of str to torch.Tensor
        Named tensors, see the module docstring for the names.
    meta : dict
        JSON-serializable metadata, with ``"loss"`` and ``"model_version"`` at the top.

    Raises
    ------
    CheckpointError
        If a field has the wrong type, a value cannot be stored without pickle, or
        ``extra`` is not JSON-serializable. The message names the field.
    """
    _check_counters(state)
    tensors: dict[str, torch.Tensor] = {}

    model_meta = [
        [key, _encode_value(value, MODEL_PREFIX + key, tensors)] for key, value in state.model.items()
    ]
    optimizer_meta = None if state.optimizer is None else _flatten_optimizer(state.optimizer, tensors)
    rng_meta = None if state.rng is None else _flatten_rng(state.rng, tensors)
    loss, loss_repr = _loss_to_meta(state.loss)

    meta: dict[str, Any] = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "loss": loss,
        "model_version": state.model_version,
        "step": state.step,
        "epoch": state.epoch,
        "data_position": state.data_position,
        "round": state.round,
        "model": model_meta,
        "optimizer": optimizer_meta,
        "rng": rng_meta,
        "extra": _check_extra(state.extra),
    }
    if loss_repr is not None:
        meta["loss_nonfinite"] = loss_repr

    return tensors, meta


def _check_counters(state: TrainingState) -> None:
    for name in ("step", "epoch", "data_position", "round"):
        value = getattr(state, name)
        if not _is_int(value) or value < 0:
            raise CheckpointError(f"TrainingState.{name} must be a non-negative int, got {value!r}")
    if not isinstance(state.model_version, str):
        raise CheckpointError(
            f"TrainingState.model_version must be a str, got {type(state.model_version).__name__}"
        )
    if state.loss is not None and not isinstance(state.loss, (int, float)):
        raise CheckpointError(f"TrainingState.loss must be a float or None, got {state.loss!r}")
    if not isinstance(state.model, Mapping):
        raise CheckpointError(
            f"TrainingState.model must be a state_dict mapping, got {type(state.model).__name__}"
        )


def _loss_to_meta(loss: float | None) -> tuple[float | None, str | None]:
    # The store's "loss" is a finite float or null. A NaN or infinite loss is kept
    # beside it as text, so the state round-trips and selection still skips it.
    if loss is None:
        return None, None
    loss = float(loss)
    if math.isfinite(loss):
        return loss, None
    return None, repr(loss)


def _check_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(extra, Mapping):
        raise CheckpointError(f"TrainingState.extra must be a dict, got {type(extra).__name__}")
    try:
        return json.loads(json.dumps(dict(extra), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"TrainingState.extra is not JSON-serializable ({error}); store only str, "
            "finite numbers, bools, None, lists and dicts with str keys"
        ) from error


def _flatten_optimizer(
    optimizer_state: Mapping[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    if "state" not in optimizer_state or "param_groups" not in optimizer_state:
        raise CheckpointError(
            "optimizer state_dict must have 'state' and 'param_groups' keys, got "
            f"{sorted(optimizer_state)}; pass optimizer.state_dict()"
        )

    state_meta = []
    for param_key, buffers in optimizer_state["state"].items():
        prefix = f"{OPTIMIZER_STATE_PREFIX}{param_key}/"
        encoded = {name: _encode_value(value, prefix + name, tensors) for name, value in buffers.items()}
        state_meta.append([_encode_value(param_key, prefix, tensors), encoded])

    groups_meta = []
    for index, group in enumerate(optimizer_state["param_groups"]):
        prefix = f"{OPTIMIZER_GROUP_PREFIX}{index}/"
        groups_meta.append({key: _encode_value(value, prefix + key, tensors) for key, value in group.items()})

    other = {key: value for key, value in optimizer_state.items() if key not in ("state", "param_groups")}
    return {
        "state": state_meta,
        "param_groups": groups_meta,
        "other": _encode_value(other, "optim/other", tensors),
    }


def _flatten_rng(rng: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    meta: dict[str, Any] = {}

    if "torch" in rng:
        tensors[RNG_TORCH] = _as_cpu_tensor(rng["torch"], RNG_TORCH)
        meta["torch"] = True

    if "numpy" in rng:
        meta["numpy"] = _flatten_numpy_legacy(rng["numpy"], tensors)

    if "python" in rng:
        meta["python"] = _flatten_python_random(rng["python"], tensors)

    generators = {}
    for name, saved in rng.get("generators", {}).items():
        generators[name] = _flatten_generator(name, saved, tensors)
    meta["generators"] = generators

    return meta


def _flatten_numpy_legacy(state: Sequence[Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    try:
        algorithm, keys, pos, has_gauss, cached_gaussian = state
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            "rng['numpy'] must be the 5-tuple np.random.get_state() returns"
        ) from error
    keys = np.asarray(keys)
    if algorithm != "MT19937" or keys.shape != (_MT19937_WORDS,):
        raise CheckpointError(
            f"rng['numpy'] must be an MT19937 state with {_MT19937_WORDS} keys, got "
            f"{algorithm!r} with shape {keys.shape}"
        )

    tensors[RNG_NUMPY] = torch.from_numpy(keys.astype(np.int64))
    return {
        "algorithm": algorithm,
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": _encode_value(float(cached_gaussian), RNG_NUMPY, tensors),
    }


def _flatten_python_random(state: Sequence[Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    try:
        version, internal, gauss_next = state
    except (TypeError, ValueError) as error:
        raise CheckpointError("rng['python'] must be the 3-tuple random.getstate() returns") from error

    tensors[RNG_PYTHON] = torch.tensor(list(internal), dtype=torch.int64)
    return {"version": int(version), "gauss_next": _encode_value(gauss_next, RNG_PYTHON, tensors)}


def _flatten_generator(name: str, saved: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensor_name = RNG_GENERATOR_PREFIX + name
    kind = saved.get("kind") if isinstance(saved, Mapping) else None

    if kind == "torch":
        tensors[tensor_name] = _as_cpu_tensor(saved["state"], tensor_name)
        return {"kind": "torch"}
    if kind == "numpy":
        return {"kind": "numpy", "state": _encode_value(saved["state"], tensor_name, tensors)}
    raise CheckpointError(
        f"rng['generators'][{name!r}] must come from capture_rng_state, with kind 'torch' "
        f"or 'numpy', got {kind!r}"
    )


def _as_cpu_tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value.detach().cpu().contiguous()


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _encode_value(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Encode ``value`` as JSON, moving tensors and arrays into ``tensors`` under ``name``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensors[name] = _as_cpu_tensor(value, name)
        return {_TAG_TENSOR: name}
    if isinstance(value, np.ndarray):
        return _encode_ndarray(value, name, tensors)
    if isinstance(value, np.generic):
        return _encode_value(value.item(), name, tensors)
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _INT64_MAX else {_TAG_INT: str(value)}
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG_FLOAT: repr(value)}
    if isinstance(value, tuple):
        return {_TAG_TUPLE: [_encode_value(item, f"{name}/{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode_value(item, f"{name}/{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return _encode_mapping(value, name, tensors)
    raise CheckpointError(
        f"{name} has type {type(value).__name__}, which cannot be stored without pickle; "
        "use tensors, arrays, numbers, str, bool, None, lists, tuples or dicts"
    )


def _encode_ndarray(array: np.ndarray, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    dtype = array.dtype
    if dtype == np.uint32 or dtype == np.uint16:
        stored = array.astype(np.int64)
    elif dtype == np.uint64:
        stored = array.view(np.int64)
    elif dtype.kind in "biuf":
        stored = array
    else:
        raise CheckpointError(f"{name} is a numpy array of dtype {dtype}, which cannot be stored")
    tensors[name] = torch.from_numpy(np.ascontiguousarray(stored).copy())
    return {_TAG_NDARRAY: name, "dtype": dtype.str}


def _encode_mapping(value: Mapping[Any, Any], name: str, tensors: dict[str, torch.Tensor]) -> Any:
    plain = all(isinstance(key, str) and key not in _TAGS for key in value)
    if plain:
        return {key: _encode_value(item, f"{name}/{key}", tensors) for key, item in value.items()}
    return {
        _TAG_DICT: [
            [_encode_value(key, name, tensors), _encode_value(item, f"{name}/{key}", tensors)]
            for key, item in value.items()
        ]
    }


# ---------------------------------------------------------------------------
# Unflatten
# ---------------------------------------------------------------------------


class _Reader:
    """Decodes tagged JSON back into values, tracking which tensors were used."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CorruptCheckpointError(
                f"checkpoint tensor {name!r} is missing; the manifest and metadata disagree, "
                "so recover from another checkpoint"
            )
        value = self.tensors[name]
        if not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                f"checkpoint entry {name!r} decoded to {type(value).__name__}, expected a torch.Tensor"
            )
        self.used.add(name)
        return value

    def value(self, encoded: Any, where: str) -> Any:
        if encoded is None or isinstance(encoded, (bool, int, float, str)):
            return encoded
        if isinstance(encoded, list):
            return [self.value(item, where) for item in encoded]
        if not isinstance(encoded, dict):
            raise CorruptCheckpointError(f"metadata at {where} has type {type(encoded).__name__}")
        if len(encoded) >= 1 and set(encoded) & _TAGS:
            return self._tagged(encoded, where)
        return {key: self.value(item, f"{where}/{key}") for key, item in encoded.items()}

    def _tagged(self, encoded: dict[str, Any], where: str) -> Any:
        try:
            if _TAG_TENSOR in encoded:
                return self.tensor(encoded[_TAG_TENSOR])
            if _TAG_NDARRAY in encoded:
                return self._ndarray(encoded[_TAG_NDARRAY], np.dtype(encoded["dtype"]))
            if _TAG_TUPLE in encoded:
                return tuple(self.value(item, where) for item in encoded[_TAG_TUPLE])
            if _TAG_FLOAT in encoded:
                return float(encoded[_TAG_FLOAT])
            if _TAG_INT in encoded:
                return int(encoded[_TAG_INT])
            return {
                _hashable(self.value(key, where)): self.value(item, where)
                for key, item in encoded[_TAG_DICT]
            }
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCheckpointError(f"metadata at {where} is malformed: {error!r}") from error

    def _ndarray(self, name: str, dtype: np.dtype) -> np.ndarray:
        stored = self.tensor(name).numpy()
        if dtype == np.uint64:
            return stored.view(np.uint64).copy()
        return stored.astype(dtype)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def unflatten_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> TrainingState:
    """Rebuild a :class:`TrainingState` from :func:`flatten_state` output.

    Parameters
    ----------
    tensors : mapping of str to torch.Tensor
        Decoded tensors, by name.
    meta : mapping
        The metadata stored with them.

    Returns
    -------
    TrainingState
        The state. RNG entries come back in the formats that :func:`restore_rng_state`
        takes.

    Raises
    ------
    CorruptCheckpointError
        If the format tag is unknown, a field is missing or has the wrong type, a tensor
        is missing or unexpected, or an RNG tensor has the wrong dtype or shape. The
        message names the key.
    """
    _check_format(meta)
    reader = _Reader(tensors)

    model = {}
    for entry in _require(meta, "model", list):
        key, encoded = _pair(entry, "model")
        model[key] = reader.value(encoded, MODEL_PREFIX + key)

    optimizer_meta = _require(meta, "optimizer", (dict, type(None)))
    optimizer = None if optimizer_meta is None else _unflatten_optimizer(optimizer_meta, reader)
    rng_meta = _require(meta, "rng", (dict, type(None)))
    rng = None if rng_meta is None else _unflatten_rng(rng_meta, reader)

    unexpected = sorted(set(tensors) - reader.used)
    if unexpected:
        raise CorruptCheckpointError(
            f"checkpoint has tensors the metadata does not reference: {unexpected[:5]}; "
            "the manifest and metadata disagree, so recover from another checkpoint"
        )

    return TrainingState(
        model=model,
        optimizer=optimizer,
        step=_require_int(meta, "step"),
        epoch=_require_int(meta, "epoch"),
        data_position=_require_int(meta, "data_position"),
        loss=_loss_from_meta(meta),
        round=_require_int(meta, "round"),
        model_version=_require(meta, "model_version", str),
        rng=rng,
        extra=dict(_require(meta, "extra", dict)),
    )


def _check_format(meta: Mapping[str, Any]) -> None:
    if not isinstance(meta, Mapping):
        raise CorruptCheckpointError(f"checkpoint metadata must be a dict, got {type(meta).__name__}")
    if meta.get("format") != STATE_FORMAT:
        raise CorruptCheckpointError(
            f"checkpoint metadata 'format' is {meta.get('format')!r}, expected {STATE_FORMAT!r}; "
            "it was not written by cb_mobile.state"
        )
    version = meta.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"checkpoint metadata 'format_version' is {version!r}, but this cb_mobile reads "
            f"version {STATE_FORMAT_VERSION}; upgrade cb_mobile to read it"
        )


def _require(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in meta:
        raise CorruptCheckpointError(f"checkpoint metadata is missing key {key!r}")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise CorruptCheckpointError(
            f"checkpoint metadata key {key!r} has type {type(value).__name__}, which is invalid"
        )
    return value


def _require_int(meta: Mapping[str, Any], key: str) -> int:
    value = _require(meta, key, int)
    if value < 0:
        raise CorruptCheckpointError(f"checkpoint metadata key {key!r} is negative: {value}")
    return value


def _pair(entry: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(entry, list) or len(entry) != 2:
        raise CorruptCheckpointError(f"checkpoint metadata {where!r} has a malformed entry {entry!r:.80}")
    return entry[0], entry[1]


def _loss_from_meta(meta: Mapping[str, Any]) -> float | None:
    loss = _require(meta, "loss", (int, float, type(None)))
    if "loss_nonfinite" in meta:
        return float(meta["loss_nonfinite"])
    return None if loss is None else float(loss)


def _unflatten_optimizer(optimizer_meta: Mapping[str, Any], reader: _Reader) -> dict[str, Any]:
    state = {}
    for entry in _require(optimizer_meta, "state", list):
        encoded_key, buffers = _pair(entry, "optimizer.state")
        param_key = reader.value(encoded_key, "optimizer.state")
        if not isinstance(buffers, dict):
            raise CorruptCheckpointError(f"optimizer state for parameter {param_key!r} is malformed")
        prefix = f"{OPTIMIZER_STATE_PREFIX}{param_key}/"
        state[param_key] = {name: reader.value(value, prefix + name) for name, value in buffers.items()}

    groups = []
    for index, group in enumerate(_require(optimizer_meta, "param_groups", list)):
        if not isinstance(group, dict) or "params" not in group:
            raise CorruptCheckpointError(f"optimizer param_groups[{index}] is malformed or has no 'params'")
        groups.append(reader.value(group, f"{OPTIMIZER_GROUP_PREFIX}{index}"))

    other = reader.value(optimizer_meta.get("other", {}), "optim/other")
    return {"state": state, "param_groups": groups, **other}


def _unflatten_rng(rng_meta: Mapping[str, Any], reader: _Reader) -> dict[str, Any]:
    rng: dict[str, Any] = {}

    if rng_meta.get("torch"):
        rng["torch"] = _check_rng_tensor(reader.tensor(RNG_TORCH), RNG_TORCH, torch.uint8, None)

    if "numpy" in rng_meta:
        numpy_meta = rng_meta["numpy"]
        keys = _check_rng_tensor(reader.tensor(RNG_NUMPY), RNG_NUMPY, torch.int64, _MT19937_WORDS)
        try:
            rng["numpy"] = (
                numpy_meta["algorithm"],
                keys.numpy().astype(np.uint32),
                int(numpy_meta["pos"]),
                int(numpy_meta["has_gauss"]),
                float(reader.value(numpy_meta["cached_gaussian"], RNG_NUMPY)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCheckpointError(f"checkpoint metadata rng.numpy is malformed: {error!r}") from error

    if "python" in rng_meta:
        python_meta = rng_meta["python"]
        words = _check_rng_tensor(reader.tensor(RNG_PYTHON), RNG_PYTHON, torch.int64, _MT19937_WORDS + 1)
        try:
            gauss_next = reader.value(python_meta["gauss_next"], RNG_PYTHON)
            rng["python"] = (int(python_meta["version"]), tuple(int(x) for x in words.tolist()), gauss_next)
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCheckpointError(f"checkpoint metadata rng.python is malformed: {error!r}") from error

    rng["generators"] = {}
    for name, saved in rng_meta.get("generators", {}).items():
        tensor_name = RNG_GENERATOR_PREFIX + name
        if saved.get("kind") == "torch":
            state = _check_rng_tensor(reader.tensor(tensor_name), tensor_name, torch.uint8, None)
            rng["generators"][name] = {"kind": "torch", "state": state}
        elif saved.get("kind") == "numpy":
            rng["generators"][name] = {"kind": "numpy", "state": reader.value(saved.get("state"), tensor_name)}
        else:
            raise CorruptCheckpointError(f"checkpoint generator {name!r} has unknown kind {saved.get('kind')!r}")

    return rng


def _check_rng_tensor(tensor: torch.Tensor, name: str, dtype: torch.dtype, length: int | None) -> torch.Tensor:
    if tensor.dtype != dtype or tensor.dim() != 1:
        raise CorruptCheckpointError(
            f"checkpoint tensor {name!r} must be a 1-D {dtype} tensor, got {tensor.dtype} "
            f"with shape {tuple(tensor.shape)}"
        )
    if length is not None and tensor.numel() != length:
        raise CorruptCheckpointError(f"checkpoint tensor {name!r} must have {length} entries, got {tensor.numel()}")
    return tensor.contiguous()


# ---------------------------------------------------------------------------
# Codec roles
# ---------------------------------------------------------------------------


def tensor_role(name: str, tensor: torch.Tensor) -> TensorRole:
    """Return which codec a flattened tensor gets.

    Parameters
    ----------
    name : str
        Flattened tensor name.
    tensor : torch.Tensor
        The tensor.

    Returns
    -------
    {"model", "optimizer", "exact"}
        ``"model"`` is for floating model weights (the model codec, int8 by default).
        ``"optimizer"`` is for floating optimizer buffers such as moments (the
        optimizer codec, lossless by default). ``"exact"`` is for everything that must
        round-trip bit for bit: integer and bool tensors, RNG states, the optimizer's
        ``step`` counter and tensor hyperparameters in param_groups.
    """
    if not tensor.is_floating_point():
        return "exact"
    if name.startswith(MODEL_PREFIX):
        return "model"
    if name.startswith(OPTIMIZER_STATE_PREFIX) and name.rsplit("/", 1)[-1] != "step":
        return "optimizer"
    return "exact"
