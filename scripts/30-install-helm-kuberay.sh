#!/usr/bin/env bash
# Install (or upgrade to) the pinned KubeRay operator with Helm.
#
# Usage: scripts/30-install-helm-kuberay.sh
#
#   KUBERAY_VERSION     chart and operator version (default below = dtrain.versions.KUBERAY_VERSION;
#                       a test keeps them equal).
#   KUBERAY_NAMESPACE   where the operator runs (default kuberay-system).
#   DRY_RUN=1           print the commands instead of running them.
#
# Needs helm and kubectl with KUBECONFIG set. Re-runnable: `helm upgrade --install`
# installs the first time and is a no-op when the same version is already there.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "$0"

KUBERAY_VERSION="${KUBERAY_VERSION:-1.7.0}"
KUBERAY_HELM_REPO="https://ray-project.github.io/kuberay-helm/"
KUBERAY_NAMESPACE="${KUBERAY_NAMESPACE:-kuberay-system}"
[[ "${DRY_RUN:-0}" == 1 ]] || { need_cmd helm kubectl; need KUBECONFIG; }

log "KubeRay operator ${KUBERAY_VERSION} into namespace ${KUBERAY_NAMESPACE}"
run helm repo add kuberay "${KUBERAY_HELM_REPO}" --force-update
run helm repo update kuberay
run helm upgrade --install kuberay-operator kuberay/kuberay-operator \
  --version "${KUBERAY_VERSION}" --namespace "${KUBERAY_NAMESPACE}" --create-namespace --wait --timeout 5m
run kubectl wait --for=condition=Established --timeout=120s \
  crd/rayclusters.ray.io crd/rayjobs.ray.io
run kubectl get pods -n "${KUBERAY_NAMESPACE}" -l app.kubernetes.io/name=kuberay-operator
log "done. Next: scripts/40-create-minio-secret.sh, then kubectl apply -f manifests/40-raycluster.yaml"
