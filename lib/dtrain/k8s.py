"""Kubernetes manifests for the lab: render them, list the commands a user types.

``render()`` is the single source of the RayCluster, the RayJob and their RBAC and
Secret template; the files committed under ``manifests/`` are exactly its output with
the defaults (a test keeps them in sync). Validation lives in :mod:`dtrain.k8s_validate`,
talking to a real API server in :mod:`dtrain.k8s_api`.

Choices, and why:
* The pods run OUR image ``dtrain:<package>-ray<RAY_VERSION>`` (Dockerfile: FROM the
  pinned ``rayproject/ray`` image + torch CPU + this package), so the driver and the
  workers import ``dtrain`` without a runtime_env download; its tag carries the Ray
  version so the validator can check image == rayVersion == installed Ray.
* One worker pod per Kubernetes worker node (topology spread on the hostname, never on
  the control plane), each owning ``cpus_per_worker_node`` CPUs: 2 x 4 = 8 training
  workers of 1 CPU. The head runs ``num-cpus 0`` so no training lands on it.
* The RayJob targets that long-lived RayCluster through ``clusterSelector`` (see the
  comment at the top of 50-rayjob.yaml).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from dtrain.config import S3_ENV_KEYS
from dtrain.errors import ManifestError
from dtrain.k8s_validate import format_quantity, parse_quantity
from dtrain.versions import KUBERAY_CHART, KUBERAY_HELM_REPO, KUBERAY_VERSION, PACKAGE_VERSION, RAY_VERSION

DEFAULT_IMAGE = f"dtrain:{PACKAGE_VERSION}-ray{RAY_VERSION}"
CLUSTER_NAME = "dtrain-cluster"
JOB_NAME = "dtrain-train"
WORKER_GROUP = "cpu-workers"
SECRET_NAME = "minio-credentials"
RAY_SERVICE_ACCOUNT = "dtrain-ray"        # the Ray pods: no Kubernetes API access at all
CLIENT_SERVICE_ACCOUNT = "dtrain-client"  # who drives RayClusters/RayJobs (CI, a notebook pod)
HEAD_CPU, HEAD_MEMORY = "2", "4Gi"
SUBMITTER_CPU, SUBMITTER_MEMORY = "500m", "1Gi"
# The dashboard agent of Ray >= 2.53 serves /api/healthz (raylet + local GCS), exempt from
# token auth; KubeRay itself probes it for those versions instead of the older pair
# :52365/api/local_raylet_healthz + :8265/api/gcs_healthz.
AGENT_PORT, HEALTH_PATH = 52365, "/api/healthz"
SHM_FRACTION = 4            # /dev/shm = memory / 4 ...
OBJECT_STORE_OF_SHM = 0.8   # ... and the object store 80% of it, so it never spills to /tmp
JOB_DEADLINE_S = 3600
NODE_CONFIG_PREFIX = "0"    # 00-/01- files are rke2 node configs, not API objects
RENDERED_FILES = ("20-serviceaccount-rbac.yaml", "30-minio-credentials.secret.yaml.tmpl",
                  "40-raycluster.yaml", "50-rayjob.yaml")

POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                      "runAsNonRoot": True}


def entrypoint(dataset: str = "fashion-mnist", workers: int = 8, epochs: int = 2) -> str:
    """The RayJob's driver command: built by the same function ``dtrain train`` submits locally."""
    from dtrain import train

    return shlex.join(train.driver_command(dataset, workers, epochs))


def _labels(component: str) -> dict:
    return {"app.kubernetes.io/name": "dtrain", "app.kubernetes.io/instance": CLUSTER_NAME,
            "app.kubernetes.io/component": component}


def _resources(cpu: str, memory: str) -> dict:
    # requests == limits: Guaranteed QoS, and Ray sizes itself from the limits.
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}


def _s3_env() -> list[dict]:
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key}}}
            for key in S3_ENV_KEYS]


def _probe(initial_delay: int, period: int, timeout: int, failures: int) -> dict:
    return {"httpGet": {"path": HEALTH_PATH, "port": AGENT_PORT}, "initialDelaySeconds": initial_delay,
            "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": failures}


def _shm_sizes(memory: str) -> tuple[str, str]:
    """(/dev/shm sizeLimit, object-store-memory bytes) for a pod with ``memory``."""
    shm = parse_quantity(memory, "memory") // SHM_FRACTION
    shm -= shm % (1 << 20)  # whole MiB
    if shm < 128 << 20:
        raise ManifestError(f"memory {memory!r} is too small: /dev/shm would be under 128Mi")
    return format_quantity(shm), str(int(shm * OBJECT_STORE_OF_SHM))


def _ray_pod(component: str, image: str, cpu: str, memory: str, ports: list[dict]) -> dict:
    """A Pod Security "restricted" pod template running one Ray container."""
    shm, _ = _shm_sizes(memory)
    container = {
        "name": f"ray-{component}", "image": image, "imagePullPolicy": "IfNotPresent",
        "resources": _resources(cpu, memory), "env": _s3_env(), **({"ports": ports} if ports else {}),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": CONTAINER_SECURITY,
        "readinessProbe": _probe(10, 5, 2, 12),
        "livenessProbe": _probe(30, 10, 5, 12),
    }
    return {"metadata": {"labels": _labels(f"ray-{component}")},
            "spec": {"serviceAccountName": RAY_SERVICE_ACCOUNT, "automountServiceAccountToken": False,
                     "securityContext": POD_SECURITY, "containers": [container],
                     # Memory-backed: the object store needs a tmpfs; Docker's 64Mi default breaks it.
                     "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]}}


def raycluster(workers: int = 8, cpus_per_worker_node: int = 4, memory: str = "8Gi",
               image: str = DEFAULT_IMAGE, namespace: str = "default", worker_nodes: int = 2) -> dict:
    """The RayCluster: a CPU-less head plus one worker pod per Kubernetes worker node."""
    if workers < 1 or cpus_per_worker_node < 1 or worker_nodes < 1:
        raise ManifestError("--workers, --cpus and --worker-nodes must be at least 1")
    if workers > worker_nodes * cpus_per_worker_node:
        raise ManifestError(f"--workers {workers} exceeds worker nodes x CPUs = "
                            f"{worker_nodes} x {cpus_per_worker_node}; training would wait forever")
    head = _ray_pod("head", image, HEAD_CPU, HEAD_MEMORY,
                    [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}])
    # Keep the head off the worker nodes when the control plane accepts pods.
    head["spec"]["affinity"] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchExpressions": [
            {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}}]}}
    worker = _ray_pod("worker", image, str(cpus_per_worker_node), memory, [])
    worker["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}]}]}}}
    worker["spec"]["topologySpreadConstraints"] = [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": _labels("ray-worker")}}]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": CLUSTER_NAME, "namespace": namespace, "labels": _labels("ray-cluster")},
        "spec": {
            "rayVersion": RAY_VERSION,
            "enableInTreeAutoscaling": False,
            # KubeRay generates a Secret <cluster name>/auth_token and sets RAY_AUTH_MODE/TOKEN in every pod.
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                "serviceType": "ClusterIP",
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                   "object-store-memory": _shm_sizes(HEAD_MEMORY)[1]},
                "template": head,
            },
            "workerGroupSpecs": [{
                "groupName": WORKER_GROUP, "replicas": worker_nodes,
                "minReplicas": worker_nodes, "maxReplicas": worker_nodes,
                "rayStartParams": {"num-cpus": str(cpus_per_worker_node),
                                   "object-store-memory": _shm_sizes(memory)[1]},
                "template": worker,
            }],
        },
    }


def rayjob(dataset: str = "fashion-mnist", workers: int = 8, epochs: int = 2, image: str = DEFAULT_IMAGE,
           namespace: str = "default") -> dict:
    """The RayJob that submits the training driver to the RayCluster above."""
    token_env = [{"name": "RAY_AUTH_MODE", "value": "token"},
                 {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": CLUSTER_NAME,
                                                                            "key": "auth_token"}}}]
    submitter = {"name": "ray-job-submitter", "image": image, "imagePullPolicy": "IfNotPresent",
                 "resources": _resources(SUBMITTER_CPU, SUBMITTER_MEMORY), "env": token_env,
                 "securityContext": CONTAINER_SECURITY}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": JOB_NAME, "namespace": namespace, "labels": _labels("ray-job")},
        "spec": {
            "entrypoint": entrypoint(dataset, workers, epochs),
            "clusterSelector": {"ray.io/cluster": CLUSTER_NAME},
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": False,
            "ttlSecondsAfterFinished": 0,
            "activeDeadlineSeconds": JOB_DEADLINE_S,
            "backoffLimit": 0,
            "submitterPodTemplate": {
                "metadata": {"labels": _labels("ray-job-submitter")},
                "spec": {"restartPolicy": "Never", "serviceAccountName": RAY_SERVICE_ACCOUNT,
                         "automountServiceAccountToken": False, "securityContext": POD_SECURITY,
                         "containers": [submitter]}},
        },
    }


def rbac(namespace: str = "default") -> list[dict]:
    """Two ServiceAccounts: one for the Ray pods (no rights), one for a client that manages
    RayClusters/RayJobs and reads pods and logs in this namespace only."""
    meta = {"namespace": namespace, "labels": _labels("rbac")}
    rules = [
        {"apiGroups": ["ray.io"], "resources": ["rayclusters", "rayjobs"],
         "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
        {"apiGroups": ["ray.io"], "resources": ["rayclusters/status", "rayjobs/status"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods", "services", "events"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": RAY_SERVICE_ACCOUNT, **meta},
         "automountServiceAccountToken": False},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": CLIENT_SERVICE_ACCOUNT, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": CLIENT_SERVICE_ACCOUNT, **meta}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": CLIENT_SERVICE_ACCOUNT, **meta},
         "subjects": [{"kind": "ServiceAccount", "name": CLIENT_SERVICE_ACCOUNT, "namespace": namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CLIENT_SERVICE_ACCOUNT}},
    ]


def secret_template(namespace: str = "default") -> dict:
    """The MinIO credentials as ${VAR} placeholders; scripts/40-create-minio-secret.sh fills them."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": SECRET_NAME, "namespace": namespace, "labels": _labels("s3-credentials")},
            "stringData": {key: f"${{{key}}}" for key in S3_ENV_KEYS}}


HEADERS = {
    "20-serviceaccount-rbac.yaml": """\
# Least privilege. dtrain-ray: the Ray pods, which never call the Kubernetes API (no token
# mounted, no Role). dtrain-client: whoever drives the lab from inside the cluster (a CI or
# notebook pod); it manages RayClusters/RayJobs and reads pods, logs and submitter Jobs in
# this namespace only: no wildcard, no Secret access, no ClusterRole.
""",
    "30-minio-credentials.secret.yaml.tmpl": """\
# TEMPLATE, never applied as is: scripts/40-create-minio-secret.sh builds the Secret from
# your environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION),
# or: envsubst < this-file | kubectl apply -f -
# HTTPS with a private CA (AWS_CA_BUNDLE): put the CA in a Secret or ConfigMap, mount it in
# the Ray pods and set AWS_CA_BUNDLE to the mounted path; it is not wired by default.
""",
    "40-raycluster.yaml": """\
# Rendered by `dtrain k8s render` (defaults); edit lib/dtrain/k8s.py, not this file.
# Head: num-cpus 0 (driver only). One worker pod per Kubernetes worker node (defaults:
# 2 pods x 4 CPUs = 8 training workers of 1 CPU), requests == limits. /dev/shm is a tmpfs
# of memory/4 (it counts against the pod's memory limit) holding the object store.
# Every pod is Pod Security "restricted". Token auth: KubeRay makes Secret <cluster name>.
""",
    "50-rayjob.yaml": """\
# Rendered by `dtrain k8s render` (defaults); edit lib/dtrain/k8s.py, not this file.
# clusterSelector, not an embedded rayClusterSpec: the RayCluster of 40-raycluster.yaml
# stays up (dashboard, several jobs, no 1-2 min of pod start per job). KubeRay therefore
# requires backoffLimit 0 and never deletes that cluster: shutdownAfterJobFinishes false,
# ttlSecondsAfterFinished 0. submissionMode K8sJobMode: a submitter Job runs `ray job submit`
# and follows the driver, so `kubectl logs job/dtrain-train` shows the training output
# (HTTPMode has no pod to read logs from). activeDeadlineSeconds stops a hung job.
# The submitter gets the token KubeRay generated for the cluster (Secret dtrain-cluster).
""",
}


def documents(workers: int = 8, cpus_per_worker_node: int = 4, memory: str = "8Gi",
              image: str = DEFAULT_IMAGE, dataset: str = "fashion-mnist", epochs: int = 2,
              namespace: str = "default", worker_nodes: int = 2) -> dict[str, list[dict]]:
    """File name -> the objects it holds, in apply order."""
    files = {
        "20-serviceaccount-rbac.yaml": rbac(namespace),
        "30-minio-credentials.secret.yaml.tmpl": [secret_template(namespace)],
        "40-raycluster.yaml": [raycluster(workers, cpus_per_worker_node, memory, image, namespace,
                                          worker_nodes)],
        "50-rayjob.yaml": [rayjob(dataset, workers, epochs, image, namespace)],
    }
    if namespace != "default":
        # A namespace of our own enforces Pod Security "restricted" for everything in it.
        levels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
        files = {"10-namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": namespace, "labels": levels}}], **files}
    return files


class _Dumper(yaml.SafeDumper):
    """Writes shared dicts out in full: anchors (&id001) would puzzle readers and kubectl diff."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump(name: str, docs: list[dict]) -> str:
    """The file text: header comment, then the YAML documents in a stable order."""
    body = "---\n".join(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110) for doc in docs)
    return HEADERS.get(name, "") + body


def render(workers: int = 8, cpus_per_worker_node: int = 4, memory: str = "8Gi", image: str = DEFAULT_IMAGE,
           dataset: str = "fashion-mnist", epochs: int = 2, namespace: str = "default", worker_nodes: int = 2,
           out_dir: str | Path = "manifests") -> list[Path]:
    """Write the rendered manifests into ``out_dir``; returns the paths written.

    Everything is rendered in memory first, so bad input leaves no file half-written."""
    if epochs < 1:
        raise ManifestError("--epochs must be at least 1")
    texts = {name: dump(name, docs) for name, docs in documents(
        workers, cpus_per_worker_node, memory, image, dataset, epochs, namespace, worker_nodes).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in texts.items():
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths


def versions() -> dict[str, str]:
    """The pins the scripts and notebooks need, from dtrain.versions."""
    from dtrain import versions as v

    return {"RAY_VERSION": v.RAY_VERSION, "RAY_IMAGE": v.RAY_IMAGE, "KUBERAY_VERSION": KUBERAY_VERSION,
            "KUBERAY_CHART": KUBERAY_CHART, "KUBERAY_HELM_REPO": KUBERAY_HELM_REPO,
            "MINIO_IMAGE": v.MINIO_IMAGE, "TORCH_VERSION": v.TORCH_VERSION, "DTRAIN_IMAGE": DEFAULT_IMAGE}


# Every command a user types on a real cluster, in order: (step, where, command).
# Notebooks 01/02 print this list; `dtrain k8s commands` prints it too.
COMMANDS: list[tuple[str, str, str]] = [
    ("Install the rke2 server", "control plane (root)",
     "RKE2_TOKEN=$(openssl rand -hex 32) scripts/10-install-rke2-server.sh"),
    ("Join each worker node", "each worker (root)",
     "RKE2_SERVER_ADDRESS=<control-plane-ip> RKE2_SERVER_SSH=root@<control-plane-ip> "
     "scripts/20-join-rke2-agent.sh"),
    ("Point kubectl at the cluster", "control plane",
     "export KUBECONFIG=/etc/rancher/rke2/rke2.yaml PATH=$PATH:/var/lib/rancher/rke2/bin"),
    ("Check the three nodes are Ready", "control plane", "kubectl get nodes -o wide"),
    ("Install the KubeRay operator", "control plane", "scripts/30-install-helm-kuberay.sh"),
    ("Check the operator runs", "control plane", "kubectl get pods -l app.kubernetes.io/name=kuberay-operator"),
    ("Build the image and load it on every node", "build machine",
     f"scripts/35-build-load-image.sh <node> <node> <node>   # image {DEFAULT_IMAGE}"),
    ("Validate the manifests", "anywhere", "dtrain k8s validate manifests/"),
    ("Warn about Pod Security violations", "control plane",
     "kubectl label namespace default pod-security.kubernetes.io/warn=restricted --overwrite"),
    ("Create the ServiceAccounts and RBAC", "control plane", "kubectl apply -f manifests/20-serviceaccount-rbac.yaml"),
    ("Create the MinIO credentials Secret", "control plane",
     "set -a; . ./minio.env; set +a; scripts/40-create-minio-secret.sh"),
    ("Create the RayCluster", "control plane", "kubectl apply -f manifests/40-raycluster.yaml"),
    ("Wait for the head and both workers", "control plane",
     f"kubectl wait raycluster/{CLUSTER_NAME} --for=condition=RayClusterProvisioned --timeout=600s"),
    ("See where the pods landed", "control plane", f"kubectl get pods -l ray.io/cluster={CLUSTER_NAME} -o wide"),
    ("Submit the training job", "control plane", "kubectl apply -f manifests/50-rayjob.yaml"),
    ("Follow the job", "control plane", f"kubectl get rayjob {JOB_NAME} -w"),
    ("Read the training output", "control plane", f"kubectl logs -f job/{JOB_NAME}"),
    ("Explain a stuck job", "control plane", f"kubectl describe rayjob {JOB_NAME}"),
    ("Open the Ray dashboard", "your laptop", "scripts/50-port-forward-dashboard.sh   # http://127.0.0.1:8265"),
    ("Delete the job", "control plane", f"kubectl delete rayjob {JOB_NAME}"),
    ("Delete the cluster", "control plane",
     "kubectl delete -f manifests/40-raycluster.yaml -f manifests/20-serviceaccount-rbac.yaml && "
     f"kubectl delete secret {SECRET_NAME}"),
    ("Remove the operator", "control plane", "helm uninstall kuberay-operator"),
]


def format_commands() -> str:
    """COMMANDS as numbered shell comments plus commands, ready to paste."""
    return "\n".join(f"# {i}. {step} ({where})\n{cmd}" for i, (step, where, cmd) in enumerate(COMMANDS, 1))
