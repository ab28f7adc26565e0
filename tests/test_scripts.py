"""The cluster scripts, the Dockerfile and the MinIO alternatives: syntax, lint, pins, behaviour.

Nothing here touches a real machine: the scripts run with DRY_RUN=1 (print, don't do)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dtrain import k8s, versions

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("[0-9][0-9]-*.sh"))
EXPECTED = ["10-install-rke2-server.sh", "20-join-rke2-agent.sh", "30-install-helm-kuberay.sh",
            "35-build-load-image.sh", "40-create-minio-secret.sh", "50-port-forward-dashboard.sh"]


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RKE2_", "KUBE"))}
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          env={**clean, "DRY_RUN": "1", **env}, timeout=60)


def test_all_scripts_present():
    assert [p.name for p in SCRIPTS] == EXPECTED
    assert all(os.access(p, os.X_OK) for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_and_parses(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS), str(REPO / "scripts" / "_common.sh")],
                            capture_output=True, text=True, cwd=REPO / "scripts")
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", EXPECTED)
def test_help(script):
    result = _run(script, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout and "DRY_RUN=1" in result.stdout


def test_versions_in_scripts_match_versions_py():
    helm = (REPO / "scripts" / "30-install-helm-kuberay.sh").read_text()
    assert re.search(r'KUBERAY_VERSION="\$\{KUBERAY_VERSION:-([^}]+)\}"', helm).group(1) == versions.KUBERAY_VERSION
    assert versions.KUBERAY_HELM_REPO in helm
    image = (REPO / "scripts" / "35-build-load-image.sh").read_text()
    assert re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', image).group(1) == k8s.DEFAULT_IMAGE
    assert f"--version {versions.KUBERAY_VERSION}" in _run("30-install-helm-kuberay.sh").stderr


def test_missing_setting_is_named():
    result = _run("40-create-minio-secret.sh")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: AWS_ENDPOINT_URL is not set (see --help)"
    result = _run("20-join-rke2-agent.sh", RKE2_SERVER_ADDRESS="10.0.0.1")
    assert result.returncode == 2 and "RKE2_SERVER_SSH is not set" in result.stderr


def test_secret_script_never_prints_the_secret():
    result = _run("40-create-minio-secret.sh", AWS_ENDPOINT_URL="http://minio.lab:9000",
                  AWS_ACCESS_KEY_ID="lab-user", AWS_SECRET_ACCESS_KEY="s3cr3t-" "value-xyz", NAMESPACE="lab")
    assert result.returncode == 0, result.stderr
    assert "s3cr3t-value-xyz" not in result.stdout + result.stderr
    assert "kubectl create secret generic minio-credentials -n lab --from-env-file=<temp>" in result.stderr
    assert "--dry-run=client -o yaml | kubectl apply -f -" in result.stderr
    bad = _run("40-create-minio-secret.sh", AWS_ENDPOINT_URL="minio.lab:9000", AWS_ACCESS_KEY_ID="a",
               AWS_SECRET_ACCESS_KEY="b")
    assert bad.returncode == 2 and "must start with http" in bad.stderr


def test_rke2_config_rendered_from_env_without_secrets_in_repo():
    script = f'source "{REPO}/scripts/_common.sh"; render_template "$1" RKE2_SERVER_ADDRESS RKE2_TOKEN'
    template = REPO / "manifests" / "01-rke2-agent-config.yaml.tmpl"
    out = subprocess.run(["bash", "-c", script, "_", str(template)], capture_output=True, text=True, check=True,
                         env={**os.environ, "RKE2_SERVER_ADDRESS": "10.9.8.7", "RKE2_TOKEN": "K10&tok/en"}).stdout
    config = yaml.safe_load(out)
    assert config == {"server": "https://10.9.8.7:9345", "token": "K10&tok/en"}
    for name in ("00-rke2-server-config.yaml.tmpl", "01-rke2-agent-config.yaml.tmpl"):
        text = (REPO / "manifests" / name).read_text()
        assert "token: ${RKE2_TOKEN}" in text and not re.search(r"K10[0-9a-f]{20,}", text)


def test_server_script_dry_run_writes_nothing():
    result = _run("10-install-rke2-server.sh", RKE2_TOKEN="t", RKE2_SERVER_ADDRESS="10.0.0.2")
    assert result.returncode == 0, result.stderr
    assert "would write /etc/rancher/rke2/config.yaml (mode 600)" in result.stderr
    assert "systemctl enable --now rke2-server.service" in result.stderr


# --- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_pins_match_versions():
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["RAY_IMAGE"] == versions.RAY_IMAGE
    assert args["TORCH_VERSION"] == versions.TORCH_VERSION
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == "1000"
    assert "-c requirements.lock" in text and "download.pytorch.org/whl/cpu" in text


def test_dockerignore_keeps_state_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".dtrain", "tools", ".git"} <= ignored


# --- MinIO alternatives ---------------------------------------------------------------------
def test_minio_compose_pinned_healthchecked_no_credentials():
    compose = yaml.safe_load((REPO / "manifests" / "minio" / "docker-compose.yml").read_text())
    minio = compose["services"]["minio"]
    assert minio["image"] == versions.MINIO_IMAGE
    assert minio["healthcheck"]["test"] and minio["env_file"] == "minio.env"
    assert minio["volumes"] == ["minio-data:/data"] and "minio-data" in compose["volumes"]
    assert "environment" not in minio
    example = (REPO / "manifests" / "minio" / "minio.env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} == set(values)
    assert all("change-me" in v for k, v in values.items() if k not in ("AWS_ENDPOINT_URL", "AWS_REGION"))


def test_minio_statefulset_pinned():
    docs = list(yaml.safe_load_all((REPO / "manifests" / "minio" / "minio-statefulset.yaml").read_text()))
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == versions.MINIO_IMAGE
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
