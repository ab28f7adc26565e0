"""Manifests: rendering, the committed copies, schema validation and every semantic rule.

All offline: the KubeRay v1.7.0 CRDs come from ../shared (or $KUBERAY_CRDS)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from dtrain import cli, k8s, k8s_rules, k8s_validate, versions
from dtrain.errors import ConfigError, ManifestError

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"


@pytest.fixture(scope="module")
def rendered() -> list[tuple[str, dict]]:
    """The default manifests as (file, object) pairs, fresh from render's data."""
    return [(name, doc) for name, docs in k8s.documents().items() for doc in docs]


def _find(docs, kind):
    return next(doc for _, doc in docs if doc["kind"] == kind)


# --- the committed manifests -----------------------------------------------------------------
def test_committed_manifests_validate():
    docs = k8s_validate.load_documents(MANIFESTS)
    assert k8s_validate.validate_documents(docs) == []
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == ["RayCluster", "RayJob", "Role", "RoleBinding", "Secret", "Service", "ServiceAccount",
                     "ServiceAccount", "StatefulSet"]


def test_committed_manifests_are_what_render_writes(tmp_path):
    k8s.render(out_dir=tmp_path)
    for name in k8s.RENDERED_FILES:
        assert (tmp_path / name).read_text() == (MANIFESTS / name).read_text(), \
            f"manifests/{name} is stale: run 'dtrain k8s render'"


def test_default_cluster_shape(rendered):
    cluster, job = _find(rendered, "RayCluster"), _find(rendered, "RayJob")
    spec = cluster["spec"]
    assert spec["rayVersion"] == versions.RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert group["replicas"] * k8s_rules.group_cpus(group) == 8
    pod = group["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    assert (spread["maxSkew"], spread["topologyKey"], spread["whenUnsatisfiable"]) == \
        (1, "kubernetes.io/hostname", "DoNotSchedule")
    assert spread["labelSelector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items()
    container = pod["containers"][0]
    assert container["resources"]["requests"] == container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]
    assert int(group["rayStartParams"]["object-store-memory"]) == int(0.8 * 2 * 2**30)
    assert container["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert job["spec"]["entrypoint"] == \
        "python -m dtrain train --driver --dataset fashion-mnist --workers 8 --epochs 2 --cpus-per-worker 1 --batch-size 256"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] > 0


def test_image_tag_carries_the_ray_version():
    assert k8s.DEFAULT_IMAGE == f"dtrain:{versions.PACKAGE_VERSION}-ray{versions.RAY_VERSION}"
    assert k8s_rules.image_ray_version(k8s.DEFAULT_IMAGE) == versions.RAY_VERSION
    assert k8s_rules.image_ray_version(versions.RAY_IMAGE) == versions.RAY_VERSION
    assert k8s_rules.image_ray_version("registry.local:5000/dtrain:0.2.0-ray2.61.1") == "2.61.1"
    assert k8s_rules.image_ray_version("registry.local:5000/dtrain") is None
    assert k8s_rules.image_ray_version("dtrain:latest") is None


def test_entrypoint_matches_train_driver_command_when_present():
    from dtrain import train

    words = [w for w in train.driver_command(dataset="mnist", workers=3, epochs=5, run_id="r1")
             if w not in ("--run-id", "r1")]
    assert words == k8s.entrypoint("mnist", 3, 5).split()
    rayjob = yaml.safe_load((REPO / "manifests" / "50-rayjob.yaml").read_text())
    assert rayjob["spec"]["entrypoint"] == k8s.entrypoint()


# --- render ------------------------------------------------------------------------------------
def test_render_other_namespace_enforces_restricted(tmp_path):
    paths = k8s.render(workers=6, cpus_per_worker_node=3, memory="6Gi", namespace="lab", out_dir=tmp_path)
    assert [p.name for p in paths][0] == "10-namespace.yaml"
    ns = yaml.safe_load((tmp_path / "10-namespace.yaml").read_text())
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    docs = k8s_validate.load_documents(tmp_path)
    assert k8s_validate.validate_documents(docs) == []
    assert {d["metadata"].get("namespace") for _, d in docs if d["kind"] != "Namespace"} == {"lab"}
    cluster = _find(docs, "RayCluster")
    assert cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] \
        == "1536Mi"
    assert "--workers 6" in _find(docs, "RayJob")["spec"]["entrypoint"]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"workers": 9}, "--workers 9 exceeds worker nodes x CPUs = 2 x 4"),
    ({"workers": 0}, "at least 1"),
    ({"memory": "lots"}, "memory: 'lots' is not a Kubernetes quantity"),
    ({"memory": "256Mi"}, "too small"),
    ({"epochs": 0}, "--epochs"),
])
def test_render_refuses_bad_input_and_writes_nothing(tmp_path, kwargs, fragment):
    with pytest.raises(ManifestError, match=re.escape(fragment)):
        k8s.render(out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_quantities():
    assert k8s_validate.parse_quantity("8Gi") == 8 * 2**30
    assert k8s_validate.parse_quantity("500m") == 0.5
    assert k8s_validate.parse_quantity("2G") == 2e9
    assert k8s_validate.format_quantity(3 * 2**29) == "1536Mi"


# --- schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["spec"]["headGroupSpec"].__setitem__("rayStartParam", {}),
     "spec.headGroupSpec.rayStartParam: unknown field"),
    (lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .__setitem__("imagePullPolcy", "Always"),
     "spec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolcy: unknown field"),
    (lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "two"),
     "spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"),
    (lambda c: c["spec"]["authOptions"].__setitem__("mode", "password"), "spec.authOptions.mode"),
    (lambda c: c["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    (lambda c: c["metadata"].__setitem__("nmae", "x"), "metadata.nmae: unknown field"),
])
def test_crd_schema_rejects_with_the_field_path(rendered, mutate, expected):
    cluster = copy.deepcopy(_find(rendered, "RayCluster"))
    mutate(cluster)
    problems = k8s_validate.validate_documents([("40-raycluster.yaml", cluster)])
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("40-raycluster.yaml: RayCluster dtrain-cluster: ") for p in problems)


def test_core_kinds_checked_structurally(rendered):
    secret = copy.deepcopy(_find(rendered, "Secret"))
    secret["strigData"] = secret.pop("stringData")
    role = {"apiVersion": "v1", "kind": "Role", "metadata": {"name": "r"}}
    cr = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "c"}}
    problems = k8s_validate.validate_documents([("s.yaml", secret), ("r.yaml", role), ("c.yaml", cr)])
    assert any("Secret minio-credentials: strigData: unknown field" in p for p in problems)
    assert any("Role r: apiVersion: Role needs 'rbac.authorization.k8s.io/v1'" in p for p in problems)
    assert any("Role r: rules: required field missing" in p for p in problems)
    assert any("ClusterRole c: kind: 'ClusterRole' is not a kind this lab ships" in p for p in problems)


def test_crds_looked_up_in_env_then_shared(monkeypatch, tmp_path):
    shared = k8s_validate.crd_dir()
    assert shared == REPO.parent / "shared" / "kuberay-crds" / "v1.7.0"
    monkeypatch.setenv("KUBERAY_CRDS", str(tmp_path))  # empty: falls back to shared
    assert k8s_validate.crd_dir() == shared
    monkeypatch.setattr(k8s_validate, "PROJECT_ROOT", tmp_path / "nowhere" / "repo")
    with pytest.raises(ConfigError, match="KUBERAY_CRDS"):
        k8s_validate.crd_dir()
    for name in k8s_validate.CRD_FILES.values():
        (tmp_path / name).write_text((shared / name).read_text())
    assert k8s_validate.crd_dir() == tmp_path


# --- semantic rules: each catches a deliberately broken copy ----------------------------------
def _worker(docs):
    return _find(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]


def _worker_container(docs):
    return _worker(docs)["template"]["spec"]["containers"][0]


def _set(path_fn, key, value):
    return lambda docs: path_fn(docs).__setitem__(key, value)


BROKEN = {
    "rayVersion": (lambda d: _find(d, "RayCluster")["spec"].__setitem__("rayVersion", "2.59.0"),
                   "spec.rayVersion: '2.59.0' differs from the pinned"),
    "image tag": (_set(_worker_container, "image", "dtrain:0.1.0-ray2.59.0"),
                  "workerGroupSpecs[0].template.spec.containers[0].image: 'dtrain:0.1.0-ray2.59.0' is Ray 2.59.0"),
    "image untagged": (_set(_worker_container, "image", "dtrain:latest"), "does not name its Ray version"),
    "too many workers": (lambda d: _find(d, "RayJob")["spec"].__setitem__(
        "entrypoint", k8s.entrypoint(workers=9)), "spec.entrypoint: --workers 9 needs 9 CPUs"),
    "too few replicas": (_set(_worker, "replicas", 1), "--workers 8 needs 8 CPUs but the worker groups offer 1 x 4"),
    "no /dev/shm": (lambda d: _worker(d)["template"]["spec"].__setitem__("volumes", []),
                    "template.spec.volumes: no memory-backed emptyDir mounted at /dev/shm"),
    "shm on disk": (lambda d: _worker(d)["template"]["spec"]["volumes"][0]["emptyDir"].pop("medium"),
                    "no memory-backed emptyDir"),
    "object store > shm": (lambda d: _worker(d)["rayStartParams"].__setitem__("object-store-memory", str(3 * 2**30)),
                           "rayStartParams.object-store-memory: 3221225472 bytes exceed the /dev/shm sizeLimit 2Gi"),
    "requests != limits": (lambda d: _worker_container(d)["resources"]["requests"].__setitem__("cpu", "2"),
                           "requests must equal limits"),
    "secret key": (lambda d: _worker_container(d)["env"][3]["valueFrom"]["secretKeyRef"].__setitem__("key", "REGION"),
                   "env[3].valueFrom.secretKeyRef: Secret 'minio-credentials' has no key 'REGION'"),
    "secret name": (lambda d: _worker_container(d)["env"][0]["valueFrom"]["secretKeyRef"].__setitem__("name", "s3"),
                    "env[0].valueFrom.secretKeyRef: Secret 's3' is not defined here"),
    "token secret": (lambda d: _find(d, "RayCluster")["spec"].__setitem__("authOptions", {"mode": "disabled"}),
                     "Secret 'dtrain-cluster' is not defined here"),
    "root": (lambda d: [_worker(d)["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
                        _worker_container(d)["securityContext"].pop("runAsNonRoot")],
             "containers[0].securityContext.runAsNonRoot: must be true"),
    "escalation": (lambda d: _worker_container(d)["securityContext"].__setitem__("allowPrivilegeEscalation", True),
                   "securityContext.allowPrivilegeEscalation: must be false"),
    "capabilities": (lambda d: _worker_container(d)["securityContext"].pop("capabilities"),
                     "securityContext.capabilities.drop: must include ALL"),
    "seccomp": (lambda d: _find(d, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["securityContext"]
                .pop("seccompProfile"), "spec.submitterPodTemplate.spec.containers[0].securityContext.seccompProfile"),
    "hostNetwork": (lambda d: _worker(d)["template"]["spec"].__setitem__("hostNetwork", True),
                    "spec.hostNetwork: not allowed under restricted"),
    "hostPath": (lambda d: _worker(d)["template"]["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
                 "volumes[1]: volume type ['hostPath'] not allowed"),
    "wildcard verbs": (lambda d: _find(d, "Role")["rules"][0].__setitem__("verbs", ["*"]),
                       "Role dtrain-client: rules[0].verbs: wildcard '*' not allowed"),
    "secrets in role": (lambda d: _find(d, "Role")["rules"][2]["resources"].append("secrets"),
                        "rules[2].resources: access to secrets is not needed"),
    "cluster-admin": (lambda d: _find(d, "RoleBinding").__setitem__(
        "roleRef", {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"}),
        "roleRef: binds ClusterRole 'cluster-admin'"),
    "backoffLimit": (lambda d: _find(d, "RayJob")["spec"].__setitem__("backoffLimit", 2),
                     "spec.backoffLimit: must be 0 with clusterSelector"),
    "ttl": (lambda d: _find(d, "RayJob")["spec"].__setitem__("ttlSecondsAfterFinished", 60),
            "spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes true"),
    "deadline": (lambda d: _find(d, "RayJob")["spec"].pop("activeDeadlineSeconds"),
                 "spec.activeDeadlineSeconds: set a positive deadline"),
    "selector": (lambda d: _find(d, "RayJob")["spec"].__setitem__("clusterSelector", {"ray.io/cluster": "other"}),
                 "spec.clusterSelector: no RayCluster named 'other'"),
    "job name": (lambda d: _find(d, "RayJob")["metadata"].__setitem__("name", "x" * 48),
                 "metadata.name: a RayJob name must be a DNS-1035 label"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_semantic_rule_catches_broken_copy(rendered, case):
    mutate, expected = BROKEN[case]
    assert k8s_validate.validate_documents(rendered) == []
    docs = copy.deepcopy(rendered)
    mutate(docs)
    problems = k8s_validate.validate_documents(docs)
    assert any(expected in p for p in problems), problems


def test_installed_ray_must_match_the_pin(rendered, monkeypatch):
    monkeypatch.setattr(k8s_rules, "installed_ray_version", lambda: "2.59.0")
    problems = k8s_rules.check_ray_versions(rendered)
    assert problems == ["40-raycluster.yaml: RayCluster dtrain-cluster: spec.rayVersion: the Ray installed "
                        "here is 2.59.0, pinned is 2.60.0; client and cluster must match"]


# --- CLI -------------------------------------------------------------------------------------
def test_cli_validate_ok(capsys):
    assert cli.main(["k8s", "validate", str(MANIFESTS)]) == 0
    assert capsys.readouterr().out.strip() == "OK 9 objects"


def test_cli_validate_failure_is_one_line_naming_the_field(tmp_path, capsys):
    k8s.render(out_dir=tmp_path)
    path = tmp_path / "40-raycluster.yaml"
    path.write_text(path.read_text().replace("rayVersion: 2.60.0", "rayVersion: 2.59.0")
                    .replace("enableInTreeAutoscaling", "enableInTreeAutoscalin"))
    assert cli.main(["k8s", "validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("dtrain: error: 40-raycluster.yaml: RayCluster dtrain-cluster: "
                          "spec.enableInTreeAutoscalin: unknown field (+1 more")
    assert cli.main(["k8s", "validate", "--all", str(tmp_path)]) == 2
    assert "spec.rayVersion: '2.59.0'" in capsys.readouterr().out


def test_cli_validate_bad_folder_and_yaml(tmp_path, capsys):
    assert cli.main(["k8s", "validate", str(tmp_path / "missing")]) == 2
    (tmp_path / "x.yaml").write_text("a: [1,\n")
    assert cli.main(["k8s", "validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("missing: not a folder of manifests") and "x.yaml: not valid YAML" in err[1]


def test_cli_render_commands_versions(tmp_path, capsys):
    assert cli.main(["k8s", "render", "--workers", "4", "--cpus", "2", "--out", str(tmp_path)]) == 0
    assert "--workers 4" in (tmp_path / "50-rayjob.yaml").read_text()
    capsys.readouterr()
    assert cli.main(["k8s", "commands"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n# ") == len(k8s.COMMANDS) - 1
    for needle in ("10-install-rke2-server.sh", "20-join-rke2-agent.sh", "export KUBECONFIG", "helm",
                   "kubectl apply -f manifests/40-raycluster.yaml", "kubectl logs", "port-forward", "delete"):
        assert needle in out
    assert cli.main(["k8s", "versions"]) == 0
    pairs = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert pairs["KUBERAY_VERSION"] == versions.KUBERAY_VERSION and pairs["RAY_IMAGE"] == versions.RAY_IMAGE


def test_every_manifest_the_commands_apply_exists():
    applied = re.findall(r"manifests/[\w./-]+\.yaml", k8s.format_commands())
    assert applied and all((REPO / p).is_file() for p in applied)
