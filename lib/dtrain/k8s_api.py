"""Apply, inspect and delete the lab's manifests on a real cluster.

Uses the ``kubernetes`` Python client with the kubeconfig named by ``KUBECONFIG``
(on rke2: /etc/rancher/rke2/rke2.yaml): CustomObjectsApi for ray.io/v1 RayClusters and
RayJobs, the typed APIs for the core kinds, CoreV1 for pods and their logs. What
``kubectl apply -f``/``get``/``logs``/``delete -f`` do, callable from notebooks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from dtrain.errors import ClusterError, ConfigError, ManifestError
from dtrain.k8s_validate import load_documents, validate_documents

RAY_GROUP, RAY_VERSION_API = "ray.io", "v1"
RAY_PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
# kind -> (typed API class, method suffix, namespaced)
CORE_APIS = {
    "Namespace": ("CoreV1Api", "namespace", False),
    "ServiceAccount": ("CoreV1Api", "service_account", True),
    "Secret": ("CoreV1Api", "secret", True),
    "Service": ("CoreV1Api", "service", True),
    "Role": ("RbacAuthorizationV1Api", "role", True),
    "RoleBinding": ("RbacAuthorizationV1Api", "role_binding", True),
    "StatefulSet": ("AppsV1Api", "stateful_set", True),
}
MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "dtrain"


def api_client():
    """A client for the cluster in $KUBECONFIG; ConfigError when there is none."""
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if not path:
        raise ConfigError("KUBECONFIG is not set: export KUBECONFIG=/etc/rancher/rke2/rke2.yaml "
                          "(or the kubeconfig of your cluster)")
    if not Path(path).is_file():
        raise ConfigError(f"KUBECONFIG points at {path}, which does not exist")
    from kubernetes import config as kube_config

    try:
        return kube_config.new_client_from_config(config_file=path)
    except Exception as exc:  # the loader raises several unrelated types
        raise ConfigError(f"KUBECONFIG {path} cannot be used: {exc}") from exc


def _call(fn, *args, missing_ok: bool = False, **kwargs):
    """Run one API call; API and network errors become one-line ClusterErrors.
    Returns None for 404 when ``missing_ok``."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as exc:
        if missing_ok and exc.status == 404:
            return None
        error = ClusterError(f"Kubernetes API refused {fn.__name__}: {exc.status} {exc.reason}")
        error.status = exc.status  # lets apply() tell "already exists" from real failures
        raise error from exc
    except HTTPError as exc:
        raise ClusterError(f"cannot reach the Kubernetes API server: {exc}") from exc


def _is_conflict(exc: ClusterError) -> bool:
    return getattr(exc, "status", None) == 409


class _Target:
    """The API methods for one object, whatever its kind."""

    def __init__(self, client, doc: dict):
        from kubernetes import client as k8s

        meta = doc.get("metadata") or {}
        self.kind, self.name, self.doc = doc["kind"], meta["name"], doc
        self.namespace = meta.get("namespace") or "default"
        if self.kind in RAY_PLURALS:
            api = k8s.CustomObjectsApi(client)
            where = (RAY_GROUP, RAY_VERSION_API, self.namespace, RAY_PLURALS[self.kind])
            self.create = lambda: api.create_namespaced_custom_object(*where, doc, field_manager=FIELD_MANAGER)
            self.patch = lambda: api.patch_namespaced_custom_object(*where, self.name, doc,
                                                                    field_manager=FIELD_MANAGER)
            self.delete = lambda: api.delete_namespaced_custom_object(*where, self.name)
            return
        class_name, suffix, namespaced = CORE_APIS[self.kind]
        api = getattr(k8s, class_name)(client)
        scope = f"namespaced_{suffix}" if namespaced else suffix
        ns = (self.namespace,) if namespaced else ()
        self.create = lambda: getattr(api, f"create_{scope}")(*ns, doc, field_manager=FIELD_MANAGER)
        self.patch = lambda: getattr(api, f"patch_{scope}")(self.name, *ns, doc, field_manager=FIELD_MANAGER,
                                                            _content_type=MERGE_PATCH)
        self.delete = lambda: getattr(api, f"delete_{scope}")(self.name, *ns)


def _objects(folder: str | Path) -> list[dict]:
    """The objects ``apply`` sends: the folder's own *.yaml files, validated first.
    Templates (*.tmpl, filled by the scripts) and the alternatives in sub-folders stay out."""
    docs = load_documents(folder)
    problems = validate_documents(docs)
    if problems:
        raise ManifestError(problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return [doc for rel, doc in docs if "/" not in rel and rel.endswith((".yaml", ".yml"))]


def apply(folder: str | Path = "manifests") -> list[str]:
    """Create each object, or merge-patch it when it exists; returns 'created Kind name' lines."""
    client, done = api_client(), []
    for doc in _objects(folder):
        target = _Target(client, doc)
        try:
            _call(target.create)
            done.append(f"created {target.kind} {target.name}")
        except ClusterError as exc:
            if not _is_conflict(exc):
                raise
            _call(target.patch)
            done.append(f"configured {target.kind} {target.name}")
    return done


def delete(folder: str | Path = "manifests") -> list[str]:
    """Delete the objects of ``folder`` in reverse order; absent ones are reported, not errors."""
    client, done = api_client(), []
    for doc in reversed(_objects(folder)):
        target = _Target(client, doc)
        gone = _call(target.delete, missing_ok=True)
        done.append(f"{'deleted' if gone is not None else 'absent'} {target.kind} {target.name}")
    return done


def _get_ray(client, kind: str, name: str, namespace: str) -> dict | None:
    from kubernetes import client as k8s

    api = k8s.CustomObjectsApi(client)
    return _call(api.get_namespaced_custom_object, RAY_GROUP, RAY_VERSION_API, namespace, RAY_PLURALS[kind],
                 name, missing_ok=True)


def _pods(client, namespace: str, labels: dict[str, str]) -> list:
    """Pods carrying all ``labels`` (filtered here as well, whatever the server did)."""
    from kubernetes import client as k8s

    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    pods = _call(k8s.CoreV1Api(client).list_namespaced_pod, namespace, label_selector=selector).items
    return [p for p in pods if labels.items() <= (p.metadata.labels or {}).items()]


def _pod_rows(pods) -> list[dict]:
    return [{"name": p.metadata.name, "phase": p.status.phase if p.status else None,
             "node": p.spec.node_name if p.spec else None} for p in pods]


def status(name: str, namespace: str = "default") -> dict:
    """State of a RayJob or RayCluster called ``name`` plus its pods, as a flat dict."""
    client = api_client()
    job = _get_ray(client, "RayJob", name, namespace)
    if job is not None:
        st = job.get("status") or {}
        cluster = st.get("rayClusterName") or (job["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
        return {"kind": "RayJob", "name": name, "namespace": namespace, "jobStatus": st.get("jobStatus"),
                "jobDeploymentStatus": st.get("jobDeploymentStatus"), "message": st.get("message"),
                "rayClusterName": cluster, "startTime": st.get("startTime"), "endTime": st.get("endTime"),
                "submitterPods": _pod_rows(_pods(client, namespace, {"job-name": name}))}
    cluster = _get_ray(client, "RayCluster", name, namespace)
    if cluster is None:
        raise ClusterError(f"no RayJob or RayCluster named {name!r} in namespace {namespace!r}")
    st = cluster.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
    return {"kind": "RayCluster", "name": name, "namespace": namespace, "state": st.get("state"),
            "readyWorkerReplicas": st.get("readyWorkerReplicas"),
            "desiredWorkerReplicas": st.get("desiredWorkerReplicas"), "desiredCPU": st.get("desiredCPU"),
            "conditions": conditions, "pods": _pod_rows(_pods(client, namespace, {"ray.io/cluster": name}))}


def logs(job: str, namespace: str = "default", follow: bool = False) -> Iterator[str]:
    """The driver output of a RayJob: from its submitter pod (K8sJobMode), else from the head.

    Yields text chunks; with ``follow`` it keeps streaming until the pod ends."""
    from kubernetes import client as k8s

    client = api_client()
    rayjob = _get_ray(client, "RayJob", job, namespace)
    if rayjob is None:
        raise ClusterError(f"no RayJob named {job!r} in namespace {namespace!r}")
    pods = _pods(client, namespace, {"job-name": job})
    if not pods:
        cluster = (rayjob.get("status") or {}).get("rayClusterName") or \
            (rayjob["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
        pods = _pods(client, namespace, {"ray.io/cluster": cluster, "ray.io/node-type": "head"})
    if not pods:
        raise ClusterError(f"RayJob {job!r} has no submitter or head pod yet: "
                           f"try 'kubectl describe rayjob {job}'")
    pod = max(pods, key=lambda p: str(p.metadata.creation_timestamp or ""))
    response = _call(k8s.CoreV1Api(client).read_namespaced_pod_log, pod.metadata.name, namespace,
                     follow=follow, _preload_content=False)
    for chunk in response.stream(1024) if follow else [response.data]:
        yield chunk.decode(errors="replace")
