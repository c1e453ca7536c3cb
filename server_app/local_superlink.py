"""A local simulation SuperLink that this process starts, and stops by its PID.

``flwr run .`` (Flower 1.42) starts a local SuperLink on 127.0.0.1:39091 when none
responds there, and leaves it running with no command to stop it. Flower writes no
PID file for it. This module therefore starts the SuperLink itself, with the same
command line Flower uses, on free ports that it exports through
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and ``FLWR_LOCAL_CONTROL_API_PORT``, so that
``flwr run`` connects to it. When done, it stops the SuperLink's process group by
PID. Runs started this way do not collide with a SuperLink already on 39091.

Command line, used by ``scripts/run.sh``::

    python -m server_app.local_superlink [FLWR RUN ARGS...]

runs ``flwr run <repo> --stream [FLWR RUN ARGS...]`` against a fresh SuperLink and
exits with the status of ``flwr run``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FLWR_HOME = REPO_ROOT / ".flwr-home"
DEFAULT_SUPERNODES = 10


class LocalSuperLink:
    """A simulation SuperLink on 127.0.0.1, started and stopped by PID.

    Parameters
    ----------
    flwr_home : str or os.PathLike
        Flower home folder; the SuperLink log goes to ``local-superlink/`` inside.
    port : int or None, default None
        Runtime HTTP API port; None picks a free port.
    control_port : int or None, default None
        Control API port; None picks a free port.
    startup_timeout_s : float, default 60.0
        Seconds to wait for the SuperLink's health endpoint.
    """

    def __init__(
        self,
        flwr_home: str | os.PathLike[str],
        *,
        port: int | None = None,
        control_port: int | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.flwr_home = Path(flwr_home)
        self.port = port or _free_port()
        self.control_port = control_port or _free_port(exclude=self.port)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = self.flwr_home / "local-superlink" / f"superlink-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """Return the environment variables that point ``flwr run`` at this SuperLink."""
        return {
            "FLWR_HOME": str(self.flwr_home),
            PORT_ENV: str(self.port),
            CONTROL_PORT_ENV: str(self.control_port),
        }

    def start(self) -> None:
        """Start the SuperLink and wait until its health endpoint responds.

        When a SuperLink already responds on ``port``, it is used and left running.

        Raises
        ------
        RuntimeError
            When the SuperLink exits early or does not become healthy in time.
        """
        if _is_healthy(self.port):
            logger.info("Using the SuperLink already running on 127.0.0.1:%d", self.port)
            return

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            _flower_superlink(),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--log-file",
            str(self.log_path),
        ]
        env = {**os.environ, **self.env(), "FLWR_DISABLE_UPDATE_CHECK": "1"}
        with open(self.log_path.with_suffix(".out"), "ab") as output:
            # A new session makes the SuperLink lead its own process group, so
            # stop() reaches its helper processes through the group id.
            self.process = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        logger.info("Started SuperLink PID %d on 127.0.0.1:%d", self.process.pid, self.port)

        deadline = time.monotonic() + self.startup_timeout_s
        while not _is_healthy(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"SuperLink exited with code {self.process.returncode} during startup; "
                    f"see {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"SuperLink did not respond on 127.0.0.1:{self.port} within "
                    f"{self.startup_timeout_s:.0f} s; see {self.log_path}"
                )
            time.sleep(0.2)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the SuperLink this object started (SIGTERM, then SIGKILL) by PID."""
        process = self.process
        if process is None:
            return

        self.process = None
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "SuperLink PID %d ignored SIGTERM for %.0f s; killing it",
                    process.pid,
                    timeout_s,
                )
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()

        # Helper processes left in the SuperLink's group would keep ports open.
        _signal_group(process.pid, signal.SIGKILL)
        logger.info("Stopped SuperLink PID %d", process.pid)

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def run_flwr(args: Sequence[str], *, app_dir: str | os.PathLike[str] = REPO_ROOT) -> int:
    """Run ``flwr run <app_dir> --stream ARGS`` on a fresh local SuperLink.

    Parameters
    ----------
    args : Sequence[str]
        Extra ``flwr run`` arguments. Without ``--federation-config``, the
        federation gets ``num-supernodes=DEFAULT_SUPERNODES``.
    app_dir : str or os.PathLike, default the repository root
        The Flower app to run.

    Returns
    -------
    int
        The exit status of ``flwr run``.
    """
    args = list(args)
    if not any(arg.startswith("--federation-config") for arg in args):
        args += ["--federation-config", f"num-supernodes={DEFAULT_SUPERNODES}"]

    flwr_home = Path(os.environ.get("FLWR_HOME") or DEFAULT_FLWR_HOME)
    port = int(os.environ[PORT_ENV]) if os.environ.get(PORT_ENV) else None
    control_port = int(os.environ[CONTROL_PORT_ENV]) if os.environ.get(CONTROL_PORT_ENV) else None
    with LocalSuperLink(flwr_home, port=port, control_port=control_port) as superlink:
        env = {**os.environ, **superlink.env()}
        earlier_runs = set(_run_statuses(env))
        status = subprocess.call(
            [_flwr(), "run", str(app_dir), "--stream", *args], env=env, cwd=app_dir
        )
        if status != 0:
            return status

        # `flwr run --stream` exits with 0 even when the ServerApp raised, so the
        # run's final status comes from the SuperLink.
        return _check_new_runs(env, earlier_runs)


def _check_new_runs(env: dict[str, str], earlier_runs: set[str], wait_s: float = 30.0) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        runs = {
            run_id: run for run_id, run in _run_statuses(env).items() if run_id not in earlier_runs
        }
        finished = all(run["status"].startswith("finished") for run in runs.values())
        if (runs and finished) or time.monotonic() > deadline:
            break
        time.sleep(1.0)

    if not runs:
        logger.error("flwr run returned, but the SuperLink lists no new run")
        return 1

    failed = {run_id: run for run_id, run in runs.items() if run["status"] != "finished:completed"}
    for run_id, run in failed.items():
        logger.error(
            "Run %s ended with status %s: %s", run_id, run["status"], run.get("status-details", "")
        )
    return 1 if failed else 0


def _run_statuses(env: dict[str, str]) -> dict[str, dict[str, str]]:
    listing = subprocess.run(
        [_flwr(), "ls", "--format", "json"], env=env, capture_output=True, text=True, check=False
    )
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        logger.warning(
            "Could not read the run list from `flwr ls`: %s",
            listing.stderr.strip() or listing.stdout.strip(),
        )
        return {}
    return {str(run["run-id"]): run for run in runs}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m server_app.local_superlink``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the SuperLink is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run_flwr(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        logger.warning("Interrupted; the SuperLink was stopped")
        return 130


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _is_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _free_port(exclude: int | None = None) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port != exclude:
            return port


def _flower_superlink() -> str:
    return _executable("flower-superlink")


def _flwr() -> str:
    return _executable("flwr")


def _executable(name: str) -> str:
    # Prefer the script next to this interpreter, so the venv's Flower is used
    # even when the venv is not activated.
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"{name} not found next to {sys.executable} or on PATH; install the project first"
        )
    return found


if __name__ == "__main__":
    sys.exit(main())
