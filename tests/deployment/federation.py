"""A Flower 1.42 deployment on 127.0.0.1: a SuperLink and SuperNodes as real processes.

Every process starts in its own session, so it leads a process group. A SuperNode's
group also contains the SuperExec it spawns and the ClientApp processes that SuperExec
starts, so :meth:`ManagedProcess.kill` ends a node's training at once, the way a device
that loses power stops. Helpers that leave the group (the SuperLink starts its own
SuperExec in a new session, and that SuperExec starts the ServerApp) are found through
their ``/proc`` parent links and stopped by PID as well. Nothing is ever stopped by
process name.

In Flower 1.42 the SuperLink serves its Fleet, Control and Runtime APIs over HTTP on
one port (``--host``, ``--port``). Each SuperNode serves a Runtime API for its
ClientApp processes on its own port. The ``flwr`` CLI finds the SuperLink through a
named connection in ``$FLWR_HOME/config.toml``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECTION = "local-deployment"

# No telemetry, no update check, and no `uv sync` of the app's dependencies per run,
# which would pull a CUDA torch. Every process of the federation inherits these.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

# One intra-op thread per process (the ClientApp also sets this itself). Three nodes
# on a shared two-core machine otherwise oversubscribe the cores: one LSTM step took
# 0.36 s with two threads and 9 ms with one while other jobs loaded the machine.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

STARTED_RUN = re.compile(r"Successfully started run (\d+)")


class DeploymentError(RuntimeError):
    """A process of the local deployment failed to start, exited, or timed out."""


class ManagedProcess:
    """A process started in its own session, with its output in a log file.

    Parameters
    ----------
    name : str
        Short name for messages, for example ``"supernode-0"``.
    command : Sequence[str]
        The command line.
    env : Mapping[str, str]
        The process environment.
    log_path : Path
        File that receives stdout and stderr; appended to.
    cwd : Path or None, default None
        Working directory.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self._descendants: set[tuple[int, int]] = set()

        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.command,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        logger.info("Started %s as PID %d: %s", name, self.pid, " ".join(self.command))

    def running(self) -> bool:
        """Return True while the process has not exited."""
        return self.popen.poll() is None

    def kill(self, timeout_s: float = 10.0) -> None:
        """Send SIGKILL to the process group and wait until the leader is gone.

        Raises
        ------
        DeploymentError
            If the leader is still there after ``timeout_s`` seconds.
        """
        _signal_group(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"{self.name} (PID {self.pid}) survived SIGKILL for {timeout_s:.0f} s") from None
        logger.info("Killed %s (PID %d) and its process group with SIGKILL", self.name, self.pid)

    def terminate(self) -> None:
        """Send SIGTERM to the group and to every descendant that left it.

        The descendants are recorded with their start times first, so that
        :meth:`wait_or_kill` never signals a PID that the system reused meanwhile.
        """
        self._descendants |= descendant_processes(self.pid)
        _signal_group(self.pid, signal.SIGTERM)
        for pid, start_time in self._descendants:
            _signal_process(pid, start_time, signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        """Wait for the leader until ``deadline`` (``time.monotonic()``), then SIGKILL what is left."""
        try:
            self.popen.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            logger.warning("%s (PID %d) ignored SIGTERM; sending SIGKILL", self.name, self.pid)

        _signal_group(self.pid, signal.SIGKILL)
        for pid, start_time in self._descendants:
            _signal_process(pid, start_time, signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the process and its helpers: SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
        self.terminate()
        self.wait_or_kill(time.monotonic() + timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the process log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 with their own FLWR_HOME.

    Parameters
    ----------
    workdir : Path
        Folder for ``flwr-home/``, ``logs/`` and run config files.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.flwr_home = self.workdir / "flwr-home"
        self.log_dir = self.workdir / "logs"
        self.superlink_port = free_port()
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[int, ManagedProcess] = {}
        self.processes: list[ManagedProcess] = []
        self.run_streams: dict[int, ManagedProcess] = {}
        self._starts = 0

        # The SuperNode starts `flower-superexec` by name, so the venv's scripts
        # must come first on PATH even when the venv is not activated.
        scripts = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            **FLWR_ENV,
            **THREAD_ENV,
            "FLWR_HOME": str(self.flwr_home),
            "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
        }

    @property
    def superlink_address(self) -> str:
        """``host:port`` of the SuperLink's Fleet, Control and Runtime APIs."""
        return f"{HOST}:{self.superlink_port}"

    def start_superlink(self, timeout_s: float = 60.0) -> ManagedProcess:
        """Start ``flower-superlink --insecure`` and point the ``flwr`` CLI at it."""
        command = [
            executable("flower-superlink"),
            "--insecure",
            "--host",
            HOST,
            "--port",
            str(self.superlink_port),
            "--disable-runtime-dependency-installation",
        ]
        self.superlink = self._start("superlink", command)
        _wait_healthy(self.superlink, self.superlink_port, timeout_s)
        self.write_connection()
        return self.superlink

    def write_connection(self) -> Path:
        """Write ``$FLWR_HOME/config.toml`` with a default, insecure connection to the SuperLink."""
        config = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": self.superlink_address, "insecure": True},
            }
        }
        path = self.flwr_home / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(config), encoding="utf-8")
        return path

    def start_supernode(self, partition_id: int, num_partitions: int, timeout_s: float = 60.0) -> ManagedProcess:
        """Start ``flower-supernode --insecure`` with the node config of one partition.

        A SuperNode that replaces a killed one gets the same node config and a new
        Runtime API port, and the SuperLink gives it a new node id.
        """
        runtime_port = free_port(exclude={self.superlink_port})
        command = [
            executable("flower-supernode"),
            "--insecure",
            "--superlink",
            self.superlink_address,
            "--host",
            HOST,
            "--port",
            str(runtime_port),
            "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions}",
        ]
        node = self._start(f"supernode-{partition_id}", command)
        self.supernodes[partition_id] = node
        _wait_healthy(node, runtime_port, timeout_s)
        return node

    def flwr(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against this federation and return its output.

        Raises
        ------
        DeploymentError
            If the command fails or takes longer than ``timeout_s`` seconds.
        """
        command = [executable("flwr"), *args]
        try:
            result = subprocess.run(
                command, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`{' '.join(command)}` timed out after {timeout_s:.0f} s") from None
        if result.returncode != 0:
            raise DeploymentError(
                f"`{' '.join(command)}` failed with exit code {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def node_statuses(self) -> dict[int, str]:
        """Return the status (``online``, ``offline``, ...) of every node the SuperLink has registered."""
        listing = _parse_json(self.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)
        return {int(node["node-id"]): str(node["status"]) for node in listing["nodes"]}

    def wait_for_online_nodes(self, count: int, timeout_s: float = 60.0) -> set[int]:
        """Wait until at least ``count`` nodes are online and return their node ids."""
        deadline = time.monotonic() + timeout_s
        while True:
            online = {node for node, status in self.node_statuses().items() if status == "online"}
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"only {len(online)} of {count} SuperNodes came online within {timeout_s:.0f} s"
                )
            time.sleep(0.5)

    def submit(self, app_dir: Path, run_config: Mapping[str, Any], timeout_s: float = 120.0) -> int:
        """Start ``flwr run APP_DIR --stream`` with ``run_config`` overrides and return the run id.

        The overrides go through a TOML file, so paths and strings need no shell
        quoting. The streaming ``flwr run`` process keeps the ServerApp's log in
        ``logs/flwr-run-*.log`` and is stopped with the federation.
        """
        self._starts += 1
        config_path = self.workdir / f"run-config-{self._starts}.toml"
        config_path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")

        command = [executable("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(config_path)]
        run = self._start(f"flwr-run-{self._starts}", command, cwd=app_dir)
        deadline = time.monotonic() + timeout_s
        while True:
            match = STARTED_RUN.search(run.log_tail(400))
            if match is not None:
                run_id = int(match.group(1))
                self.run_streams[run_id] = run
                return run_id
            if not run.running():
                raise DeploymentError(f"flwr run exited with code {run.popen.returncode}:\n{run.log_tail()}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"flwr run did not start a run within {timeout_s:.0f} s:\n{run.log_tail()}")
            time.sleep(0.5)

    def run_status(self, run_id: int) -> str:
        """Return the status of a run, for example ``running`` or ``finished:completed``."""
        listing = _parse_json(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout)
        return str(listing["runs"][0]["status"])

    def wait_for_run(self, run_id: int, timeout_s: float) -> str:
        """Wait until the run has finished and return its final status.

        The streaming ``flwr run`` exits when the run ends, so waiting on that process
        spares a ``flwr ls`` call, which starts a new Python process, every second.

        Raises
        ------
        DeploymentError
            If the run is still going after ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        stream = self.run_streams[run_id]
        while stream.running() and time.monotonic() < deadline:
            time.sleep(0.5)

        while True:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} is still {status!r} after {timeout_s:.0f} s")
            time.sleep(1.0)

    def logs(self, lines: int = 60) -> str:
        """Return the tails of every process log, for a failure message."""
        parts = []
        for process in self.processes:
            parts.append(f"--- {process.name} (PID {process.pid}) {process.log_path}\n{process.log_tail(lines)}")
        return "\n".join(parts)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process this federation started, by PID: SIGTERM, then SIGKILL.

        SuperNodes go first, while the SuperLink can still take their goodbye. The
        SuperLink goes last.
        """
        clients = [process for process in self.processes if process is not self.superlink]
        waves = [clients, [self.superlink] if self.superlink else []]
        for wave in waves:
            for process in wave:
                process.terminate()
            deadline = time.monotonic() + timeout_s
            for process in wave:
                process.wait_or_kill(deadline)

    def _start(self, name: str, command: Sequence[str], cwd: Path | None = None) -> ManagedProcess:
        # A restarted node appends to its predecessor's log, so the log shows both lives.
        process = ManagedProcess(name, command, env=self.env, log_path=self.log_dir / f"{name}.log", cwd=cwd)
        self.processes.append(process)
        return process


def descendant_processes(root_pid: int) -> set[tuple[int, int]]:
    """Return ``(pid, start time)`` of every descendant of ``root_pid``, read from ``/proc``.

    The start time is in clock ticks since boot. It distinguishes a process from a
    later one that reuses its PID. Without ``/proc`` the set is empty.
    """
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)

    found: set[tuple[int, int]] = set()
    pending = list(children.get(root_pid, []))
    while pending:
        pid = pending.pop()
        found.add((pid, table[pid][1]))
        pending.extend(children.get(pid, []))
    return found


def command_line(pid: int) -> str:
    """Return the command line of a process from ``/proc``, or "" when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", errors="replace").strip()


def _process_table() -> dict[int, tuple[int, int]]:
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:
        return table

    for entry in entries:
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is not None:
            table[int(entry)] = stat
    return table


def _read_stat(pid: int) -> tuple[int, int] | None:
    """Return ``(parent pid, start time)`` from ``/proc/PID/stat``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None

    # The command name sits in parentheses and may contain spaces, so the fields are
    # counted from the last ")". Field 4 is the parent PID, field 22 the start time.
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _signal_process(pid: int, start_time: int, signum: signal.Signals) -> None:
    stat = _read_stat(pid)
    if stat is None or stat[1] != start_time:
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_healthy(process: ManagedProcess, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _is_healthy(port):
        if not process.running():
            raise DeploymentError(
                f"{process.name} exited with code {process.popen.returncode} during startup:\n{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"{process.name} did not respond on {HOST}:{port}/health within {timeout_s:.0f} s:\n{process.log_tail()}"
            )
        time.sleep(0.2)


def _is_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1.0) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _parse_json(text: str) -> dict[str, Any]:
    # `flwr ... --format json` may print notes before the JSON document.
    start = text.find("{")
    if start < 0:
        raise DeploymentError(f"expected JSON from the flwr CLI, got: {text!r}")
    return json.loads(text[start:])


def free_port(exclude: set[int] | None = None) -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if port not in (exclude or set()):
            return port


def executable(name: str) -> str:
    """Return the path of a Flower script next to this interpreter, or raise DeploymentError."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeploymentError(f"{name} was not found next to {sys.executable}. Install flwr into this environment.")
    return str(path)
