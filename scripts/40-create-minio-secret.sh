#!/usr/bin/env bash
# Create or update the Secret minio-credentials that every Ray pod reads.
#
# Usage: set -a; . ./minio.env; set +a; scripts/40-create-minio-secret.sh
#
#   AWS_ENDPOINT_URL       e.g. http://<minio host>:9000 (in-cluster MinIO:
#                          http://minio.default.svc.cluster.local:9000)
#   AWS_ACCESS_KEY_ID      MinIO access key
#   AWS_SECRET_ACCESS_KEY  MinIO secret key
#   AWS_REGION             optional, default us-east-1
#   AWS_CA_BUNDLE          optional path of a private CA (HTTPS MinIO): stored as key ca.crt;
#                          mount it in the pods and point AWS_CA_BUNDLE at it (not wired by default).
#   NAMESPACE              optional, default "default"
#   DRY_RUN=1              print the commands instead of running them.
#
# The values go through a mode-600 temporary env file, never the command line (where
# `ps` would show them), and are never printed. Re-runnable: create --dry-run | apply.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "$0"

need AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
[[ "$AWS_ENDPOINT_URL" =~ ^https?:// ]] || die "AWS_ENDPOINT_URL must start with http:// or https://"
AWS_REGION="${AWS_REGION:-us-east-1}"
NAMESPACE="${NAMESPACE:-default}"
[[ "${DRY_RUN:-0}" == 1 ]] || need_cmd kubectl

envfile="$(umask 077 && mktemp)"
trap 'rm -f "$envfile"' EXIT
printf '%s=%s\n' AWS_ENDPOINT_URL "$AWS_ENDPOINT_URL" AWS_ACCESS_KEY_ID "$AWS_ACCESS_KEY_ID" \
  AWS_SECRET_ACCESS_KEY "$AWS_SECRET_ACCESS_KEY" AWS_REGION "$AWS_REGION" >"$envfile"
extra=()
if [[ -n "${AWS_CA_BUNDLE:-}" ]]; then
  [[ -f "$AWS_CA_BUNDLE" ]] || die "AWS_CA_BUNDLE=${AWS_CA_BUNDLE} is not a file"
  extra+=(--from-file=ca.crt="$AWS_CA_BUNDLE")
fi

log "Secret minio-credentials in namespace ${NAMESPACE} -> ${AWS_ENDPOINT_URL}"
printf '+ kubectl create secret generic minio-credentials -n %s --from-env-file=<temp> %s --dry-run=client -o yaml | kubectl apply -f -\n' \
  "$NAMESPACE" "${extra[*]:-}" >&2
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  kubectl create secret generic minio-credentials -n "$NAMESPACE" --from-env-file="$envfile" \
    "${extra[@]}" --dry-run=client -o yaml | kubectl apply -f -
  kubectl label secret minio-credentials -n "$NAMESPACE" app.kubernetes.io/name=dtrain --overwrite >/dev/null
fi
log "done. Keys: AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION"
