"""End-to-end: one real `flwr run .` of the app on a small federation whose devices fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from simulations.compare import format_run_config, load_events

NUM_SUPERNODES = 6


def test_flwr_run_reports_failures_and_recoveries(local_superlink, repo_root: Path, tmp_path: Path):
    results_path = tmp_path / "results.json"
    store_root = tmp_path / "stores"
    run_config = {
        "mode": "checkbullet",
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "min-train-nodes": NUM_SUPERNODES,
        "local-steps": 20,
        "hidden-size": 16,
        "failure-scale": 3000.0,
        "results-path": str(results_path),
        "store-root": str(store_root),
    }
    command = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(repo_root),
        "--stream",
        "--run-config",
        format_run_config(run_config),
        "--federation-config",
        f"num-supernodes={NUM_SUPERNODES}",
    ]
    completed = subprocess.run(
        command,
        env={**os.environ, **local_superlink.env()},
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    results = json.loads(results_path.read_text())
    events = load_events(store_root)
    outcomes = {event.get("outcome") for event in events if event["event"] == "failure"}

    assert results["complete"] is True
    assert results["failures"] > 0
    assert results["recoveries"] > 0
    assert results["final_test_mse"] is not None
    assert results["storage_bytes"] > 0
    assert "pending" in outcomes or "recovered" in outcomes
