"""Tensor codecs: turn a torch tensor into named numpy buffers and back.

Contract
--------
``Codec.encode(tensor)`` returns an :class:`EncodedTensor`: the codec's JSON config
(with ``"id"`` and ``"version"``), the tensor's shape and torch dtype name, and named
numpy buffers. The bulk of the data sits in the buffer ``"codes"``; small side data such
as scales and zero points sit in other buffers. ``Codec.decode(encoded)`` returns a new
contiguous CPU tensor with the original shape and dtype. A reader needs only the config
stored beside the buffers to rebuild the codec, through :func:`codec_from_config`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch


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
        Named contiguous arrays. ``"codes"`` holds the bulk of the data.
    """

    codec: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    buffers: dict[str, np.ndarray] = field(default_factory=dict)


class Codec(ABC):
    """A symmetric tensor encoder and decoder with a JSON config."""

    codec_id: ClassVar[str]
    version: ClassVar[int]

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        """Encode ``tensor`` into buffers."""

    @abstractmethod
    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        """Rebuild a tensor from ``encoded``."""

    def get_config(self) -> dict[str, Any]:
        """Return the JSON config that :func:`codec_from_config` turns back into this codec."""
        return {"id": self.codec_id, "version": self.version}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        """Build the codec described by ``config``."""
        return cls()
