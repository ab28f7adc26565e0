#!/usr/bin/env bash
# Build the image the Ray pods run and load it into the containerd of each node.
#
# Usage: scripts/35-build-load-image.sh [ssh-destination...]
#    or: REGISTRY=registry.example:5000 scripts/35-build-load-image.sh
#
#   IMAGE      tag to build (default below = dtrain.k8s.DEFAULT_IMAGE; a test keeps them equal).
#              Keep the "-ray<version>" suffix: `dtrain k8s validate` checks it.
#   REGISTRY   push there instead of loading over ssh; then render with
#              `dtrain k8s render --image ${REGISTRY}/${IMAGE}`.
#   DRY_RUN=1  print the commands instead of running them.
#
# Without a registry the image is streamed to every node given (user@host, passwordless
# sudo) and imported into rke2's containerd; the manifests use imagePullPolicy IfNotPresent.
# Re-runnable: the build is cached and an import replaces the same tag.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "$0"

IMAGE="${IMAGE:-dtrain:0.1.0-ray2.60.0}"
CTR="/var/lib/rancher/rke2/bin/ctr --address /run/k3s/containerd/containerd.sock --namespace k8s.io"
ENGINE=""
for candidate in docker podman nerdctl; do
  if command -v "$candidate" >/dev/null 2>&1; then ENGINE="$candidate"; break; fi
done
[[ -n "$ENGINE" || "${DRY_RUN:-0}" == 1 ]] || die "need docker, podman or nerdctl to build"
ENGINE="${ENGINE:-docker}"
[[ -n "${REGISTRY:-}" || $# -gt 0 ]] || die "give ssh destinations of the nodes, or set REGISTRY (see --help)"

log "building ${IMAGE} with ${ENGINE}"
run "$ENGINE" build -t "${IMAGE}" "${SCRIPTS_DIR}/.."

if [[ -n "${REGISTRY:-}" ]]; then
  run "$ENGINE" tag "${IMAGE}" "${REGISTRY}/${IMAGE}"
  run "$ENGINE" push "${REGISTRY}/${IMAGE}"
  log "pushed. Now: dtrain k8s render --image ${REGISTRY}/${IMAGE}"
  exit 0
fi
for node in "$@"; do
  log "loading ${IMAGE} into ${node}"
  printf '+ %s save %s | ssh %s sudo %s images import -\n' "$ENGINE" "$IMAGE" "$node" "$CTR" >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    # shellcheck disable=SC2029  # CTR is meant to expand here, on the client side
    "$ENGINE" save "${IMAGE}" | ssh "$node" "sudo ${CTR} images import -"
  fi
done
log "done. Check on a node: sudo ${CTR} images ls | grep dtrain"
