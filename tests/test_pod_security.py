"""Security checks that the other test files leave out.

Already covered elsewhere (not repeated): each Pod Security / RBAC rule of
``k8s_rules`` catching a broken copy (test_k8s.py), Ray on loopback with token auth
(test_cluster.py: every listener is 127.0.0.1, a client without the token gets 401/403),
HTTPS with a private CA (test_s3_tls_and_load.py), secrets in the tree and history
(test_secrets.py), MinIO's endpoint on 127.0.0.1 with non-default keys (test_storage.py).

Here: an independent reading of the committed manifests against the *whole* Pod Security
"restricted" profile (fields the lab's rules do not look at, too) and least privilege for
service-account tokens; what MinIO really listens on; the state files' permissions.
"""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import psutil
import pytest

from dtrain import config, k8s, k8s_validate, s3server

REPO = Path(__file__).resolve().parents[1]
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
ALLOWED_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
ESCALATING_VERBS = {"*", "escalate", "bind", "impersonate"}


def _docs(folder: Path) -> list[dict]:
    return [doc for _, doc in k8s_validate.load_documents(folder)]


@pytest.fixture(scope="module", params=["committed", "namespace-lab"])
def documents(request, tmp_path_factory) -> list[dict]:
    """The committed manifests, and a fresh render into a namespace of its own."""
    if request.param == "committed":
        return _docs(REPO / "manifests")
    out = tmp_path_factory.mktemp("render")
    k8s.render(namespace="lab", out_dir=out)
    return _docs(out)


def _pods(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in any object, found by shape: any dict
    with a 'containers' list, so a new kind of object cannot slip past this check."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for doc in docs:
        walk(doc.get("spec"), f"{doc['kind']}/{doc['metadata']['name']}")
    return found


def _restricted_violations(where: str, pod: dict) -> list[str]:
    """The Pod Security Standard 'restricted' (Kubernetes 1.30), baseline included."""
    bad, pod_sc = [], pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        bad += [f"{where}.{key}"] if pod.get(key) else []
    bad += [f"{where}.sysctls {s['name']}" for s in pod_sc.get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                         "projected", "secret"}:
            bad.append(f"{where}.volumes {volume['name']}: {sorted(kinds)}")
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(kind) or []:
            sc, at = c.get("securityContext") or {}, f"{where}.{kind}[{c.get('name')}]"

            def eff(key, sc=sc):
                return sc.get(key, pod_sc.get(key))

            bad += [f"{at}: privileged"] if sc.get("privileged") else []
            bad += [f"{at}: allowPrivilegeEscalation"] if sc.get("allowPrivilegeEscalation") is not False else []
            bad += [f"{at}: runAsNonRoot"] if eff("runAsNonRoot") is not True else []
            bad += [f"{at}: runAsUser 0"] if eff("runAsUser") == 0 else []
            bad += [f"{at}: seccomp"] if (eff("seccompProfile") or {}).get("type") not in ("RuntimeDefault",
                                                                                           "Localhost") else []
            caps = sc.get("capabilities") or {}
            bad += [f"{at}: drop ALL"] if "ALL" not in (caps.get("drop") or []) else []
            bad += [f"{at}: adds {caps['add']}"] if set(caps.get("add") or []) - {"NET_BIND_SERVICE"} else []
            bad += [f"{at}: hostPort"] if any(p.get("hostPort") for p in c.get("ports") or []) else []
            bad += [f"{at}: procMount"] if sc.get("procMount", "Default") != "Default" else []
            bad += [f"{at}: hostProcess"] if (eff("windowsOptions") or {}).get("hostProcess") else []
            bad += [f"{at}: seLinux type"] if (eff("seLinuxOptions") or {}).get("type") not in \
                ALLOWED_SELINUX_TYPES else []
            bad += [f"{at}: appArmor"] if (eff("appArmorProfile") or {}).get("type") == "Unconfined" else []
    return bad


def test_every_pod_meets_the_whole_restricted_profile(documents):
    pods = _pods(documents)
    kinds = {where.split("/")[0] for where, _ in pods}
    assert {"RayCluster", "RayJob", "StatefulSet"} <= kinds or {"RayCluster", "RayJob"} <= kinds, kinds
    assert len(pods) >= 3  # head, worker group, submitter (+ MinIO)
    problems = [p for where, pod in pods for p in _restricted_violations(where, pod)]
    assert problems == []


def test_the_checker_itself_catches_each_kind_of_violation():
    """The independent checker must be able to fail: one broken field at a time."""
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                              "capabilities": {"drop": ["ALL"]}}}]}
    assert _restricted_violations("p", good) == []
    breakers = [lambda p: p.__setitem__("hostNetwork", True),
                lambda p: p["securityContext"].__setitem__("sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
                lambda p: p.__setitem__("volumes", [{"name": "h", "hostPath": {"path": "/"}}]),
                lambda p: p["containers"][0]["securityContext"].__setitem__("procMount", "Unmasked"),
                lambda p: p["containers"][0]["securityContext"].__setitem__("seLinuxOptions", {"type": "spc_t"}),
                lambda p: p["containers"][0]["securityContext"].__setitem__("appArmorProfile", {"type": "Unconfined"}),
                lambda p: p["containers"][0]["securityContext"]["capabilities"].__setitem__("add", ["SYS_ADMIN"]),
                lambda p: p["securityContext"].__setitem__("runAsUser", 0)]
    import copy

    for breaker in breakers:
        pod = copy.deepcopy(good)
        breaker(pod)
        assert _restricted_violations("p", pod), breaker


def test_no_pod_carries_an_api_token(documents):
    """Training, submitter and MinIO pods never call the Kubernetes API: no token is
    mounted, and their service account is bound to nothing."""
    pods = _pods(documents)
    assert all(pod.get("automountServiceAccountToken") is False for _, pod in pods), \
        [where for where, pod in pods if pod.get("automountServiceAccountToken") is not False]
    bound = {s["name"] for d in documents if d["kind"] == "RoleBinding" for s in d.get("subjects") or []}
    used = {pod.get("serviceAccountName", "default") for _, pod in pods}
    assert not bound & used, bound & used


def test_rbac_grants_no_escalation_and_no_writes_to_core_objects(documents):
    roles = [d for d in documents if d["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"]
    assert not [d for d in documents if d["kind"] == "ClusterRoleBinding"]
    for rule in roles[0]["rules"]:
        assert not ESCALATING_VERBS & set(rule["verbs"]), rule
        assert not {"secrets", "pods/exec", "pods/attach", "pods/portforward", "serviceaccounts/token"} \
            & set(rule["resources"]), rule
        if rule["apiGroups"] != ["ray.io"]:  # the client only creates Ray objects
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


# --- the embedded MinIO -----------------------------------------------------------------------
def _listeners(pid: int) -> list:
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return [c for c in psutil.net_connections("inet") if c.pid in tree and c.status == psutil.CONN_LISTEN]


def test_minio_listens_only_on_loopback(s3):
    """Every socket MinIO listens on is loopback, never 0.0.0.0 or ::. (Asked for
    127.0.0.1:PORT, MinIO also binds [::1]:PORT; with the browser off it opens no console
    port.)"""
    state = s3server.status()
    listening = _listeners(state["pid"])
    addresses = sorted({(c.laddr.ip, c.laddr.port) for c in listening})
    assert ("127.0.0.1", state["port"]) in addresses, addresses
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in addresses), addresses


def test_state_and_credentials_are_private_and_per_install(s3, tmp_path, monkeypatch):
    home = Path(config.state_dir())
    for name in ("s3.json", "s3-credentials.json"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    first = s3server._credentials()
    assert first["access_key"] == s3.access_key
    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path))
    other = s3server._credentials()
    assert other["access_key"] != first["access_key"] and other["secret_key"] != first["secret_key"]
    assert len(other["secret_key"]) >= 40 and other["access_key"].startswith("dtrain-")
