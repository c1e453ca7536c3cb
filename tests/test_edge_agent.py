"""Tests that the edge-device agent runs end to end and that cb_mobile imports without Flower."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cb_mobile.store import CheckpointStore

REPO_ROOT = Path(__file__).resolve().parents[1]
AGENT = REPO_ROOT / "examples" / "edge_agent.py"

# Installs an import hook that makes every `flwr` import fail, as on a device without Flower.
BLOCK_FLWR = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockFlower(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "flwr" or name.startswith("flwr."):
                raise ImportError(f"{name} is blocked: this device has no Flower")
            return None

    sys.meta_path.insert(0, BlockFlower())
    """
)


def _run_python(code: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_runtime_imports_without_flwr():
    code = BLOCK_FLWR + textwrap.dedent(
        """
        import cb_mobile
        import cb_mobile.codec, cb_mobile.interval, cb_mobile.manager
        import cb_mobile.merge, cb_mobile.state, cb_mobile.store
        print(sorted(name for name in sys.modules if name.split(".")[0] == "flwr"))
        """
    )

    completed = _run_python(code)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_blocker_blocks_flwr():
    completed = _run_python(BLOCK_FLWR + "import flwr\n")

    assert completed.returncode != 0
    assert "blocked" in completed.stderr


def _run_agent(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    code = BLOCK_FLWR + textwrap.dedent(
        """
        import runpy
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """
    )
    completed = _run_python(code, str(AGENT), "--steps", "200", "--store", str(tmp_path / "store"),
                            "--report", str(report), *extra)
    summary = json.loads(report.read_text()) if report.exists() else {}
    return completed, summary


def test_agent_crash_and_recovery(tmp_path):
    completed, summary = _run_agent(tmp_path)
    infos = CheckpointStore(tmp_path / "store", device_id="handset-0", create=False).checkpoints()
    reasons = {info.meta["step"]: info.meta["checkpoint_reason"] for info in infos}

    assert completed.returncode == 0, completed.stderr
    assert "CRASH" in completed.stdout
    assert "Recovered from the on-device store" in completed.stdout
    assert summary["steps"] == 200
    assert summary["crashed"] is True
    assert summary["recoveries"] == 1
    # The battery runs low at step 117, three steps before the device dies at step 120.
    assert reasons.get(117) == "imminent failure"


@pytest.mark.slow
def test_agent_sigkill_mode(tmp_path):
    completed, summary = _run_agent(tmp_path, "--crash-mode", "kill")

    assert completed.returncode == 0, completed.stderr
    assert "killed with SIGKILL" in completed.stdout
    assert summary["steps"] == 200
    assert summary["recoveries"] == 1
