"""apply -> status -> logs -> delete through the real ``kubernetes`` client.

The API server here is a DOUBLE: kmock's KubernetesEmulator, an in-memory HTTP server that
stores objects the way the Kubernetes REST API does (create, get, list, merge-patch,
delete). No real API server (nor KubeRay) can run on this machine, so the test plays the
operator's part itself: it creates the submitter pod and sets the RayJob status. What it
proves is that our calls hit the right URLs with the right bodies and that we read the
answers correctly; KubeRay's own behaviour is out of its reach.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path

import kmock
import pytest
import yaml

from dtrain import cli, k8s_api
from dtrain.errors import ClusterError, ConfigError, ManifestError

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
LOG = b"epoch 1/2 accuracy 0.881\nepoch 2/2 accuracy 0.902\n"
SUBMITTER_POD = "dtrain-train-x7k2q"


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    """A kmock Kubernetes double on a free port in a thread, and a KUBECONFIG pointing at it."""
    ready, box = threading.Event(), {}

    async def serve(stop: asyncio.Event) -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources["v1/pods"] = {}  # known to the double even before any pod exists
            emulator[f"get /api/v1/namespaces/default/pods/{SUBMITTER_POD}/log"] << LOG
            box.update(emulator=emulator, url=str(server.url).rstrip("/"), loop=asyncio.get_running_loop())
            ready.set()
            await stop.wait()

    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: asyncio.run(serve(stop)), daemon=True)
    thread.start()
    assert ready.wait(20), "the kmock server did not start"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "double", "cluster": {"server": box["url"]}}],
        "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield box["emulator"]
    box["loop"].call_soon_threadsafe(stop.set)
    thread.join(10)


def _play_operator(succeeded: bool = True) -> None:
    """What KubeRay would do after the RayJob is created: a submitter pod and a status."""
    from kubernetes import client

    api = k8s_api.api_client()
    client.CoreV1Api(api).create_namespaced_pod("default", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": SUBMITTER_POD, "labels": {"job-name": "dtrain-train"}},
        "spec": {"nodeName": "worker-1", "containers": [{"name": "ray-job-submitter", "image": "x"}]},
        "status": {"phase": "Succeeded" if succeeded else "Failed"}})
    client.CoreV1Api(api).create_namespaced_pod("default", {  # someone else's pod: must be ignored
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unrelated", "labels": {"app": "other"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}})
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        "ray.io", "v1", "default", "rayjobs", "dtrain-train",
        {"status": {"jobStatus": "SUCCEEDED" if succeeded else "FAILED", "jobDeploymentStatus": "Complete",
                    "rayClusterName": "dtrain-cluster"}})


def test_apply_status_logs_delete(fake_api):
    created = k8s_api.apply(MANIFESTS)
    assert created == ["created ServiceAccount dtrain-ray", "created ServiceAccount dtrain-client",
                       "created Role dtrain-client", "created RoleBinding dtrain-client",
                       "created RayCluster dtrain-cluster", "created RayJob dtrain-train"]
    # Templates (the Secret) and the MinIO alternative in manifests/minio/ are never sent.
    assert len(fake_api["post"]) == 6
    # Re-applying merge-patches what exists instead of failing on 409.
    assert k8s_api.apply(MANIFESTS)[-1] == "configured RayJob dtrain-train"
    patches = fake_api["patch"]
    assert len(patches) == 6 and all(r.headers["Content-Type"] == k8s_api.MERGE_PATCH for r in patches)

    from kubernetes import client

    stored = client.CustomObjectsApi(k8s_api.api_client()).get_namespaced_custom_object(
        "ray.io", "v1", "default", "rayclusters", "dtrain-cluster")
    sent = yaml.safe_load((MANIFESTS / "40-raycluster.yaml").read_text())
    assert stored["spec"] == sent["spec"]

    before = k8s_api.status("dtrain-train")
    assert before["jobStatus"] is None and before["submitterPods"] == []
    _play_operator()
    after = k8s_api.status("dtrain-train")
    assert (after["kind"], after["jobStatus"], after["jobDeploymentStatus"]) == ("RayJob", "SUCCEEDED", "Complete")
    assert after["submitterPods"] == [{"name": SUBMITTER_POD, "phase": "Succeeded", "node": "worker-1"}]
    assert k8s_api.status("dtrain-cluster")["kind"] == "RayCluster"

    assert "".join(k8s_api.logs("dtrain-train")) == LOG.decode()

    assert k8s_api.delete(MANIFESTS)[:2] == ["deleted RayJob dtrain-train", "deleted RayCluster dtrain-cluster"]
    assert all(line.startswith("absent ") for line in k8s_api.delete(MANIFESTS))
    with pytest.raises(ClusterError, match="no RayJob or RayCluster named 'dtrain-train'"):
        k8s_api.status("dtrain-train")


def test_cli_status_and_logs(fake_api, capsys):
    assert cli.main(["k8s", "apply", str(MANIFESTS)]) == 0
    _play_operator(succeeded=False)
    assert cli.main(["k8s", "status", "dtrain-train"]) == 0
    assert '"jobStatus": "FAILED"' in capsys.readouterr().out
    assert cli.main(["k8s", "logs", "dtrain-train"]) == 0
    assert capsys.readouterr().out == LOG.decode()
    assert cli.main(["k8s", "logs", "nope"]) == 2
    assert capsys.readouterr().err.strip() == "dtrain: error: no RayJob named 'nope' in namespace 'default'"


def test_logs_before_any_pod_says_what_to_do(fake_api):
    k8s_api.apply(MANIFESTS)
    with pytest.raises(ClusterError, match="no submitter or head pod yet: try 'kubectl describe rayjob"):
        list(k8s_api.logs("dtrain-train"))


def test_apply_refuses_invalid_manifests_before_any_request(fake_api, tmp_path):
    broken = tmp_path / "m"
    broken.mkdir()
    for path in MANIFESTS.glob("*.yaml*"):
        (broken / path.name).write_text(path.read_text().replace("backoffLimit: 0", "backoffLimit: 3"))
    with pytest.raises(ManifestError, match="spec.backoffLimit"):
        k8s_api.apply(broken)
    assert len(fake_api) == 0


def test_without_kubeconfig_one_line_config_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    with pytest.raises(ConfigError, match="KUBECONFIG is not set"):
        k8s_api.status("dtrain-train")
    assert cli.main(["k8s", "status"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        k8s_api.apply(MANIFESTS)


def test_unreachable_api_server_is_a_cluster_error(monkeypatch, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
              "users": [{"name": "u", "user": {}}], "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(copy.deepcopy(config)))
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API server"):
        k8s_api.status("dtrain-train")
