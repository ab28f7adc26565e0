"""The storage layer against the real embedded MinIO."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os

import pytest

from dtrain import s3server, storage
from dtrain.errors import IntegrityError, StorageError


def test_server_is_minio_on_loopback_with_generated_credentials(s3):
    info = s3server.status()
    assert info["running"] and info["healthy"]
    assert info["server_header"] == "MinIO"
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    assert s3.access_key != "minio" + "admin" and len(s3.secret_key) >= 30  # not MinIO's default


def test_round_trip_file_and_idempotent_upload(bucket, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 * 2**20 + 17))
    first = storage.upload_file(src, bucket, "dir/blob.bin")
    again = storage.upload_file(src, bucket, "dir/blob.bin")
    assert first["uploaded"] is True and again["uploaded"] is False
    out = storage.download_file(bucket, "dir/blob.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    assert out["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert storage.total_size(bucket) == src.stat().st_size
    assert [o["key"] for o in storage.list_objects(bucket)] == ["dir/blob.bin"]


def test_multipart_upload_is_verified(bucket, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(40 * 2**20))  # above the 16 MiB multipart threshold
    storage.upload_file(src, bucket, "big.bin")
    info = storage.object_info(bucket, "big.bin")
    assert info["size"] == 40 * 2**20 and "-" in info["etag"]  # a multipart ETag
    assert storage.get_bytes(bucket, "big.bin") == src.read_bytes()


def test_changed_bytes_are_uploaded_again(bucket):
    assert storage.upload_bytes(b"one", bucket, "k")["uploaded"]
    assert storage.upload_bytes(b"two", bucket, "k")["uploaded"]
    assert storage.get_bytes(bucket, "k") == b"two"


def test_corruption_is_detected_on_download(bucket, tmp_path):
    # Overwrite the object behind the layer's back, keeping the old sha256 in its metadata:
    # what a bit flip at rest or a truncated transfer looks like to the reader.
    storage.upload_bytes(b"good bytes", bucket, "x")
    good_sha = storage.object_info(bucket, "x")["sha256"]
    storage.client().put_object(Bucket=bucket, Key="x", Body=b"evil bytes", Metadata={"sha256": good_sha})
    with pytest.raises(IntegrityError, match="s3://.*/x"):
        storage.get_bytes(bucket, "x")
    with pytest.raises(IntegrityError):
        storage.download_file(bucket, "x", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_concurrent_uploads(bucket):
    blobs = {f"c/{i}": os.urandom(50_000 + i) for i in range(24)}
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: storage.upload_bytes(kv[1], bucket, kv[0]), blobs.items()))
    assert len(storage.list_objects(bucket, "c/")) == 24
    for key, data in blobs.items():
        assert storage.get_bytes(bucket, key) == data


def test_delete_and_clean(bucket):
    for i in range(3):
        storage.upload_bytes(b"x" * i, bucket, f"p/{i}")
    storage.delete(bucket, "p/0")
    assert not storage.exists(bucket, "p/0")
    assert storage.clean(bucket, "p/") == 2
    assert storage.list_objects(bucket) == []


@pytest.mark.parametrize("call, message", [
    (lambda b, t: storage.get_bytes(b, "missing"), "not found"),
    (lambda b, t: storage.delete(b, "missing"), "not found"),
    (lambda b, t: storage.list_objects("no-such-bucket-here"), "bucket not found"),
    (lambda b, t: storage.upload_file(t / "nope.bin", b, "k"), "local file not found"),
])
def test_bad_input_names_the_problem(bucket, tmp_path, call, message):
    with pytest.raises(StorageError, match=message):
        call(bucket, tmp_path)


def test_wrong_credentials(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-" + "x" * 20)
    with pytest.raises(StorageError, match="rejected the credentials"):
        storage.list_buckets()


def test_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3server.free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    with pytest.raises(StorageError, match="cannot reach S3 at http://127.0.0.1"):
        storage.list_buckets()
