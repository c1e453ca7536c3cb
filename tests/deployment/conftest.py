"""Fixtures of the deployment tests: a SuperLink and SuperNodes on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .federation import LocalFederation


@pytest.fixture
def local_federation(tmp_path: Path) -> Iterator[LocalFederation]:
    """An empty local deployment in ``tmp_path``; every process it starts is stopped after the test.

    The tails of all process logs are printed at teardown, so pytest shows them
    when the test fails.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("the deployment tests signal process groups and read /proc, which need Linux")

    federation = LocalFederation(tmp_path / "deployment")
    try:
        yield federation
    finally:
        federation.stop()
        print(federation.logs())
