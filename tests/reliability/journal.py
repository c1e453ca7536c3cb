"""Commit journal of the crash worker and the content digest that ties a journal line to a checkpoint.

The worker appends one JSON line per event and fsyncs it before going on:
``begin`` (a commit is about to start, with the digest of what it commits), ``done``
(the commit returned and committed), ``skip`` (the commit returned without
committing), ``open`` (what a restarted worker loaded) and ``kill`` (the fault point at
which the worker is about to SIGKILL itself). A SIGKILL can land between any two of
these, so the journal lags the store by at most one commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faults import REAL


def content_digest(tensors: Mapping[str, Any]) -> str:
    """Return a BLAKE2b digest of encoded tensors: names, codec configs, shapes, dtypes and buffer bytes.

    Parameters
    ----------
    tensors : mapping of str to EncodedTensor
        What was committed, or what a read returned.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        encoded = tensors[name]
        header = {
            "name": name,
            "codec": encoded.codec,
            "shape": [int(size) for size in encoded.shape],
            "dtype": str(encoded.dtype),
            "buffers": sorted(encoded.buffers),
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        for buffer_name in sorted(encoded.buffers):
            buffer = encoded.buffers[buffer_name]
            digest.update(f"{buffer.dtype.str}{list(buffer.shape)}".encode())
            digest.update(buffer.tobytes())
    return digest.hexdigest()


def append(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line to the journal at ``path`` and fsync it, bypassing any fault injector."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = REAL["open"](os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        REAL["write"](fd, line)
        REAL["fsync"](fd)
    finally:
        os.close(fd)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the journal, ignoring a torn last line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


@dataclass(frozen=True)
class Expectation:
    """What a restart may load, according to the journal.

    Attributes
    ----------
    last_id, last_digest, last_step : str or None, str or None, int or None
        The last checkpoint whose commit returned, or None when none did.
    inflight_digest, inflight_step : str or None, int or None
        The commit that began and never returned, if any. Its manifest rename may have
        completed before the kill.
    committed_ids : frozenset of str
        Every checkpoint id the journal records as committed.
    """

    last_id: str | None
    last_digest: str | None
    last_step: int | None
    inflight_digest: str | None
    inflight_step: int | None
    committed_ids: frozenset[str]


def expectation(records: list[dict[str, Any]]) -> Expectation:
    """Derive what a restart may load from journal records."""
    last_id = last_digest = last_step = None
    inflight_digest = inflight_step = None
    committed = set()
    for record in records:
        event = record["event"]
        if event == "begin":
            inflight_digest, inflight_step = record["digest"], record["step"]
        elif event == "done":
            last_id, last_digest, last_step = record["id"], record["digest"], record["step"]
            committed.add(record["id"])
            inflight_digest = inflight_step = None
        elif event == "skip":
            inflight_digest = inflight_step = None
        elif event == "open":
            # A restart ends the in-flight commit. When it loaded that commit's
            # checkpoint, the checkpoint becomes the last commit.
            if record.get("id") is not None and record["id"] not in committed:
                committed.add(record["id"])
                last_id, last_digest, last_step = record["id"], record["digest"], record["step"]
            inflight_digest = inflight_step = None
    return Expectation(last_id, last_digest, last_step, inflight_digest, inflight_step, frozenset(committed))
