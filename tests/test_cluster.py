"""The local multi-node Ray cluster: shape, token auth, loopback binding, clean teardown.

Fast tests check the pieces (commands, ports, token, address resolution, process scoping);
the slow ones start a real head + 2 worker nodes once for the module.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from dtrain import cli, cluster, config, raynodes
from dtrain.errors import ClusterError


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh state folder per test, no Ray address inherited from the caller's shell."""
    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path / "home"))
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "home"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- fast ----------------------------------------------------------------------------------
def test_token_is_private_random_and_stable(home):
    first = raynodes.ensure_token()
    assert len(first) == 64 and int(first, 16) >= 0
    assert stat.S_IMODE(raynodes.token_path().stat().st_mode) == 0o600
    assert raynodes.ensure_token() == first
    assert raynodes.token_path().parent == home / "ray"


def test_temp_dir_fits_unix_socket_limit(home, tmp_path, monkeypatch):
    # pytest's tmp paths are long: the Ray temp dir must move to a short /tmp path,
    # one per state folder so parallel clusters do not share it.
    long_one = raynodes.ray_temp_dir()
    assert len(str(long_one)) <= raynodes.MAX_TEMP_DIR_LEN and long_one.name.startswith("dtrain-ray-")
    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path / "another-long-state-folder"))
    assert raynodes.ray_temp_dir() != long_one
    monkeypatch.setenv("DTRAIN_HOME", "/tmp/dtr-t")
    assert raynodes.ray_temp_dir() == raynodes.ray_dir() / "tmp"


def test_free_ports_are_distinct_and_bindable():
    ports = raynodes.free_ports(30)
    assert len(set(ports)) == 30
    for port in ports[:3]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_node_commands_mirror_kuberay_and_stay_on_loopback(home):
    ports = dict(zip(raynodes.HEAD_PORT_FLAGS + raynodes.NODE_PORT_FLAGS, range(20001, 20010), strict=True))
    head = raynodes.node_command("head", ports, 0, 400, raynodes.ray_temp_dir(), None)
    worker = raynodes.node_command("worker-1", {"node-manager-port": 20011}, 4, 400,
                                   raynodes.ray_temp_dir(), "127.0.0.1:20001")
    assert "--head" in head and "--num-cpus=0" in head
    assert "--dashboard-host=127.0.0.1" in head and "--node-ip-address=127.0.0.1" in head
    assert f"--object-store-memory={400 * 1024 * 1024}" in head
    assert "--port=20001" in head and "--dashboard-port=20002" in head
    assert "--address=127.0.0.1:20001" in worker and "--num-cpus=4" in worker
    assert "--head" not in worker and worker[1] == "-c"  # the loopback shim
    assert not any("0.0.0.0" in arg for arg in head + worker)
    env = raynodes.node_env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(raynodes.token_path())
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["PATH"].split(os.pathsep)[0] == str(raynodes.RAY_BIN.parent)


@pytest.mark.parametrize("kwargs, message", [({"workers": 0}, "worker node"),
                                             ({"cpus_per_node": 0}, "CPU"),
                                             ({"object_store_mb": 10}, "object store")])
def test_up_rejects_bad_shapes_without_writing_state(home, kwargs, message):
    with pytest.raises(ClusterError, match=message):
        cluster.up(**kwargs)
    assert not (home / "ray" / "cluster.json").exists()


def test_failed_start_is_one_line_with_the_log_and_leaves_no_state(home, tmp_path, monkeypatch):
    fake_ray = tmp_path / "ray"
    fake_ray.write_text("#!/bin/sh\necho starting\necho 'boom: GCS exploded' >&2\nexit 1\n")
    fake_ray.chmod(0o755)
    monkeypatch.setattr(raynodes, "RAY_BIN", fake_ray)
    with pytest.raises(ClusterError) as err:
        cluster.up()
    message = str(err.value)
    assert "'ray start' for head failed (1" in message and "boom: GCS exploded" in message
    assert str(home / "ray" / "logs" / "head.log") in message and "\n" not in message
    assert not (home / "ray" / "cluster.json").exists()


def test_everything_reports_a_missing_cluster(home):
    assert cluster.status() == {"running": False, "healthy": False, "nodes": []}
    assert "nothing to stop" in cluster.down()
    for call in (cluster.client_env, cluster.resolve_address, cluster.env_exports):
        with pytest.raises(ClusterError, match="dtrain cluster up"):
            call()


def test_resolve_address_unreachable_is_one_line(home):
    port = _free_port()
    with pytest.raises(ClusterError, match=f"cannot reach http://127.0.0.1:{port}/api/version") as err:
        cluster.resolve_address(f"127.0.0.1:{port}")
    assert "\n" not in str(err.value)


@pytest.fixture
def fake_dashboard():
    """An HTTP server answering /api/version, like a port-forwarded KubeRay head."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            body = json.dumps({"ray_version": "2.60.0"}).encode()
            self.send_response(200 if self.path == "/api/version" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_resolve_address_precedence(home, monkeypatch, fake_dashboard):
    assert cluster.resolve_address(fake_dashboard + "/") == fake_dashboard
    monkeypatch.setenv("RAY_ADDRESS", fake_dashboard)
    assert cluster.resolve_address() == fake_dashboard
    # A GCS address (no scheme) in RAY_ADDRESS is for ray.init, not for the Jobs API.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(ClusterError, match="no local Ray cluster"):
        cluster.resolve_address()
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", fake_dashboard.removeprefix("http://"))
    assert cluster.resolve_address() == fake_dashboard


def test_killing_is_scoped_to_recorded_sessions(home):
    """down() must never touch another cluster: only the recorded sessions die."""
    def sleeper():
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ray-fake"],
                                start_new_session=True)

    ours, theirs = sleeper(), sleeper()
    try:
        state = {"nodes": [{"session_id": ours.pid}], "temp_dir": str(home / "nothing")}
        assert [p.pid for p in raynodes.our_processes(state)] == [ours.pid]
        assert raynodes.kill_processes(state, grace_s=2) == 1
        assert ours.wait(timeout=5) is not None
        assert theirs.poll() is None
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()


def test_cli_cluster_without_a_cluster(home, capsys):
    assert cli.main(["cluster", "status"]) == 0
    assert "no local Ray cluster" in capsys.readouterr().out
    assert cli.main(["cluster", "env"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtrain: error: no local Ray cluster") and err.count("\n") == 1
    assert cli.main(["cluster", "up", "--workers", "0"]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["cluster", "up", "--workers", "two"])
    assert exc.value.code == 2


# --- slow: a real cluster ---------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Head + 2 worker nodes for the whole module, in a state folder of its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DTRAIN_HOME", str(tmp_path_factory.mktemp("cluster-home")))
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            mp.delenv(key, raising=False)
        started = time.monotonic()
        try:
            info = cluster.up()
        except ClusterError:
            # up() keeps Ray's logs for the user to read; a test run must not litter /tmp.
            shutil.rmtree(raynodes.ray_temp_dir(), ignore_errors=True)
            raise
        info["measured_up_s"] = time.monotonic() - started
        state = config.read_json(cluster._state_path())
        yield {"info": info, "state": state}
        cluster.down()


def _report(name: str, value) -> None:
    print(f"\n[measure] {name}: {value}")


@pytest.mark.slow
def test_cluster_shape(live):
    info = live["info"]
    _report("up seconds (head + 2 workers)", round(info["measured_up_s"], 1))
    assert info["healthy"] and info["alive_nodes"] == 3
    by_name = {node["name"]: node for node in info["nodes"]}
    assert set(by_name) == {"head", "worker-1", "worker-2"}
    assert by_name["head"]["cpus"] == 0 and by_name["head"]["head"]
    assert by_name["worker-1"]["cpus"] == by_name["worker-2"]["cpus"] == 4
    assert info["resources"]["total"]["CPU"] == 8
    assert info["resources"]["available"]["CPU"] == 8
    assert info["address"].startswith("127.0.0.1:") and info["dashboard_url"].startswith("http://127.0.0.1:")
    assert info["auth_mode"] == "token"


@pytest.mark.slow
def test_up_again_reports_the_running_cluster(live):
    started = time.monotonic()
    again = cluster.up(workers=2)
    assert again["address"] == live["info"]["address"]
    assert time.monotonic() - started < 15
    idle = cluster.status()
    _report("idle memory, PSS MB", idle["memory_mb"])
    _report("processes", idle["processes"])
    rss = sum(p.memory_info().rss for p in raynodes.our_processes(live["state"])) / 2**20
    _report("idle memory, summed RSS MB", round(rss))
    assert 200 < idle["memory_mb"] < 4000


@pytest.mark.slow
def test_every_listening_socket_is_loopback(live):
    pids = {p.pid for p in raynodes.our_processes(live["state"])}
    listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids]
    assert len(listening) >= 15  # gcs, dashboard, 3 raylets, agents…
    bad = [(c.laddr.ip, c.laddr.port, c.pid) for c in listening
           if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert bad == []


JOB_SCRIPT = """
import ray
ray.init()
print("CLUSTER_CPUS", ray.cluster_resources().get("CPU"))
@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def hello(i):
    print("HELLO_FROM_TASK", i)
    return ray.get_runtime_context().get_node_id()
print("TASK_NODES", len(set(ray.get([hello.remote(i) for i in range(4)]))))
"""


@pytest.mark.slow
def test_jobs_api_runs_a_driver_with_the_token(live):
    from ray.job_submission import JobStatus

    client = cluster.job_client()
    started = time.monotonic()
    job = client.submit_job(entrypoint=f"python -c {shlex.quote(JOB_SCRIPT)}")
    while (state := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                         JobStatus.STOPPED}:
        assert time.monotonic() - started < 300, "job did not finish in 5 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    _report("trivial job through the Jobs API, s", round(time.monotonic() - started, 1))
    assert state == JobStatus.SUCCEEDED, logs[-2000:]
    assert "CLUSTER_CPUS 8.0" in logs
    assert "TASK_NODES 2" in logs  # SPREAD put tasks on both worker nodes
    # Worker nodes run no log monitor; the head's still forwards their prints.
    # (The entrypoint itself is echoed in the logs too, hence the task-prefix match.)
    printed = re.findall(r"\(hello pid=\d+[^)]*\)\S* HELLO_FROM_TASK (\d)", logs)
    assert sorted(printed) == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_clients_without_the_token_are_refused(live):
    url = live["info"]["dashboard_url"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url, timeout=10)
    assert missing.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": "Bearer " + "0" * 64})
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(wrong, timeout=10)
    assert forbidden.value.code == 403
    with pytest.raises(ClusterError, match="HTTP 401"):
        cluster._get_json(url)
    assert isinstance(cluster._get_json(url, cluster._local_token()), list)


@pytest.mark.slow
def test_connect_from_a_fresh_process(live):
    code = "from dtrain import cluster; cluster.connect(); import ray; print('CPUS', ray.cluster_resources()['CPU'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CPUS 8.0" in out.stdout


@pytest.mark.slow
def test_z_down_leaves_nothing(live):
    """Runs last in the module (name order): stop, then look for any survivor."""
    state = live["state"]
    started = time.monotonic()
    message = cluster.down()
    _report("down seconds", round(time.monotonic() - started, 1))
    assert message.startswith("stopped ")
    assert raynodes.our_processes(state) == []
    sessions = {node["session_id"] for node in state["nodes"]}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            assert state["temp_dir"] not in " ".join(proc.info["cmdline"] or [])
            assert os.getsid(proc.pid) not in sessions
        except (ProcessLookupError, psutil.Error):
            continue
    for node in state["nodes"]:
        for port in node["ports"].values():
            with socket.socket() as sock:  # free to listen on (TIME_WAIT leftovers are fine)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", int(port)))
                sock.listen()
    assert cluster.status()["running"] is False
    assert not raynodes.token_path().exists()
    assert not os.path.exists(state["temp_dir"])
