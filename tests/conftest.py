"""Shared fixtures. The S3 fixture is the REAL embedded MinIO server, not a double."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dtrain import config, s3server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_home(tmp_path_factory) -> Path:
    """A state folder of the test session's own, so tests never touch the user's .dtrain/."""
    return tmp_path_factory.mktemp("dtrain-home")


@pytest.fixture(scope="session")
def s3(s3_home):
    """Start the real MinIO (built by `make setup`) for the whole session and point the
    environment at it, exactly as the Kubernetes Secret points a pod at MinIO."""
    if not s3server.binary_path().exists():
        pytest.fail(f"MinIO binary missing at {s3server.binary_path()}: run 'make setup'")
    saved = {k: os.environ.get(k) for k in (*config.S3_ENV_KEYS, "AWS_CA_BUNDLE", "DTRAIN_HOME")}
    os.environ["DTRAIN_HOME"] = str(s3_home)
    for key in config.S3_ENV_KEYS:
        os.environ.pop(key, None)
    state = s3server.up(backend="minio")
    settings = config.s3_settings(environ={})
    os.environ.update(settings.as_env())
    yield settings
    os.environ["DTRAIN_HOME"] = str(s3_home)  # a test may have moved it: stop the server we started
    s3server.down()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    assert not s3server._pid_alive(state["pid"]), "MinIO outlived the test session"


@pytest.fixture
def bucket(s3, request) -> str:
    """A fresh, empty bucket named after the test."""
    from dtrain import storage

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    storage.ensure_bucket(name)
    storage.clean(name)
    return name
