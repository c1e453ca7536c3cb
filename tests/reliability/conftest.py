"""Shared fixtures of the reliability suite: figure recording, an address-space limit and store builders."""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

FIGURES_ENV = "CB_MOBILE_RELIABILITY_FIGURES"
"""When set, the measured figures of the run are written as JSON to this path."""

_figures: dict[str, object] = {}


@pytest.fixture
def record_figure() -> Callable[[str, object], None]:
    """Return a function that records one measured figure (a count or an outcome tally) of this run."""
    def record(name: str, value: object) -> None:
        _figures[name] = value

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures recorded by the reliability tests, and write them to a file when asked."""
    if not _figures:
        return
    terminalreporter.section("reliability figures")
    for name in sorted(_figures):
        terminalreporter.write_line(f"{name}: {json.dumps(_figures[name], sort_keys=True)}")

    target = os.environ.get(FIGURES_ENV)
    if target:
        path = Path(target)
        existing = json.loads(path.read_text()) if path.exists() else {}
        existing.update(_figures)
        path.write_text(json.dumps(existing, indent=1, sort_keys=True))


def _virtual_memory_bytes() -> int:
    """Return this process's current virtual memory size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize is missing from /proc/self/status")


@pytest.fixture
def address_space_limit() -> Iterator[int]:
    """Cap this process's address space at its current size plus 1 GiB for the test.

    An allocation sized from a hostile length field then fails with MemoryError,
    which the tests treat as a failure, instead of succeeding lazily under Linux
    overcommit. Only the soft limit changes, so teardown can restore it.
    """
    if not os.path.exists("/proc/self/status"):
        pytest.skip("the address-space limit needs /proc/self/status (Linux)")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _virtual_memory_bytes() + (1 << 30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
