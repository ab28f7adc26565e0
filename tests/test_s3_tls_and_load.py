"""HTTPS with a private CA, and many clients at once, against real MinIO processes."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import time

import pyarrow.fs
import pytest

from dtrain import config, s3server, storage
from dtrain.errors import StorageError


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """A second MinIO, in its own state folder, serving HTTPS with a generated self-signed CA."""
    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path))
    for key in (*config.S3_ENV_KEYS, "AWS_CA_BUNDLE"):
        monkeypatch.delenv(key, raising=False)
    state = s3server.up(tls=True, backend="minio")
    yield state
    s3server.down()


def test_https_with_a_custom_ca(tls_server, monkeypatch):
    assert tls_server["endpoint_url"].startswith("https://127.0.0.1:")
    settings = config.s3_settings(environ={})
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    assert os.environ["AWS_CA_BUNDLE"].endswith("ca.crt")
    assert storage.upload_bytes(b"over tls", "tls", "hello")["uploaded"]
    assert storage.get_bytes("tls", "hello") == b"over tls"
    # Ray's checkpoints go through pyarrow: the same CA, through tls_ca_file_path.
    fs = storage.pyarrow_filesystem(config.s3_settings())
    with fs.open_output_stream("tls/arrow.txt") as out:
        out.write(b"arrow over tls")
    assert storage.get_bytes("tls", "arrow.txt") == b"arrow over tls"
    assert fs.get_file_info("tls/hello").size == len(b"over tls")


def test_untrusted_certificate_is_a_clear_error_not_a_hang(tls_server, monkeypatch):
    settings = config.s3_settings(environ={})
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_CA_BUNDLE")
    started = time.monotonic()
    with pytest.raises(StorageError, match="TLS certificate .* is not trusted.*AWS_CA_BUNDLE"):
        storage.list_buckets()
    assert time.monotonic() - started < 30
    untrusted = pyarrow.fs.S3FileSystem(access_key=settings.access_key, secret_key=settings.secret_key,
                                        endpoint_override=settings.host_port, scheme="https",
                                        region=settings.region, connect_timeout=2, request_timeout=5)
    with pytest.raises(OSError):
        untrusted.get_file_info("tls/hello")


def test_eight_clients_two_hundred_objects_each(bucket):
    """Load: 8 concurrent clients × 200 objects, up then down, every byte checksummed."""
    def worker(client_id: int) -> tuple[int, int]:
        errors = corrupt = 0
        blobs = {f"load/{client_id}/{i}": os.urandom(1024 + 37 * i) for i in range(200)}
        for key, data in blobs.items():
            try:
                storage.upload_bytes(data, bucket, key)
            except StorageError:
                errors += 1
        for key, data in blobs.items():
            try:
                back = storage.get_bytes(bucket, key)
                corrupt += hashlib.sha256(back).digest() != hashlib.sha256(data).digest()
            except StorageError:
                errors += 1
        return errors, corrupt

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert sum(e for e, _ in results) == 0
    assert sum(c for _, c in results) == 0
    assert len(storage.list_objects(bucket, "load/")) == 1600
