"""The embedded S3 server: a real MinIO process on 127.0.0.1, owned by this project.

Why embedded: the lab must run on a laptop without Docker or a cluster, yet speak the
real S3 protocol (signatures, multipart, path-style URLs) that the cluster will use.
``make setup`` builds MinIO from source (its documented ``go install`` route) into
``tools/bin``; this module starts it with credentials generated for this install (never
MinIO's defaults), waits for its health endpoint and records pid, port and keys in the
git-ignored ``.dtrain/s3.json``. Where no MinIO binary can be had, moto's S3 server is a
loud fallback so the lab still runs; tests and CI use MinIO.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dtrain import config
from dtrain.errors import ServerError

HEALTH_PATH = "/minio/health/live"
START_TIMEOUT_S = 30.0


def binary_path() -> Path:
    return config.tools_dir() / "bin" / "minio"


def _state_file() -> Path:
    return config.state_dir() / "s3.json"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _credentials() -> dict:
    """Keys generated once per install and kept (mode 600) with the server's data."""
    path = config.state_dir() / "s3-credentials.json"
    creds = config.read_json(path)
    if not creds:
        creds = {"access_key": "dtrain-" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(30)}
        config.write_json_atomic(path, creds)
    return creds


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) still answers kill(0): look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else None


def probe(endpoint_url: str, backend: str = "minio", ca_bundle: str | None = None,
          timeout: float = 2.0) -> dict:
    """GET the health endpoint. Returns {"healthy": bool, "server": Server header, "error": …}."""
    path = HEALTH_PATH if backend == "minio" else "/"
    try:
        with urllib.request.urlopen(endpoint_url + path, timeout=timeout,
                                    context=_ssl_context(ca_bundle)) as resp:
            return {"healthy": resp.status == 200, "server": resp.headers.get("Server", "")}
    except urllib.error.HTTPError as exc:
        return {"healthy": False, "server": exc.headers.get("Server", ""), "error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError) as exc:
        return {"healthy": False, "server": "", "error": str(getattr(exc, "reason", exc))}


def _choose_backend(backend: str) -> str:
    if backend not in ("auto", "minio", "moto"):
        raise ServerError(f"unknown S3 backend {backend!r}: choose auto, minio or moto")
    if backend != "auto":
        if backend == "minio" and not binary_path().exists():
            raise ServerError(f"MinIO binary not found at {binary_path()}: run 'make setup'")
        return backend
    if binary_path().exists():
        return "minio"
    print(f"WARNING: no MinIO binary at {binary_path()} (run 'make setup' with Go installed).\n"
          "WARNING: falling back to moto's S3 server: fine for a demo, NOT the real MinIO.",
          file=sys.stderr)
    return "moto"


def _command(backend: str, port: int, data_dir: Path, certs_dir: Path | None) -> list[str]:
    if backend == "minio":
        cmd = [str(binary_path()), "server", str(data_dir), "--address", f"127.0.0.1:{port}",
               "--console-address", f"127.0.0.1:{free_port()}", "--quiet"]
        return cmd + (["--certs-dir", str(certs_dir)] if certs_dir else [])
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    if certs_dir:
        cmd += ["--ssl-cert", str(certs_dir / "public.crt"), "--ssl-key", str(certs_dir / "private.key")]
    return cmd


def status() -> dict:
    """What is recorded about the server, plus whether it is alive and healthy now."""
    state = config.read_json(_state_file())
    if not state:
        return {"running": False, "state_file": str(_state_file())}
    alive = _pid_alive(state.get("pid"))
    health = probe(state["endpoint_url"], state["backend"], state.get("ca_bundle")) if alive else {}
    public = {k: v for k, v in state.items() if k != "secret_key"}
    return {**public, "running": alive, "healthy": health.get("healthy", False),
            "server_header": health.get("server", ""), "state_file": str(_state_file())}


def up(port: int = 0, tls: bool = False, backend: str = "auto") -> dict:
    """Start the server unless it already runs; return its state (without waiting twice)."""
    if port and not 0 < port < 65536:
        raise ServerError(f"port {port} is out of range 1-65535")
    current = config.read_json(_state_file())
    if current and _pid_alive(current.get("pid")):
        if bool(current.get("ca_bundle")) != tls:
            mode = "with" if current.get("ca_bundle") else "without"
            raise ServerError(f"the S3 server already runs {mode} TLS: run 'dtrain s3 down' first")
        if probe(current["endpoint_url"], current["backend"], current.get("ca_bundle"))["healthy"]:
            return current
        down()
    chosen = _choose_backend(backend)
    port = port or free_port()
    data_dir = config.state_dir() / "minio-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    certs_dir = ca_bundle = None
    if tls:
        from dtrain import tlscerts

        certs_dir = config.state_dir() / "s3-certs"
        ca_bundle = str(tlscerts.ensure_server_certs(certs_dir))
    creds = _credentials()
    env = {**os.environ, "MINIO_ROOT_USER": creds["access_key"], "MINIO_ROOT_PASSWORD": creds["secret_key"],
           "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_CI_CD": "1"}
    log_path = config.state_dir() / "s3.log"
    with open(log_path, "ab") as log:
        # A session of its own: the server outlives the notebook kernel that started it.
        proc = subprocess.Popen(_command(chosen, port, data_dir, certs_dir), env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    scheme = "https" if tls else "http"
    state = {"backend": chosen, "pid": proc.pid, "port": port, "host": "127.0.0.1",
             "endpoint_url": f"{scheme}://127.0.0.1:{port}", "region": config.DEFAULT_REGION,
             "access_key": creds["access_key"], "secret_key": creds["secret_key"], "ca_bundle": ca_bundle,
             "data_dir": str(data_dir), "log": str(log_path), "started_at": time.time()}
    _wait_healthy(state, proc)
    config.write_json_atomic(_state_file(), state)
    return state


def _wait_healthy(state: dict, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(state["log"]).read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
            raise ServerError(f"S3 server exited with code {proc.returncode}: {tail[0]} (log: {state['log']})")
        if probe(state["endpoint_url"], state["backend"], state.get("ca_bundle"), timeout=1.0)["healthy"]:
            return
        time.sleep(0.2)
    _terminate(proc.pid)
    raise ServerError(f"S3 server not healthy after {START_TIMEOUT_S:.0f}s (log: {state['log']})")


def _terminate(pid: int, grace_s: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if _pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)


def down() -> str:
    """Stop the server. Its data and credentials stay, so the next ``up`` finds the buckets."""
    state = config.read_json(_state_file())
    if not state:
        return "S3 server is not running"
    _terminate(state["pid"])
    _state_file().unlink(missing_ok=True)
    return f"S3 server (pid {state['pid']}) stopped; data kept in {state['data_dir']}"


def env_exports() -> str:
    """``export`` lines for the running server: ``eval "$(dtrain s3 env)"``."""
    settings = config.s3_settings(environ={})  # the running server's, not an inherited env
    return "\n".join(f"export {key}={value}" for key, value in settings.as_env().items())


def wipe() -> None:
    """Remove the server's data folder (the server must be down). Used by tests and 'make clean'."""
    if status()["running"]:
        raise ServerError("stop the S3 server before wiping its data")
    shutil.rmtree(config.state_dir() / "minio-data", ignore_errors=True)
