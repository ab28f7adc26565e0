"""The `dtrain s3` and `dtrain bucket` commands, as a user types them (subprocesses, real MinIO)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dtrain import config


def dtrain(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "dtrain", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_help_everywhere():
    for args in (["--help"], ["s3", "--help"], ["s3", "up", "--help"], ["bucket", "--help"],
                 ["bucket", "upload", "--help"]):
        out = dtrain(*args)
        assert "usage: dtrain" in out.stdout and len(out.stdout.splitlines()) > 3


def test_s3_env_prints_the_secret_names(s3):
    out = dtrain("s3", "env", env={k: "" for k in config.S3_ENV_KEYS})
    lines = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())
    assert lines["AWS_ENDPOINT_URL"] == s3.endpoint_url
    assert lines["AWS_ACCESS_KEY_ID"] == s3.access_key and lines["AWS_REGION"] == "us-east-1"


def test_status_reports_endpoint_and_minio(s3):
    out = dtrain("s3", "status")
    assert s3.endpoint_url in out.stdout and '"server_header": "MinIO"' in out.stdout
    assert s3.secret_key not in out.stdout  # status never prints the secret


def test_bucket_verbs_round_trip(bucket, tmp_path):
    src = tmp_path / "h.txt"
    src.write_text("hello")
    assert "uploaded" in dtrain("bucket", "upload", "--bucket", bucket, "--file", str(src)).stdout
    assert "unchanged, skipped" in dtrain("bucket", "upload", "--bucket", bucket, "--file", str(src)).stdout
    assert dtrain("bucket", "get", "--bucket", bucket, "--key", "h.txt").stdout == "hello"
    assert "1 objects, 5 bytes" in dtrain("bucket", "get-size", "--bucket", bucket).stdout
    assert '"size": 5' in dtrain("bucket", "get-info", "--bucket", bucket, "--key", "h.txt").stdout
    dtrain("bucket", "download", "--bucket", bucket, "--key", "h.txt", "--out", f"{tmp_path}/dl/")
    assert (tmp_path / "dl" / "h.txt").read_text() == "hello"
    assert "h.txt" in dtrain("bucket", "list", "--bucket", bucket).stdout
    assert "deleted 1 objects" in dtrain("bucket", "clean", "--bucket", bucket).stdout


@pytest.mark.parametrize("args, message", [
    (["bucket", "get", "--bucket", "no-such-bucket", "--key", "k"], "not found"),
    (["bucket", "upload", "--bucket", "b", "--file", "/no/such/file"], "local file not found"),
    (["bucket", "list"], "the following arguments are required: --bucket"),
    (["s3", "up", "--port", "70000"], "out of range"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(s3, args, message):
    out = dtrain(*args, check=False)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_endpoint_is_one_line(s3):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    out = dtrain("bucket", "list", "--bucket", "x", env=env, check=False)
    assert out.returncode == 2 and out.stderr.startswith("dtrain: error: cannot reach S3 at http://127.0.0.1:9")
