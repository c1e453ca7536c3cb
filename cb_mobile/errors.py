"""Exception types raised by the cb_mobile checkpoint runtime."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error that cb_mobile raises on purpose."""


class CodecError(CheckpointError):
    """A codec config is unknown, has an unsupported version, or a buffer does not decode."""


class CorruptCheckpointError(CheckpointError):
    """A chunk or manifest failed its checksum or could not be parsed.

    Parameters
    ----------
    message : str
        What is wrong and what to do about it.
    path : str or None, default None
        The damaged file, when one file is to blame.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NoValidCheckpointError(CheckpointError):
    """The store contains no checkpoint that passes verification."""


class StoreWriteError(CheckpointError):
    """Writing a chunk or manifest failed, for example because the disk is full."""


class StorageCapError(CheckpointError):
    """A checkpoint cannot fit under the store's storage cap."""
