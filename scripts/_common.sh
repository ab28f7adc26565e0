#!/usr/bin/env bash
# Helpers sourced by the numbered cluster scripts; not meant to be run on its own.
# DRY_RUN=1 prints every command instead of running it (the tests use it).

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MANIFESTS_DIR="$(cd "${SCRIPTS_DIR}/../manifests" && pwd)"
export SCRIPTS_DIR MANIFESTS_DIR

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# run CMD ARGS...: show the command, then run it (unless DRY_RUN=1).
run() {
  printf '+ %s\n' "$*" >&2
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

# show_help FILE: print the comment block at the top of FILE (after the shebang).
show_help() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$1"
  exit 0
}

# need VAR...: stop with a message naming the first unset variable.
need() {
  local var
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || die "${var} is not set (see --help)"
  done
}

# need_cmd CMD...: stop when a command is missing.
need_cmd() {
  local cmd
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || die "'${cmd}' not found in PATH"
  done
}

# render_template FILE VAR...: FILE with each ${VAR} replaced by its value (envsubst, in bash).
render_template() {
  local file="$1" text var
  shift
  text="$(<"$file")"
  for var in "$@"; do
    # The replacement is quoted so "&" in a value stays literal (bash 5.2 patsub_replacement).
    text="${text//"\${${var}}"/"${!var}"}"
  done
  printf '%s\n' "$text"
}

# install_file MODE DEST: write stdin to DEST with MODE, only when the content changed.
install_file() {
  local mode="$1" dest="$2" tmp
  tmp="$(mktemp)"
  cat >"$tmp"
  if [[ -f "$dest" ]] && cmp -s "$tmp" "$dest"; then
    log "${dest} unchanged"
    rm -f "$tmp"
    return 0
  fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    log "would write ${dest} (mode ${mode})"
    rm -f "$tmp"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  install -m "$mode" "$tmp" "$dest"
  rm -f "$tmp"
  log "wrote ${dest}"
}

# setup_rke2 server|agent TEMPLATE VAR...: as root, write /etc/rancher/rke2/config.yaml from a
# manifests/ template (mode 600: it holds the join token), run rke2's installer once (re-runs
# skip it; INSTALL_RKE2_VERSION pins it) and enable the systemd unit.
setup_rke2() {
  local type="$1" template="$2"
  shift 2
  [[ "${DRY_RUN:-0}" == 1 || "$(id -u)" == 0 ]] || die "run as root (sudo -E $0)"
  log "writing /etc/rancher/rke2/config.yaml (rke2 ${type}, server ${RKE2_SERVER_ADDRESS})"
  render_template "${MANIFESTS_DIR}/${template}" "$@" | install_file 600 /etc/rancher/rke2/config.yaml
  if command -v rke2 >/dev/null 2>&1; then
    log "rke2 already installed: $(rke2 --version | head -n1)"
  else
    log "installing rke2 (${type})"
    need_cmd curl
    run sh -c "curl -sfL https://get.rke2.io | INSTALL_RKE2_TYPE=${type} INSTALL_RKE2_VERSION='${INSTALL_RKE2_VERSION:-}' sh -"
  fi
  log "starting rke2-${type} (the first start takes a few minutes)"
  run systemctl enable --now "rke2-${type}.service"
}
