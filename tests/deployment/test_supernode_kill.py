"""A run on Flower's deployment engine survives a SuperNode killed with SIGKILL mid-round.

Three SuperNodes train on 127.0.0.1. Once the victim node has committed a checkpoint
in round 1, its whole process group (SuperNode, SuperExec and the ClientApp that is
training) gets SIGKILL, and a new SuperNode starts with the same node config. The
SuperLink marks the dead node offline once its heartbeats stop (Flower 1.42 expects one
about every 20 s and waits twice the 30 s interval), so round 1 ends with an error
reply for it. The replacement joins round 2 with no memory but the node's store on
disk, and must report the state it recovered from that store.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from cb_mobile.manifest import parse_manifest

from .federation import DeploymentError, LocalFederation, command_line, descendant_processes

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

NUM_NODES = 3
VICTIM = 1
NUM_ROUNDS = 2
# Long enough that the victim is still training when the kill lands right after its
# first checkpoint (step 1), short enough that a round takes seconds with one thread.
LOCAL_STEPS = 300

NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")


def run_config(store_root: Path, results_path: Path) -> dict[str, Any]:
    """Run config overrides: every node trains every round, no simulated failures."""
    return {
        "num-server-rounds": NUM_ROUNDS,
        "fraction-train": 1.0,
        # The server waits for all three nodes before each round, so round 2 starts
        # only once the replacement SuperNode is online.
        "min-train-nodes": NUM_NODES,
        "mode": "checkbullet",
        # The only failure in this run is the real SIGKILL.
        "failure-scale": 0.0,
        "local-steps": LOCAL_STEPS,
        "store-root": str(store_root),
        "results-path": str(results_path),
        # Bounds a round if the SuperLink never reports the dead node. It normally
        # does so within 60 s of the node's last heartbeat.
        "round-timeout-s": 150.0,
    }


def committed_checkpoints(run_dir: Path, partition_id: int) -> dict[str, int]:
    """Return ``{checkpoint id: local step}`` of the node's committed manifests.

    A manifest is renamed into place only once it is complete, so every ``*.json``
    file parses. A corrupt one raises CorruptCheckpointError and fails the test.
    """
    steps: dict[str, int] = {}
    for path in sorted(run_dir.rglob("manifests/*.json")):
        if f"node-{partition_id}" not in path.parts:
            continue
        try:
            manifest = parse_manifest(path.read_bytes(), str(path))
        except FileNotFoundError:
            continue  # evicted by the storage cap while being listed
        steps[manifest.checkpoint_id] = int(manifest.meta["step"])
    return steps


def wait_for_checkpoint(run_dir: Path, partition_id: int, timeout_s: float) -> dict[str, int]:
    """Poll the node's store until it contains a committed checkpoint, and return all of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        steps = committed_checkpoints(run_dir, partition_id)
        if steps:
            return steps
        if time.monotonic() > deadline:
            raise DeploymentError(f"node {partition_id} committed no checkpoint under {run_dir} within {timeout_s:.0f} s")
        time.sleep(0.05)


def node_replies(run_dir: Path, partition_id: int) -> list[dict[str, Any]]:
    """Return the reply events the node's ClientApp wrote to the run's events file."""
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [event for event in events if event.get("event") == "reply" and event.get("node") == partition_id]


def flower_node_id(log_text: str) -> int:
    """Return the node id the SuperLink gave a SuperNode, from the SuperNode's log."""
    match = NODE_ID_LINE.search(log_text)
    if match is None:
        raise DeploymentError(f"no 'SuperNode ID' line in the SuperNode log:\n{log_text}")
    return int(match.group(1))


def test_supernode_kill_resumes_from_store(local_federation: LocalFederation, repo_root: Path, tmp_path: Path) -> None:
    federation = local_federation
    store_root = tmp_path / "stores"
    results_path = tmp_path / "results" / "checkbullet.json"
    started = time.monotonic()

    federation.start_superlink()
    for partition_id in range(NUM_NODES):
        federation.start_supernode(partition_id, NUM_NODES)
    federation.wait_for_online_nodes(NUM_NODES, timeout_s=60)
    run_id = federation.submit(repo_root, run_config(store_root, results_path))
    run_dir = store_root / f"run-{run_id}"
    logger.info("%.1f s: run %d submitted to %d online SuperNodes", time.monotonic() - started, run_id, NUM_NODES)

    # Kill the victim's whole process group once its store contains a checkpoint.
    wait_for_checkpoint(run_dir, VICTIM, timeout_s=120)
    victim = federation.supernodes[VICTIM]
    victim_alive_at_kill = victim.running()
    victim_node_id = flower_node_id(victim.log_tail(400))
    victim_group = [command_line(pid) for pid, _ in descendant_processes(victim.pid)]
    victim.kill()
    checkpoints_at_kill = committed_checkpoints(run_dir, VICTIM)
    replies_before_kill = node_replies(run_dir, VICTIM)
    logger.info(
        "%.1f s: killed node %d (Flower node id %d) holding checkpoints %s",
        time.monotonic() - started, VICTIM, victim_node_id, checkpoints_at_kill,
    )

    replacement = federation.start_supernode(VICTIM, NUM_NODES)
    logger.info("%.1f s: replacement SuperNode for node %d started", time.monotonic() - started, VICTIM)
    status = federation.wait_for_run(run_id, timeout_s=240)
    logger.info("%.1f s: run %d ended as %s", time.monotonic() - started, run_id, status)

    results = json.loads(results_path.read_text(encoding="utf-8"))
    replies_after_restart = node_replies(run_dir, VICTIM)
    recovered = [reply for reply in replies_after_restart if reply.get("recovered") == 1]
    node_statuses = federation.node_statuses()

    # The kill hit a live node in the middle of its round 1.
    assert victim_alive_at_kill, "the victim SuperNode had exited before the kill"
    assert any("flwr-clientapp" in command for command in victim_group), (
        f"no ClientApp process was training under the victim SuperNode at the kill: {victim_group}"
    )
    assert replies_before_kill == [], f"node {VICTIM} replied before the kill, so the kill was not mid-round"
    assert node_statuses[victim_node_id] == "offline", f"the SuperLink still lists the killed node: {node_statuses}"

    # The run went on without the node and finished every round.
    assert status == "finished:completed", f"run {run_id} ended as {status}"
    assert results["complete"] is True
    assert [record["round"] for record in results["rounds"]] == list(range(1, NUM_ROUNDS + 1))
    assert results["rounds"][0]["failed"] >= 1, f"round 1 counted no failure: {results['rounds'][0]}"

    # The replacement resumed from the killed node's store instead of from scratch.
    assert replacement.running(), "the replacement SuperNode exited during the run"
    assert recovered, f"the restarted node {VICTIM} reported no recovery; its replies: {replies_after_restart}"
    assert recovered[0]["steps-completed"] in checkpoints_at_kill.values(), (
        f"node {VICTIM} resumed at step {recovered[0]['steps-completed']}, which is not one of the steps "
        f"it had committed before the kill: {checkpoints_at_kill}"
    )
    assert results["recoveries"] >= 1
