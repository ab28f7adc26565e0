#!/usr/bin/env bash
# Forward the Ray dashboard (and Jobs API) of the RayCluster to this machine.
#
# Usage: scripts/50-port-forward-dashboard.sh            then open http://127.0.0.1:8265
#
#   CLUSTER      RayCluster name (default dtrain-cluster)
#   NAMESPACE    default "default"
#   LOCAL_PORT   default 8265
#   DRY_RUN=1    print the commands instead of running them.
#
# The cluster uses token authentication: the dashboard asks for the token, which KubeRay
# keeps in the Secret named after the cluster. This script prints the command to read it,
# not the token. Stops with Ctrl-C; safe to re-run.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "$0"

CLUSTER="${CLUSTER:-dtrain-cluster}"
NAMESPACE="${NAMESPACE:-default}"
LOCAL_PORT="${LOCAL_PORT:-8265}"
[[ "${DRY_RUN:-0}" == 1 ]] || { need_cmd kubectl; need KUBECONFIG; }

log "token: kubectl get secret ${CLUSTER} -n ${NAMESPACE} -o jsonpath='{.data.auth_token}' | base64 -d"
log "dashboard: http://127.0.0.1:${LOCAL_PORT}   (Ctrl-C to stop)"
run kubectl port-forward -n "${NAMESPACE}" "service/${CLUSTER}-head-svc" "${LOCAL_PORT}:8265"
