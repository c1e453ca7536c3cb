"""Build small populated checkpoint stores with known content for the fault tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cb_mobile.codec import EncodedTensor, get_codec
from cb_mobile.manifest import parse_manifest
from cb_mobile.store import CheckpointStore

from .journal import content_digest


def make_state(seed: int, step: int, noise_elements: int = 600) -> dict[str, EncodedTensor]:
    """Return encoded tensors of one checkpoint: quantized weights, exact buffers, a constant and a drifting tensor.

    The weights drift a little with ``step`` (so later checkpoints store deltas), the
    ``data/frozen`` tensor never changes (so its chunks are shared), ``data/noise`` is
    new every step.
    """
    int8, lossless = get_codec("int8"), get_codec("lossless")
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 40, generator=generator) + 0.01 * step
    bias = torch.linspace(-1, 1, 40) * (1 + step)
    frozen = torch.from_numpy(np.random.default_rng(seed).standard_normal(900).astype(np.float32))
    drift = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(700).astype(np.float32))
    drift[step % 700] += 1.0
    noise = torch.from_numpy(np.random.default_rng([seed, step]).standard_normal(noise_elements).astype(np.float32))
    return {
        "model/weight": int8.encode(weight),
        "model/bias": lossless.encode(bias),
        "optim/state/0/step": lossless.encode(torch.tensor(float(step))),
        "data/frozen": lossless.encode(frozen),
        "data/drift": lossless.encode(drift),
        "data/noise": lossless.encode(noise),
    }


@dataclass
class PopulatedStore:
    """A store with committed checkpoints and the content digest of each.

    Attributes
    ----------
    root : Path
        Store root.
    kwargs : dict
        Arguments that reopen the store.
    ids : list of str
        Checkpoint ids, oldest first.
    digests : dict of str to str
        Content digest of each committed checkpoint.
    """

    root: Path
    kwargs: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)

    def open(self) -> CheckpointStore:
        """Open a fresh store object on the root."""
        return CheckpointStore(self.root, **self.kwargs)

    def manifest_path(self, checkpoint_id: str) -> Path:
        """Return the manifest file of ``checkpoint_id``."""
        device = self.kwargs.get("device_id", "device-0")
        return self.root / "devices" / device / "manifests" / f"{checkpoint_id}.json"

    def chunk_path(self, chunk_id: str) -> Path:
        """Return the file of ``chunk_id``."""
        return self.root / "chunks" / chunk_id[:2] / chunk_id

    def dependencies(self) -> dict[str, set[Path]]:
        """Return, per checkpoint, its manifest and every chunk file it needs, delta bases included."""
        needed = {}
        for checkpoint_id in self.ids:
            path = self.manifest_path(checkpoint_id)
            manifest = parse_manifest(path.read_bytes(), str(path))
            needed[checkpoint_id] = {path} | {self.chunk_path(chunk_id) for chunk_id in manifest.chunks}
        return needed

    def files(self) -> tuple[list[Path], list[Path]]:
        """Return the chunk files and the manifest files, sorted."""
        chunks = sorted(path for path in (self.root / "chunks").glob("*/*") if path.is_file())
        manifests = sorted(self.root.glob("devices/*/manifests/*.json"))
        return chunks, manifests


def populate(root: Path, checkpoints: int, *, seed: int = 0, meta: Mapping[str, Any] | None = None,
             **store_kwargs: Any) -> PopulatedStore:
    """Commit ``checkpoints`` checkpoints to a new store at ``root`` and return their ids and digests."""
    kwargs = {"chunk_bytes": 1024, "max_delta_chain": 3, "fsync": False, **store_kwargs}
    populated = PopulatedStore(root, kwargs)
    store = populated.open()
    for step in range(checkpoints):
        tensors = make_state(seed, step)
        result = store.commit(tensors, {"loss": 1.0 / (step + 1), "model_version": "v1", "step": step, **(meta or {})})
        assert result.committed, result.reason
        populated.ids.append(result.checkpoint_id)
        populated.digests[result.checkpoint_id] = content_digest(tensors)
    return populated
