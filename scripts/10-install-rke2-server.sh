#!/usr/bin/env bash
# Install rke2 as the Kubernetes control plane on THIS machine (run as root).
#
# Usage: RKE2_TOKEN=<secret> [RKE2_SERVER_ADDRESS=<ip>] scripts/10-install-rke2-server.sh
#
#   RKE2_TOKEN            join secret shared with the agents (e.g. `openssl rand -hex 32`).
#                         Keep it out of git; agents can also read it over ssh later.
#   RKE2_SERVER_ADDRESS   address agents and kubectl use (default: first IP of this host);
#                         it goes into the API server certificate (tls-san).
#   INSTALL_RKE2_VERSION  optional rke2 release (default: the installer's stable channel).
#   DRY_RUN=1             print the commands instead of running them.
#
# Re-runnable: the config is rewritten only when it changes, the installer is skipped
# when rke2 is already there, and `systemctl enable --now` is a no-op on a running server.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "$0"

need RKE2_TOKEN
RKE2_SERVER_ADDRESS="${RKE2_SERVER_ADDRESS:-$(hostname -I | awk '{print $1}')}"
need RKE2_SERVER_ADDRESS
setup_rke2 server 00-rke2-server-config.yaml.tmpl RKE2_TOKEN RKE2_SERVER_ADDRESS

if [[ "${DRY_RUN:-0}" != 1 ]]; then
  for _ in $(seq 1 60); do
    [[ -s /var/lib/rancher/rke2/server/node-token ]] && break
    sleep 5
  done
  [[ -s /var/lib/rancher/rke2/server/node-token ]] || die "rke2-server did not come up: journalctl -u rke2-server"
fi
log "done. Next:"
log "  export KUBECONFIG=/etc/rancher/rke2/rke2.yaml PATH=\$PATH:/var/lib/rancher/rke2/bin"
log "  kubectl get nodes"
log "  on each worker: RKE2_SERVER_ADDRESS=${RKE2_SERVER_ADDRESS} RKE2_TOKEN=... scripts/20-join-rke2-agent.sh"
