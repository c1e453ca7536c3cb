#!/usr/bin/env bash
# Run the cb_mobile Flower app once on a local simulation SuperLink.
#
# Usage: scripts/run.sh [FLWR RUN ARGS...]
#   scripts/run.sh
#   scripts/run.sh --run-config "mode=\"fedavg\" num-server-rounds=5"
#   scripts/run.sh --federation-config "num-supernodes=200"
#
# Without --federation-config the federation has 10 simulated nodes. The script
# starts its own SuperLink on free 127.0.0.1 ports, runs `flwr run . --stream`
# against it, and stops it by PID when the run ends, fails or is interrupted.

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$repo_root/scripts/setup.sh"

cd "$repo_root"
exec python -m server_app.local_superlink "$@"
