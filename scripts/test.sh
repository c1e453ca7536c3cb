#!/usr/bin/env bash
# Run the test suite (the default suite skips tests marked slow).
#
# Usage: scripts/test.sh [PYTEST ARGS...]
#   scripts/test.sh
#   scripts/test.sh -m slow
#   scripts/test.sh -x -q tests/test_server_validation.py

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$repo_root/scripts/setup.sh"

cd "$repo_root"
exec python -m pytest "$@"
