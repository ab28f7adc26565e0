"""The one place where versions that must agree with each other are pinned.

Python's Ray (requirements.lock), the container image the RayCluster runs, the
``rayVersion`` field KubeRay reads and the operator chart all have to match: a client
and a cluster on different Ray versions refuse to talk to each other. The Makefile,
the manifest renderer, the Dockerfile check and the tests all read these constants.
"""

PACKAGE_VERSION = "0.1.0"

RAY_VERSION = "2.60.0"
PYTHON_VERSION = "3.11"
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-py{PYTHON_VERSION.replace('.', '')}-cpu"

KUBERAY_VERSION = "1.7.0"
KUBERAY_CHART = "kuberay/kuberay-operator"
KUBERAY_HELM_REPO = "https://ray-project.github.io/kuberay-helm/"

# MinIO's community edition ships as source; `go install` builds this exact commit.
MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
# The container image used by the docker-compose and StatefulSet alternatives.
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"

TORCH_VERSION = "2.13.0"
