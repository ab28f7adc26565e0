#!/usr/bin/env bash
# Join THIS machine to the rke2 cluster as a worker node (run as root).
#
# Usage: RKE2_SERVER_ADDRESS=<server ip> RKE2_TOKEN=<secret> scripts/20-join-rke2-agent.sh
#    or: RKE2_SERVER_ADDRESS=<server ip> RKE2_SERVER_SSH=<user@server> scripts/20-join-rke2-agent.sh
#
#   RKE2_SERVER_ADDRESS   the control plane's address (the agent joins https://<it>:9345).
#   RKE2_TOKEN            the join token; when unset it is read over ssh from the server's
#                         /var/lib/rancher/rke2/server/node-token (needs RKE2_SERVER_SSH).
#   RKE2_SERVER_SSH       ssh destination of the server, used only to read the token.
#   INSTALL_RKE2_VERSION  optional; use the server's version.
#   DRY_RUN=1             print the commands instead of running them.
#
# Re-runnable like 10-install-rke2-server.sh. Check from the server: kubectl get nodes.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "$0"

need RKE2_SERVER_ADDRESS
if [[ -z "${RKE2_TOKEN:-}" ]]; then
  need RKE2_SERVER_SSH
  need_cmd ssh
  log "reading the join token from ${RKE2_SERVER_SSH}"
  RKE2_TOKEN="$(ssh "${RKE2_SERVER_SSH}" sudo cat /var/lib/rancher/rke2/server/node-token)"
  [[ -n "$RKE2_TOKEN" ]] || die "empty token from ${RKE2_SERVER_SSH}"
fi
setup_rke2 agent 01-rke2-agent-config.yaml.tmpl RKE2_SERVER_ADDRESS RKE2_TOKEN
log "done. On the server: kubectl get nodes -o wide   (this node turns Ready in a minute or two)"
