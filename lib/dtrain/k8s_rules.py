"""Semantic rules for the lab's manifests: what a schema cannot say.

Each rule takes every (file, object) pair and returns 'file: Kind name: field: problem'
lines. They catch the failures users of KubeRay report most: Ray versions that differ
between client, image and cluster; jobs asking for more CPUs than exist (they hang);
a missing or tiny /dev/shm; a Secret key that does not exist (pods stuck in
CreateContainerConfigError); pods that Pod Security "restricted" rejects; over-broad RBAC;
and the RayJob combinations the KubeRay webhook refuses.
"""

from __future__ import annotations

import re
import shlex
from importlib import metadata

from dtrain.k8s_validate import label, parse_quantity
from dtrain.versions import RAY_VERSION

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}
CLUSTER_SELECTOR_KEY = "ray.io/cluster"
TOKEN_KEY = "auth_token"
RAYJOB_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,45}[a-z0-9])?$")  # DNS-1035, KubeRay caps it at 47


def installed_ray_version() -> str | None:
    """The Ray installed here, without importing it (that takes seconds)."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return None


def image_ray_version(image: str) -> str | None:
    """The Ray version an image tag announces: rayproject/ray:2.60.0-py311-cpu or dtrain:0.1.0-ray2.60.0."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return None
    if name.endswith("rayproject/ray"):
        return tag.split("-")[0]
    match = re.search(r"(?:^|-)ray(\d+\.\d+\.\d+)", tag)
    return match.group(1) if match else None


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """(field path, RayCluster spec) held by a RayCluster or an embedded RayJob spec."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        return [("spec", spec)]
    if doc.get("kind") == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    return []


def ray_groups(doc: dict) -> list[tuple[str, dict]]:
    """(field path, head or worker group) of every Ray node group in an object."""
    groups = []
    for base, spec in cluster_specs(doc):
        if isinstance(spec.get("headGroupSpec"), dict):
            groups.append((f"{base}.headGroupSpec", spec["headGroupSpec"]))
        for i, group in enumerate(spec.get("workerGroupSpecs") or []):
            groups.append((f"{base}.workerGroupSpecs[{i}]", group))
    return groups


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(field path, pod template) of every pod an object will create."""
    found = [(f"{path}.template", g["template"]) for path, g in ray_groups(doc) if isinstance(g.get("template"), dict)]
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob" and isinstance(spec.get("submitterPodTemplate"), dict):
        found.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    if doc.get("kind") == "StatefulSet" and isinstance(spec.get("template"), dict):
        found.append(("spec.template", spec["template"]))
    return found


def containers(template: dict) -> list[tuple[str, dict]]:
    """(field path inside the template, container) for init and regular containers."""
    spec = template.get("spec") or {}
    return [(f"spec.{key}[{i}]", c) for key in ("initContainers", "containers")
            for i, c in enumerate(spec.get(key) or []) if isinstance(c, dict)]


def _each_pod(docs):
    for rel, doc in docs:
        for path, template in pod_templates(doc):
            yield label(rel, doc), path, template


def check_ray_versions(docs) -> list[str]:
    """rayVersion == versions.RAY_VERSION == installed Ray == the Ray in every image tag."""
    problems, installed = [], installed_ray_version()
    for rel, doc in docs:
        where = label(rel, doc)
        for base, spec in cluster_specs(doc):
            version = spec.get("rayVersion")
            if version != RAY_VERSION:
                problems.append(f"{where}: {base}.rayVersion: {version!r} differs from the pinned {RAY_VERSION}")
            if installed and installed != RAY_VERSION:
                problems.append(f"{where}: {base}.rayVersion: the Ray installed here is {installed}, "
                                f"pinned is {RAY_VERSION}; client and cluster must match")
        for path, template in pod_templates(doc):
            if doc.get("kind") == "StatefulSet":
                continue
            for cpath, container in containers(template):
                image = str(container.get("image", ""))
                tagged = image_ray_version(image)
                if tagged != RAY_VERSION:
                    problems.append(f"{where}: {path}.{cpath}.image: {image!r} "
                                    f"{'is Ray ' + tagged if tagged else 'does not name its Ray version'}, "
                                    f"rayVersion is {RAY_VERSION} (tag it ...-ray{RAY_VERSION})")
    return problems


def group_cpus(group: dict) -> float:
    """Logical CPUs one pod of a group gives Ray: num-cpus, else the container's CPU limit."""
    params = group.get("rayStartParams") or {}
    if "num-cpus" in params:
        return float(params["num-cpus"])
    ray_containers = (group.get("template", {}).get("spec", {}).get("containers") or [{}])
    limits = (ray_containers[0].get("resources") or {}).get("limits") or {}
    return float(int(parse_quantity(limits.get("cpu", 0), "cpu")))


def _entrypoint_workers(entrypoint: str) -> int | None:
    words = shlex.split(entrypoint or "")
    for i, word in enumerate(words):
        if word == "--workers" and i + 1 < len(words) and words[i + 1].isdigit():
            return int(words[i + 1])
        if word.startswith("--workers=") and word.split("=", 1)[1].isdigit():
            return int(word.split("=", 1)[1])
    return None


def check_capacity(docs) -> list[str]:
    """A RayJob's --workers (1 CPU each) fits in the worker groups of the cluster it runs on."""
    clusters = {(d.get("metadata") or {}).get("name"): d for _, d in docs if d.get("kind") == "RayCluster"}
    problems = []
    for rel, doc in docs:
        if doc.get("kind") != "RayJob":
            continue
        spec, where = doc.get("spec") or {}, label(rel, doc)
        target = (spec.get("clusterSelector") or {}).get(CLUSTER_SELECTOR_KEY)
        cluster = doc if spec.get("rayClusterSpec") else clusters.get(target)
        if cluster is None:
            problems.append(f"{where}: spec.clusterSelector: no RayCluster named {target!r} in these manifests")
            continue
        workers = _entrypoint_workers(spec.get("entrypoint", ""))
        if workers is None:
            problems.append(f"{where}: spec.entrypoint: no --workers N in {spec.get('entrypoint')!r}")
            continue
        groups = [g for path, g in ray_groups(cluster) if "workerGroupSpecs" in path]
        parts = [(int(g.get("replicas", g.get("minReplicas", 0)) or 0), group_cpus(g)) for g in groups]
        capacity = sum(r * c for r, c in parts)
        if workers > capacity:
            shown = " + ".join(f"{r} x {c:g}" for r, c in parts) or "no worker groups"
            problems.append(f"{where}: spec.entrypoint: --workers {workers} needs {workers} CPUs but the "
                            f"worker groups offer {shown} = {capacity:g}; the job would wait forever")
    return problems


def check_shm(docs) -> list[str]:
    """Every Ray pod mounts a memory-backed /dev/shm, big enough for its object store."""
    problems = []
    for rel, doc in docs:
        for path, group in ray_groups(doc):
            where, spec = label(rel, doc), (group.get("template") or {}).get("spec") or {}
            ray = (spec.get("containers") or [{}])[0]
            mount = next((m for m in ray.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"), None)
            volume = mount and next((v for v in spec.get("volumes") or [] if v.get("name") == mount.get("name")), None)
            empty_dir = (volume or {}).get("emptyDir")
            field = f"{path}.template.spec.volumes"
            if not mount or not isinstance(empty_dir, dict) or empty_dir.get("medium") != "Memory":
                problems.append(f"{where}: {field}: no memory-backed emptyDir mounted at /dev/shm "
                                "(the object store falls back to /tmp; DataLoader may die with Bus error)")
                continue
            if "sizeLimit" not in empty_dir:
                problems.append(f"{where}: {field}: the /dev/shm emptyDir has no sizeLimit")
                continue
            shm = parse_quantity(empty_dir["sizeLimit"], f"{field} sizeLimit")
            store = (group.get("rayStartParams") or {}).get("object-store-memory")
            if store is not None and float(store) > shm:
                problems.append(f"{where}: {path}.rayStartParams.object-store-memory: {store} bytes exceed "
                                f"the /dev/shm sizeLimit {empty_dir['sizeLimit']}")
            resources = ray.get("resources") or {}
            if resources.get("requests") != resources.get("limits"):
                problems.append(f"{where}: {path}.template.spec.containers[0].resources: requests must equal "
                                "limits (Guaranteed QoS; Ray sizes itself from the limits)")
    return problems


def _known_secrets(docs) -> dict[str, set[str]]:
    secrets: dict[str, set[str]] = {}
    for _, doc in docs:
        if doc.get("kind") == "Secret":
            keys = {*(doc.get("data") or {}), *(doc.get("stringData") or {})}
            secrets.setdefault((doc.get("metadata") or {}).get("name"), set()).update(keys)
        for _, spec in cluster_specs(doc):
            auth = spec.get("authOptions") or {}
            if auth.get("mode") == "token":  # KubeRay generates this Secret unless secretName is given
                name = auth.get("secretName") or (doc.get("metadata") or {}).get("name")
                if not auth.get("secretName"):
                    secrets.setdefault(name, set()).add(TOKEN_KEY)
    return secrets


def check_secret_refs(docs) -> list[str]:
    """Every env secretKeyRef names a Secret and a key that these manifests define."""
    secrets, problems = _known_secrets(docs), []
    for where, path, template in _each_pod(docs):
        for cpath, container in containers(template):
            for i, env in enumerate(container.get("env") or []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if not ref or ref.get("optional"):
                    continue
                field = f"{path}.{cpath}.env[{i}].valueFrom.secretKeyRef"
                if ref.get("name") not in secrets:
                    problems.append(f"{where}: {field}: Secret {ref.get('name')!r} is not defined here")
                elif ref.get("key") not in secrets[ref["name"]]:
                    problems.append(f"{where}: {field}: Secret {ref['name']!r} has no key {ref.get('key')!r} "
                                    f"(it has {', '.join(sorted(secrets[ref['name']]))})")
    return problems


def check_pod_security(docs) -> list[str]:
    """Pod Security Standard "restricted": non-root, no escalation, caps dropped, seccomp set."""
    problems = []
    for where, path, template in _each_pod(docs):
        spec = template.get("spec") or {}
        pod_sc = spec.get("securityContext") or {}
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{where}: {path}.spec.{key}: not allowed under restricted")
        for i, volume in enumerate(spec.get("volumes") or []):
            kinds = set(volume) - {"name"}
            if not kinds <= ALLOWED_VOLUMES:
                problems.append(f"{where}: {path}.spec.volumes[{i}]: volume type {sorted(kinds - ALLOWED_VOLUMES)} "
                                "not allowed under restricted")
        if pod_sc.get("runAsUser") == 0:
            problems.append(f"{where}: {path}.spec.securityContext.runAsUser: 0 (root) not allowed")
        for cpath, c in containers(template):
            sc, field = c.get("securityContext") or {}, f"{where}: {path}.{cpath}.securityContext"
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                problems.append(f"{field}.runAsNonRoot: must be true (here or in the pod securityContext)")
            if sc.get("runAsUser") == 0:
                problems.append(f"{field}.runAsUser: 0 (root) not allowed")
            seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{field}.seccompProfile: must be RuntimeDefault or Localhost, got {seccomp!r}")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{field}.allowPrivilegeEscalation: must be false")
            if sc.get("privileged"):
                problems.append(f"{field}.privileged: not allowed")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{field}.capabilities.drop: must include ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                problems.append(f"{field}.capabilities.add: only NET_BIND_SERVICE is allowed")
            if any(p.get("hostPort") for p in c.get("ports") or []):
                problems.append(f"{where}: {path}.{cpath}.ports: hostPort not allowed")
    return problems


def check_rbac(docs) -> list[str]:
    """Namespaced Roles only, no wildcards, never bound to cluster-admin."""
    problems = []
    for rel, doc in docs:
        where, kind = label(rel, doc), doc.get("kind")
        if kind == "Role":
            for i, rule in enumerate(doc.get("rules") or []):
                for key in ("verbs", "resources", "apiGroups"):
                    if "*" in (rule.get(key) or []):
                        problems.append(f"{where}: rules[{i}].{key}: wildcard '*' not allowed (least privilege)")
                if "secrets" in (rule.get("resources") or []):
                    problems.append(f"{where}: rules[{i}].resources: access to secrets is not needed")
        if kind == "RoleBinding":
            ref = doc.get("roleRef") or {}
            if ref.get("name") == "cluster-admin" or ref.get("kind") == "ClusterRole":
                problems.append(f"{where}: roleRef: binds ClusterRole {ref.get('name')!r}; bind a namespaced Role")
    return problems


def check_rayjob_rules(docs) -> list[str]:
    """The RayJob combinations KubeRay 1.7's validation refuses, plus a required deadline."""
    problems = []
    for rel, doc in docs:
        if doc.get("kind") != "RayJob":
            continue
        where, spec = label(rel, doc), doc.get("spec") or {}
        name = (doc.get("metadata") or {}).get("name", "")
        if not RAYJOB_NAME.match(name):
            problems.append(f"{where}: metadata.name: a RayJob name must be a DNS-1035 label of at most 47 chars")
        if spec.get("clusterSelector") and spec.get("rayClusterSpec"):
            problems.append(f"{where}: spec.clusterSelector: set either clusterSelector or rayClusterSpec, not both")
        if spec.get("clusterSelector") and (spec.get("backoffLimit") or 0) > 0:
            problems.append(f"{where}: spec.backoffLimit: must be 0 with clusterSelector (KubeRay refuses retries)")
        if spec.get("clusterSelector") and spec.get("submissionMode") == "SidecarMode":
            problems.append(f"{where}: spec.submissionMode: SidecarMode does not work with clusterSelector")
        if (spec.get("ttlSecondsAfterFinished") or 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"{where}: spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes true")
        if spec.get("clusterSelector") and spec.get("shutdownAfterJobFinishes"):
            problems.append(f"{where}: spec.shutdownAfterJobFinishes: the selected cluster is not the job's to delete")
        deadline = spec.get("activeDeadlineSeconds")
        if not isinstance(deadline, int) or deadline <= 0:
            problems.append(f"{where}: spec.activeDeadlineSeconds: set a positive deadline so a hung job stops")
    return problems


RULES = (check_ray_versions, check_capacity, check_shm, check_secret_refs, check_pod_security,
         check_rbac, check_rayjob_rules)


def semantic_problems(docs) -> list[str]:
    """Every rule's problems, in rule order."""
    return [problem for rule in RULES for problem in rule(docs)]
