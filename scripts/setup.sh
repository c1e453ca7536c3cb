# Prepare the project's virtual environment and the Flower environment variables.
#
# Source this file from bash (scripts/run.sh and scripts/test.sh do). It:
#   - creates .venv with python3 (3.10 or newer) when it is missing,
#   - installs the project with `pip install -e ".[test]"` when pyproject.toml
#     changed since the last install, or when the project does not import,
#   - activates .venv and exports the variables Flower and the app read.
# PYTHON selects the interpreter that creates .venv (default: python3).

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
python_bin="${PYTHON:-python3}"

if ! command -v "$python_bin" >/dev/null 2>&1; then
    echo "setup.sh: $python_bin not found; install Python 3.11 or set PYTHON=/path/to/python3" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "setup.sh: $("$python_bin" --version 2>&1) is too old;" \
            "cb-mobile needs Python 3.10 or newer (3.11 tested)" >&2
        exit 1
    fi
    echo "setup.sh: creating $venv" >&2
    "$python_bin" -m venv "$venv"
fi

# shellcheck source=/dev/null
source "$venv/bin/activate"

# The stamp contains the hash of the pyproject.toml that was last installed.
stamp="$venv/.cb-mobile-installed"
wanted="$(python -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
    "$repo_root/pyproject.toml")"
installed="$(cat "$stamp" 2>/dev/null || true)"
if [ "$wanted" != "$installed" ] \
    || ! python -c 'import cb_mobile, server_app, flwr, torch' >/dev/null 2>&1; then
    echo "setup.sh: installing cb-mobile and its dependencies into $venv" >&2
    python -m pip install --disable-pip-version-check --no-input --progress-bar off \
        -e "$repo_root[test]"
    echo "$wanted" > "$stamp"
fi

# Flower: no telemetry or update check (the machine may be offline), and no
# `uv sync` of the app's dependencies at every run (it would fetch another torch).
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Flower state (config.toml, installed app bundles, SuperLink logs) stays in the
# repository, in a folder .gitignore excludes.
export FLWR_HOME="$repo_root/.flwr-home"
mkdir -p "$FLWR_HOME"
# The ServerApp writes results under this folder when results-path is empty.
export CB_MOBILE_BASE_DIR="$repo_root"
