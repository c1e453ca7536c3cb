#!/usr/bin/env bash
# Run the app on Flower's deployment engine on this machine: one SuperLink and N
# SuperNodes as separate processes on 127.0.0.1 (see docs/deployment.md).
#
# Usage: scripts/deploy_local.sh [--nodes N] [FLWR RUN ARGS...]
#   scripts/deploy_local.sh
#   scripts/deploy_local.sh --nodes 4 --run-config 'num-server-rounds=5 failure-scale=0.0'
#
# N defaults to 3; SuperNode i gets the node config "partition-id=i num-partitions=N".
# Each process starts in its own session. When the script exits, also on failure or
# Ctrl-C, it stops the SuperNodes and then the SuperLink by PID: SIGTERM, then
# SIGKILL after 15 s. The Flower home and the process logs go to a new folder under
# ${TMPDIR:-/tmp}, which the script prints and keeps. As with scripts/run.sh, an
# empty results-path writes results/<mode>-seed<seed>.json in the repository. The
# script exits with 1 when the run does not end as finished:completed.

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$repo_root/scripts/setup.sh"

nodes=3
if [ "${1:-}" = "--nodes" ]; then
    nodes="${2:-}"
    shift 2 || true
fi
if ! [[ "$nodes" =~ ^[1-9][0-9]*$ ]]; then
    echo "deploy_local.sh: --nodes must be a whole number >= 1, got '$nodes'" >&2
    exit 2
fi

workdir="$(mktemp -d "${TMPDIR:-/tmp}/cb-mobile-deploy.XXXXXX")"
export FLWR_HOME="$workdir/flwr-home"
mkdir -p "$FLWR_HOME" "$workdir/logs"
# One intra-op thread per process (the ClientApp also sets this itself), so N nodes
# on one machine do not oversubscribe its cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
connection="local-deployment"
echo "deploy_local.sh: Flower home and logs in $workdir" >&2

supernode_pids=()
superlink_pid=""
flwr_run_pid=""

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Send SIGTERM to the process groups led by the given PIDs, wait up to 15 s for the
# leaders to exit, then send SIGKILL to whatever is left of those groups.
stop_groups() {
    local pid deadline
    for pid in "$@"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + 15))
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.2
        done
    done
    for pid in "$@"; do
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
}

stop_all() {
    if [ -n "$flwr_run_pid" ]; then
        kill -TERM "$flwr_run_pid" 2>/dev/null || true
    fi
    # SuperNodes first, while the SuperLink can still take their goodbye.
    if [ "${#supernode_pids[@]}" -gt 0 ]; then
        stop_groups "${supernode_pids[@]}"
    fi
    if [ -n "$superlink_pid" ]; then
        # The SuperLink starts its SuperExec (which runs the ServerApp) in a session
        # of its own, so that group is stopped by its leader's PID too.
        local helpers
        helpers="$(ps -o pid= --ppid "$superlink_pid" 2>/dev/null | tr -d ' ' || true)"
        # shellcheck disable=SC2086
        stop_groups "$superlink_pid" $helpers
    fi
    echo "deploy_local.sh: stopped the SuperLink and ${#supernode_pids[@]} SuperNode(s); logs in $workdir/logs" >&2
}
trap stop_all EXIT
trap 'exit 130' INT TERM

wait_healthy() {
    local name="$1" pid="$2" port="$3" deadline=$((SECONDS + 60))
    until python -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1)' \
        "$port" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "deploy_local.sh: $name exited during startup; see $workdir/logs/$name.log" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "deploy_local.sh: $name did not respond on 127.0.0.1:$port/health within 60 s" >&2
            exit 1
        fi
        sleep 0.2
    done
}

superlink_port="$(free_port)"
setsid flower-superlink --insecure --host 127.0.0.1 --port "$superlink_port" \
    --disable-runtime-dependency-installation >"$workdir/logs/superlink.log" 2>&1 &
superlink_pid=$!
wait_healthy superlink "$superlink_pid" "$superlink_port"
echo "deploy_local.sh: SuperLink PID $superlink_pid on 127.0.0.1:$superlink_port" >&2

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$connection"

[superlink.$connection]
address = "127.0.0.1:$superlink_port"
insecure = true
EOF

for ((partition = 0; partition < nodes; partition++)); do
    runtime_port="$(free_port)"
    setsid flower-supernode --insecure --superlink "127.0.0.1:$superlink_port" \
        --host 127.0.0.1 --port "$runtime_port" \
        --node-config "partition-id=$partition num-partitions=$nodes" \
        >"$workdir/logs/supernode-$partition.log" 2>&1 &
    supernode_pids+=("$!")
    wait_healthy "supernode-$partition" "$!" "$runtime_port"
    echo "deploy_local.sh: SuperNode $partition PID $! (Runtime API on 127.0.0.1:$runtime_port)" >&2
done

# Start the run only once every SuperNode is registered and online, so the first
# round can sample all of them.
online_nodes() {
    flwr supernode list "$connection" --format json 2>/dev/null | python -c '
import json, sys
text = sys.stdin.read()
nodes = json.loads(text[text.find("{"):])["nodes"]
print(sum(node["status"] == "online" for node in nodes))'
}
deadline=$((SECONDS + 60))
until [ "$(online_nodes || echo 0)" -ge "$nodes" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "deploy_local.sh: not all $nodes SuperNodes came online within 60 s" >&2
        exit 1
    fi
    sleep 1
done

# `flwr run` runs in the background so that a SIGTERM to this script triggers the
# cleanup at once. Bash runs a trap only after a foreground command has finished.
cd "$repo_root"
flwr run . "$connection" --stream "$@" &
flwr_run_pid=$!
wait "$flwr_run_pid"
flwr_run_pid=""

# `flwr run --stream` exits with 0 even when the ServerApp failed, so the verdict
# comes from the SuperLink's record of the newest run.
status="$(flwr ls "$connection" --format json | python -c '
import json, sys
text = sys.stdin.read()
runs = json.loads(text[text.find("{"):])["runs"]
print(max(runs, key=lambda run: run["pending-at"])["status"] if runs else "none")')"
echo "deploy_local.sh: the run ended as $status" >&2
[ "$status" = "finished:completed" ]
