"""No secret is ever committed: scan the tree and the whole history (the original leaked a join token)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_secrets  # noqa: E402


def test_repository_and_history_hold_no_secrets():
    assert check_secrets.scan_repo(REPO) == []


# Built from pieces so that this file itself holds none of the shapes it plants.
PLANTED = {
    "aws.txt": "key = AKIA" + "ABCDEFGHIJKLMNOP",
    "token.yaml": "token: K10" + "a" * 48 + "::server:abc",
    "pem.txt": "-----BEGIN RSA " + "PRIVATE KEY-----",
    "compose.env": "MINIO_ROOT_USER=minio" + "admin",
    "settings.py": 'secret_key = "' + "Zx9" * 8 + '"',
}


@pytest.mark.parametrize("name, content", PLANTED.items())
def test_scanner_catches_planted_secrets_in_files_and_history(tmp_path, name, content):
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / name).write_text(content + "\n")
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "leak"], cwd=tmp_path, check=True)
    assert any(name in f for f in check_secrets.scan_repo(tmp_path))
    (tmp_path / name).unlink()  # deleting the file does not delete it from history
    subprocess.run([*git, "commit", "-qam", "remove"], cwd=tmp_path, check=True)
    assert any(f.startswith("history ") for f in check_secrets.scan_repo(tmp_path))


@pytest.mark.parametrize("path", [".env", "manifests/minio/minio.env", ".dtrain/s3.json",
                                  ".dtrain/s3-credentials.json", "tools/bin/minio"])
def test_state_and_env_files_are_git_ignored(path):
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
