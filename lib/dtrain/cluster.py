"""A local multi-node Ray cluster that mirrors the KubeRay topology on one machine.

One head node with ``num-cpus 0`` (like a KubeRay head that runs no training) plus N
worker nodes, each a real ``ray start`` raylet, so the cluster outlives notebook
kernels and is reached the way a KubeRay cluster is: GCS address for ``ray.init``,
dashboard URL (with a bearer token) for the Jobs API. Token auth, loopback-only
binding and process scoping are explained in :mod:`dtrain.raynodes`.

State: ``.dtrain/ray/cluster.json`` (addresses, node sessions and ports), the token in
``.dtrain/ray/auth_token`` (mode 600), each ``ray start`` log in ``.dtrain/ray/logs/``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from dtrain import raynodes
from dtrain.config import read_json, write_json_atomic
from dtrain.errors import ClusterError
from dtrain.raynodes import HEAD_PORT_ENV, HEAD_PORT_FLAGS, LOCALHOST, LOOPBACK_ENV, NODE_PORT_FLAGS

HEAD_NAME = "head"
DEFAULT_WORKERS = 2
DEFAULT_CPUS_PER_NODE = 4
DEFAULT_OBJECT_STORE_MB = 400
NODES_ALIVE_TIMEOUT_S = 120
HTTP_TIMEOUT_S = 5


def _state_path() -> Path:
    return raynodes.ray_dir() / "cluster.json"


def up(workers: int = DEFAULT_WORKERS, cpus_per_node: int = DEFAULT_CPUS_PER_NODE,
       object_store_mb: int = DEFAULT_OBJECT_STORE_MB) -> dict:
    """Start head + ``workers`` worker nodes and wait until all are alive; return status().

    Idempotent: a healthy cluster already recorded here is reported, not restarted
    (even when asked for another shape: run ``down`` first to change it).
    """
    if workers < 1 or cpus_per_node < 1:
        raise ClusterError(f"need at least 1 worker node and 1 CPU per node, got {workers} and {cpus_per_node}")
    if object_store_mb < 80:
        raise ClusterError(f"object store must be at least 80 MB per node, got {object_store_mb}")
    if not raynodes.RAY_BIN.exists():
        raise ClusterError(f"{raynodes.RAY_BIN} not found: install ray[default] in this environment")
    if read_json(_state_path()):
        current = status()
        if current["healthy"]:
            return current
        down()  # a stale or half-dead cluster: clear what is left of it
    raynodes.ensure_token()
    temp_dir = raynodes.ray_temp_dir()
    ports = iter(raynodes.free_ports(len(HEAD_PORT_FLAGS + HEAD_PORT_ENV) + (workers + 1) * len(NODE_PORT_FLAGS)))
    head_ports = {flag: next(ports) for flag in HEAD_PORT_FLAGS + NODE_PORT_FLAGS}
    head_env = {name: str(next(ports)) for name in HEAD_PORT_ENV}
    address = f"{LOCALHOST}:{head_ports['port']}"
    state = {"address": address, "dashboard_url": f"http://{LOCALHOST}:{head_ports['dashboard-port']}",
             "token_path": str(raynodes.token_path()), "temp_dir": str(temp_dir), "workers": workers,
             "cpus_per_node": cpus_per_node, "object_store_mb": object_store_mb,
             "started_at": time.time(), "nodes": []}
    started = time.monotonic()
    try:
        plan = [(HEAD_NAME, head_ports, 0, None, head_env)]
        plan += [(f"worker-{i}", {flag: next(ports) for flag in NODE_PORT_FLAGS}, cpus_per_node, address, {})
                 for i in range(1, workers + 1)]
        for name, node_ports, cpus, gcs, extra_env in plan:
            cmd = raynodes.node_command(name, node_ports, cpus, object_store_mb, temp_dir, gcs)
            node = raynodes.start_node(name, cmd, extra_env)
            state["nodes"].append({**node, "ports": {**node_ports, **extra_env}, "cpus": cpus})
            # Record after every node so a crash half-way still lets down() clean up.
            write_json_atomic(_state_path(), state)
        _wait_for_nodes(state, workers + 1)
    except BaseException as exc:  # Ctrl-C included: leave no half-started cluster behind
        if isinstance(exc, raynodes.StartFailed):
            state["nodes"].append(exc.node)
        raynodes.kill_processes(state)
        _state_path().unlink(missing_ok=True)
        raise
    state["up_seconds"] = round(time.monotonic() - started, 1)
    write_json_atomic(_state_path(), state)
    return status()


def _wait_for_nodes(state: dict, expected: int) -> None:
    """Poll the dashboard until ``expected`` nodes are ALIVE and the scheduler's view
    (which lags a few seconds) counts all their CPUs, or fail with a log pointer."""
    deadline = time.monotonic() + NODES_ALIVE_TIMEOUT_S
    cpus = state["workers"] * state["cpus_per_node"]
    problem = "dashboard not answering"
    while time.monotonic() < deadline:
        try:
            alive = sum(node["state"] == "ALIVE" for node in _list_nodes(state["dashboard_url"]))
            free_cpus = _available_resources(state["dashboard_url"]).get("CPU", 0)
            if alive >= expected and free_cpus >= cpus:
                return
            problem = f"{alive}/{expected} nodes alive, {free_cpus:g}/{cpus} CPUs seen"
        except ClusterError as exc:
            problem = str(exc)
        time.sleep(1)
    logs = Path(state["temp_dir"]) / "session_latest" / "logs"
    raise ClusterError(f"cluster not ready after {NODES_ALIVE_TIMEOUT_S} s ({problem}); see {logs}")


# --- talking to the dashboard --------------------------------------------------------------
def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get_json(url: str, token: str | None = None) -> dict:
    """GET a dashboard endpoint with our bearer token; ClusterError on any failure."""
    request = urllib.request.Request(url, headers=_auth_headers(token))
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = " ".join(exc.read()[:200].decode(errors="replace").split())
        raise ClusterError(f"{url} answered HTTP {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ClusterError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def _local_token() -> str | None:
    try:
        return raynodes.token_path().read_text().strip()
    except FileNotFoundError:
        return None


def _list_nodes(dashboard_url: str) -> list[dict]:
    """Node records from the state API (ALIVE and DEAD)."""
    reply = _get_json(f"{dashboard_url}/api/v0/nodes?limit=1000&detail=true", _local_token())
    return reply["data"]["result"]["result"]


def _available_resources(dashboard_url: str) -> dict:
    """Cluster-wide available resources, from the autoscaler's cluster status."""
    reply = _get_json(f"{dashboard_url}/api/cluster_status?format=0", _local_token())
    try:
        usage = reply["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
        return {name: total - used for name, (used, total) in usage.items()}
    except (KeyError, TypeError, ValueError):
        raise ClusterError(f"{dashboard_url} has no cluster status yet") from None


def status() -> dict:
    """Where the local cluster stands: nodes (alive, CPUs, memory), resources, URLs and the
    memory its processes use (PSS, MB)."""
    state = read_json(_state_path())
    if not state:
        return {"running": False, "healthy": False, "nodes": []}
    info = {key: state[key] for key in ("address", "dashboard_url", "token_path", "temp_dir", "started_at",
                                        "workers", "cpus_per_node")}
    info.update(running=True, healthy=False, auth_mode="token", nodes=[], up_seconds=state.get("up_seconds"))
    procs = raynodes.our_processes(state)
    info["processes"] = len(procs)
    info["memory_mb"] = round(sum(raynodes.pss(p) for p in procs) / 2**20)
    try:
        nodes = _list_nodes(state["dashboard_url"])
        available = _available_resources(state["dashboard_url"])
    except (ClusterError, KeyError, TypeError) as exc:
        info["problem"] = str(exc)
        return info
    total: dict[str, float] = {}
    for node in nodes:
        resources = node.get("resources_total") or {}
        info["nodes"].append({"name": node.get("node_name"), "alive": node["state"] == "ALIVE",
                              "head": node.get("is_head_node", False), "cpus": resources.get("CPU", 0),
                              "memory_gb": round(resources.get("memory", 0) / 1e9, 2),
                              "object_store_gb": round(resources.get("object_store_memory", 0) / 1e9, 2)})
        if node["state"] == "ALIVE":
            for name, amount in resources.items():
                if "node:" not in name:
                    total[name] = total.get(name, 0) + amount
    info["resources"] = {"total": total, "available": {k: v for k, v in available.items() if "node:" not in k}}
    info["alive_nodes"] = sum(node["alive"] for node in info["nodes"])
    info["healthy"] = info["alive_nodes"] == state["workers"] + 1
    return info


def down() -> str:
    """Stop every process this cluster started and remove its state, token and temp files."""
    state = read_json(_state_path())
    if not state:
        return "no local Ray cluster recorded; nothing to stop"
    started = time.monotonic()
    killed = raynodes.kill_processes(state)
    _state_path().unlink(missing_ok=True)
    raynodes.token_path().unlink(missing_ok=True)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    return f"stopped {killed} Ray processes in {time.monotonic() - started:.1f} s"


# --- clients -------------------------------------------------------------------------------
def _require_state() -> dict:
    state = read_json(_state_path())
    if not state:
        raise ClusterError("no local Ray cluster: run 'dtrain cluster up' (or set RAY_API_SERVER_ADDRESS)")
    return state


def client_env() -> dict[str, str]:
    """Environment a client or driver needs: token auth, GCS address, Jobs API address."""
    state = _require_state()
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"], **LOOPBACK_ENV,
            "RAY_ADDRESS": state["address"], "RAY_API_SERVER_ADDRESS": state["dashboard_url"]}


def env_exports() -> str:
    """``export`` lines for a shell: ``eval "$(dtrain cluster env)"``."""
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in client_env().items())


def connect(**init_kwargs):
    """``ray.init`` on the local cluster, with the token-auth environment set first."""
    env = client_env()
    os.environ.update({k: v for k, v in env.items() if k != "RAY_API_SERVER_ADDRESS"})
    import ray
    import ray._private.ray_constants as ray_constants

    # The loopback switch is read when Ray is imported; Ray may have been imported before.
    ray_constants.ENABLE_RAY_CLUSTER = False
    return ray.init(address=env["RAY_ADDRESS"], **init_kwargs)


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL to use: ``address``, else $RAY_API_SERVER_ADDRESS, else an http
    $RAY_ADDRESS (e.g. a port-forwarded KubeRay head), else the local cluster's dashboard.
    Raises ClusterError when it does not answer."""
    env_address = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not env_address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        env_address = os.environ["RAY_ADDRESS"]
    url = (address or env_address or _require_state()["dashboard_url"]).rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    _get_json(f"{url}/api/version", _token_for(url))  # reachable, and the token is accepted
    return url


def _token_for(url: str) -> str | None:
    """Our token for our own dashboard; otherwise the one Ray's clients would use."""
    state = read_json(_state_path())
    if state and state["dashboard_url"] == url:
        return _local_token()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).read_text().strip() if path and Path(path).exists() else None


def job_client(address: str | None = None):
    """A Ray ``JobSubmissionClient`` for :func:`resolve_address`, sending the bearer token."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=_auth_headers(_token_for(url)))
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"Jobs API at {url} refused the client: {str(exc).splitlines()[0]}") from None
