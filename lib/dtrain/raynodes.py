"""The mechanics under :mod:`dtrain.cluster`: where a node's files go, the ``ray start``
command line and environment of each node, and finding and killing exactly the
processes of one cluster.

Why it looks the way it does:
* Ray 2.60 token auth: every node and client runs with ``RAY_AUTH_MODE=token`` and
  ``RAY_AUTH_TOKEN_PATH`` pointing at a token we generate in the state folder, so
  nothing depends on (or overwrites) ``~/.ray/auth_token``.
* Everything binds 127.0.0.1 and every port is picked free at start-up: several
  engineers/tests may run clusters side by side in other ``DTRAIN_HOME`` folders.
* ``ray stop`` kills every Ray process on the machine, so we never call it: each
  ``ray start`` runs in its own session (``setsid``) and only the processes of the
  recorded sessions are killed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psutil

from dtrain.config import state_dir
from dtrain.errors import ClusterError

RAY_BIN = Path(sys.executable).with_name("ray")
LOCALHOST = "127.0.0.1"
RAY_START_TIMEOUT_S = 90
START_ATTEMPTS = 3
# Unix sockets live under <temp>/session_<date>_<pid>/sockets/ and a socket path may
# not exceed 107 bytes, so a long state folder (pytest tmp dirs) gets a short /tmp one.
MAX_TEMP_DIR_LEN = 40
# Per-node ports; the head also gets gcs / dashboard / client-server ports.
NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port",
                   "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
HEAD_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port")
# Two head processes open Prometheus ports that have no flag, only these variables, and
# default to fixed numbers (44217, 44227): a second cluster on the host would collide.
HEAD_PORT_ENV = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
# Raylets spend ~10 s draining on SIGTERM while the GCS is going away, and the GCS
# ignores SIGTERM; nothing of ours needs a graceful exit, so SIGKILL follows soon.
STOP_GRACE_S = 3
# Ray turns 127.0.0.1 into the host's routable IP ("make sure localhost isn't resolved
# to the loopback ip") and then binds its gRPC servers on all interfaces. Ray's own
# single-host switch (the one it uses on macOS/Windows) keeps the node IP on loopback,
# so GCS, raylets, workers and drivers all bind and dial 127.0.0.1 only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# ... but with that switch `ray start --address` refuses to add a worker node, so worker
# nodes run `ray start` through this shim: it lifts the refusal in that one process and
# keeps --node-ip-address=127.0.0.1 as given.
_WORKER_RAY_START = (
    "import sys; import ray._private.ray_constants as c; import ray._private.services as s; "
    "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")


# --- paths and secrets -------------------------------------------------------------------
def ray_dir() -> Path:
    """Folder with the cluster state file, the auth token and the ``ray start`` logs."""
    path = state_dir() / "ray"
    path.mkdir(parents=True, exist_ok=True)
    return path


def token_path() -> Path:
    """The file holding the cluster's auth token (mode 600)."""
    return ray_dir() / "auth_token"


def ensure_token() -> str:
    """Create the token file once (256 random bits, like Ray's own generator) and read it."""
    path = token_path()
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


def ray_temp_dir() -> Path:
    """Ray's ``--temp-dir`` (session folders, logs, sockets), shared by all our nodes."""
    local = ray_dir() / "tmp"
    if len(str(local)) <= MAX_TEMP_DIR_LEN:
        return local
    digest = hashlib.sha256(str(state_dir()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"dtrain-ray-{digest}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (all held open together so none repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOCALHOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


# --- starting nodes ------------------------------------------------------------------------
def node_env() -> dict[str, str]:
    """Environment of every ``ray start``: token auth from our file, no usage stats."""
    env = dict(os.environ)
    # A stray RAY_ADDRESS would make `ray start --head` think a cluster exists; a
    # RAY_AUTH_TOKEN would win over our token file.
    # A raylet aborts when its dashboard agent has not written its port file within
    # 15 s (fixed in Ray 2.60). Compiling Ray's modules on every start costs the agent
    # ~40% of its import time, so let Python keep the bytecode it compiles.
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "PYTHONDONTWRITEBYTECODE"):
        env.pop(key, None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path()),
               RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", **LOOPBACK_ENV)
    # Job entrypoints say `python …`, as on the KubeRay image: make that this interpreter.
    env["PATH"] = os.pathsep.join([str(RAY_BIN.parent), env.get("PATH", "")])
    return env


def node_command(name: str, ports: dict[str, int], cpus: int, object_store_mb: int,
                  temp_dir: Path, gcs_address: str | None) -> list[str]:
    """The ``ray start`` command line of one node (head when ``gcs_address`` is None)."""
    launcher = [str(RAY_BIN)] if gcs_address is None else [sys.executable, "-c", _WORKER_RAY_START]
    cmd = [*launcher, "start", f"--node-ip-address={LOCALHOST}", f"--node-name={name}",
           f"--num-cpus={cpus}", f"--object-store-memory={object_store_mb * 1024 * 1024}",
           f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0"]
    cmd += [f"--{flag}={port}" for flag, port in ports.items()]
    if gcs_address is None:
        cmd += ["--head", f"--dashboard-host={LOCALHOST}", "--include-dashboard=true",
                "--disable-usage-stats"]
    else:
        # All nodes share one session folder; one log monitor (the head's) is enough,
        # more would print every worker line several times.
        cmd += [f"--address={gcs_address}", "--include-log-monitor=false"]
    return cmd


def log_tail(path: Path, lines: int = 1) -> str:
    try:
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def start_node(name: str, cmd: list[str], extra_env: dict[str, str], attempts: int = START_ATTEMPTS) -> dict:
    """Run one ``ray start`` in a new session and wait for it to return; retry a failed
    start after killing what it left (the agent's 15 s window is missed on busy CPUs)."""
    for attempt in range(1, attempts + 1):
        try:
            return start_node_once(name, cmd, extra_env)
        except StartFailed as exc:
            if attempt == attempts:
                raise
            kill_processes({"nodes": [exc.node]})


def start_node_once(name: str, cmd: list[str], extra_env: dict[str, str]) -> dict:
    log_path = ray_dir() / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**node_env(), **extra_env}, start_new_session=True)
        try:
            code = proc.wait(timeout=RAY_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
    node = {"name": name, "session_id": proc.pid, "log": str(log_path)}
    if code != 0:
        # The usual cause on a small machine is CPU starvation (the raylet gives its
        # dashboard agent 15 s to start), so say how busy the machine was.
        load = os.getloadavg()[0]
        raise StartFailed(node, f"'ray start' for {name} failed ({code}, load average {load:.1f} on "
                                f"{os.cpu_count()} CPUs); see {log_path}: {log_tail(log_path)}")
    return node


class StartFailed(ClusterError):
    """A node did not start; carries the node record so its processes can be killed."""

    def __init__(self, node: dict, message: str):
        super().__init__(message)
        self.node = node


def pss(proc: psutil.Process) -> int:
    """Proportional set size: RSS would count the shared Ray libraries once per process
    (about 2.7 GB for an idle cluster instead of the ~1.3 GB really in use)."""
    try:
        return proc.memory_full_info().pss
    except (psutil.Error, AttributeError):
        return 0


# --- stopping ------------------------------------------------------------------------------
def our_processes(state: dict) -> list[psutil.Process]:
    """Live processes of this cluster: members of the recorded ``ray start`` sessions whose
    command line is Ray's (a session id alone could be a reused pid), plus their children."""
    sessions = {node["session_id"] for node in state.get("nodes", [])}
    temp_dir = state.get("temp_dir", "\0")
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        if proc.pid == os.getpid():
            continue
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            in_session = os.getsid(proc.pid) in sessions
        except (OSError, psutil.Error):
            continue
        looks_like_ray = "ray" in cmdline or "ray" in (proc.info["name"] or "")
        if temp_dir in cmdline or (in_session and looks_like_ray):
            found[proc.pid] = proc
            try:
                found.update({child.pid: child for child in proc.children(recursive=True)})
            except psutil.Error:
                pass
    return list(found.values())


def kill_processes(state: dict, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM our processes, SIGKILL what is left after ``grace_s``; return how many."""
    procs = our_processes(state)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    # Workers spawned while we were killing (a raylet restarting one) are caught here.
    late = our_processes(state)
    for proc in late:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs) + len(late)
