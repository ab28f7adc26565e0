"""The one S3 layer everything uses (the CLI, the datasets, the trainer, the evaluator).

Choices, and why:
* **path-style addressing**: MinIO (and any S3 behind a bare IP) has no per-bucket DNS.
* **retries with backoff** (botocore "standard" mode): a restarted MinIO costs a pause, not a run.
* **a sha256 in each object's metadata**: checked after every transfer, and it makes uploads
  idempotent (same bytes already there → nothing is sent). boto3 also checksums each request
  on the wire (CRC32), and MinIO verifies it.
* **no half-written object under its final key**: S3 makes a PUT or a completed multipart upload
  visible atomically; downloads go to a temporary file renamed only once verified; an upload
  whose check fails is deleted.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, SSLError

from dtrain import config
from dtrain.errors import IntegrityError, StorageError

SHA_KEY = "sha256"  # user metadata key, stored as x-amz-meta-sha256
TRANSFER = TransferConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4)


def sha256_file(path: Path, chunk: int = 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _client_for(settings: config.S3Settings):
    boto_config = Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 4},
                         connect_timeout=3, read_timeout=60, max_pool_connections=16,
                         signature_version="s3v4")
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key, region_name=settings.region,
        verify=settings.ca_bundle or True, config=boto_config)


def client(settings: config.S3Settings | None = None):
    """A boto3 S3 client for the configured endpoint (cached; boto3 clients are thread-safe)."""
    return _client_for(settings or config.s3_settings())


def _explain(exc: Exception, what: str, settings: config.S3Settings | None = None) -> StorageError:
    """Turn a botocore exception into one line that names the problem."""
    endpoint = (settings or config.s3_settings()).endpoint_url
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
            return StorageError(f"{endpoint} rejected the credentials ({code or status}) while {what}")
        if code == "NoSuchBucket":
            return StorageError(f"bucket not found while {what}")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return StorageError(f"not found while {what}")
        return StorageError(f"S3 error {code or status} while {what}: {exc}")
    if isinstance(exc, SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return StorageError(f"TLS certificate of {endpoint} is not trusted while {what}: "
                            "set AWS_CA_BUNDLE to the CA file")
    return StorageError(f"cannot reach S3 at {endpoint} while {what}: {type(exc).__name__}")


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, what) from exc


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)


def ensure_bucket(bucket: str) -> None:
    """Create the bucket if it does not exist (idempotent)."""
    s3 = client()
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise _explain(exc, f"checking bucket '{bucket}'") from exc
        _call(f"creating bucket '{bucket}'", s3.create_bucket, Bucket=bucket)
    except BotoCoreError as exc:
        raise _explain(exc, f"checking bucket '{bucket}'") from exc


def object_info(bucket: str, key: str) -> dict:
    """Size, sha256 (from metadata), ETag and date of one object."""
    head = _call(f"reading s3://{bucket}/{key}", client().head_object, Bucket=bucket, Key=key)
    return {"bucket": bucket, "key": key, "size": head["ContentLength"], "etag": head["ETag"].strip('"'),
            "sha256": head.get("Metadata", {}).get(SHA_KEY), "last_modified": str(head["LastModified"]),
            "content_type": head.get("ContentType")}


def _info_or_none(bucket: str, key: str) -> dict | None:
    """``object_info``, or None when the object does not exist (one HEAD request)."""
    try:
        return object_info(bucket, key)
    except StorageError as exc:
        if isinstance(exc.__cause__, ClientError) and \
                exc.__cause__.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise


def exists(bucket: str, key: str) -> bool:
    return _info_or_none(bucket, key) is not None


def _already_there(bucket: str, key: str, size: int, sha: str) -> bool:
    info = _info_or_none(bucket, key)
    return info is not None and info["size"] == size and info["sha256"] == sha


def _verify_upload(bucket: str, key: str, size: int, sha: str) -> None:
    info = object_info(bucket, key)
    if info["size"] != size or info["sha256"] != sha:
        _call(f"removing bad upload s3://{bucket}/{key}", client().delete_object, Bucket=bucket, Key=key)
        raise IntegrityError(f"s3://{bucket}/{key}: stored {info['size']} bytes/sha256 {info['sha256']}, "
                             f"sent {size} bytes/sha256 {sha}; the object was removed")


def upload_file(path: str | Path, bucket: str, key: str | None = None, progress: bool = False,
                content_type: str | None = None) -> dict:
    """Upload a local file; skip it when the same bytes are already there. Verified afterwards."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"local file not found: {path}")
    key = key or path.name
    size, sha = path.stat().st_size, sha256_file(path)
    ensure_bucket(bucket)
    if _already_there(bucket, key, size, sha):
        return {"bucket": bucket, "key": key, "size": size, "sha256": sha, "uploaded": False}
    extra = {"Metadata": {SHA_KEY: sha}, **({"ContentType": content_type} if content_type else {})}
    with _progress(size, f"upload {key}", progress) as bar:
        _call(f"uploading {path} to s3://{bucket}/{key}", client().upload_file, str(path), bucket, key,
              ExtraArgs=extra, Config=TRANSFER, Callback=bar.update)
    _verify_upload(bucket, key, size, sha)
    return {"bucket": bucket, "key": key, "size": size, "sha256": sha, "uploaded": True}


def upload_bytes(data: bytes, bucket: str, key: str, content_type: str | None = None) -> dict:
    """Upload bytes held in memory (manifests, models, reports), idempotently and verified."""
    sha = hashlib.sha256(data).hexdigest()
    ensure_bucket(bucket)
    if _already_there(bucket, key, len(data), sha):
        return {"bucket": bucket, "key": key, "size": len(data), "sha256": sha, "uploaded": False}
    extra = {"ContentType": content_type} if content_type else {}
    _call(f"uploading to s3://{bucket}/{key}", client().put_object, Bucket=bucket, Key=key, Body=data,
          Metadata={SHA_KEY: sha}, **extra)
    _verify_upload(bucket, key, len(data), sha)
    return {"bucket": bucket, "key": key, "size": len(data), "sha256": sha, "uploaded": True}


def _check_bytes(bucket: str, key: str, data_sha: str, data_size: int, info: dict) -> None:
    if data_size != info["size"] or (info["sha256"] and data_sha != info["sha256"]):
        raise IntegrityError(f"s3://{bucket}/{key}: received {data_size} bytes/sha256 {data_sha[:12]}…, "
                             f"expected {info['size']} bytes/sha256 {str(info['sha256'])[:12]}…")


def get_bytes(bucket: str, key: str) -> bytes:
    """Read a whole object into memory and check its size and sha256."""
    info = object_info(bucket, key)
    body = _call(f"downloading s3://{bucket}/{key}", client().get_object, Bucket=bucket, Key=key)["Body"]
    data = _call(f"downloading s3://{bucket}/{key}", body.read)
    _check_bytes(bucket, key, hashlib.sha256(data).hexdigest(), len(data), info)
    return data


def download_file(bucket: str, key: str, path: str | Path, progress: bool = False) -> dict:
    """Download to ``path`` through a temporary file that is renamed only once verified."""
    as_folder = str(path).endswith(("/", os.sep)) or Path(path).is_dir()
    path = Path(path) / Path(key).name if as_folder else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = object_info(bucket, key)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.part-")
    os.close(fd)
    try:
        with _progress(info["size"], f"download {key}", progress) as bar:
            _call(f"downloading s3://{bucket}/{key}", client().download_file, bucket, key, tmp,
                  Config=TRANSFER, Callback=bar.update)
        _check_bytes(bucket, key, sha256_file(Path(tmp)), Path(tmp).stat().st_size, info)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {**info, "path": str(path)}


def list_objects(bucket: str, prefix: str = "") -> list[dict]:
    """Every object under a prefix (all pages), as {key, size, etag, last_modified}."""
    paginator = client().get_paginator("list_objects_v2")
    out = []
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out += [{"key": o["Key"], "size": o["Size"], "etag": o["ETag"].strip('"'),
                     "last_modified": str(o["LastModified"])} for o in page.get("Contents", [])]
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, f"listing s3://{bucket}/{prefix}") from exc
    return out


def list_buckets() -> list[str]:
    return [b["Name"] for b in _call("listing buckets", client().list_buckets).get("Buckets", [])]


def total_size(bucket: str, prefix: str = "") -> int:
    return sum(o["size"] for o in list_objects(bucket, prefix))


def delete(bucket: str, key: str) -> None:
    """Delete one object; a missing object is an error, so typos don't pass silently."""
    object_info(bucket, key)
    _call(f"deleting s3://{bucket}/{key}", client().delete_object, Bucket=bucket, Key=key)


def clean(bucket: str, prefix: str = "") -> int:
    """Delete every object under a prefix; returns how many were deleted."""
    keys = [o["key"] for o in list_objects(bucket, prefix)]
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start:start + 1000]]
        _call(f"cleaning s3://{bucket}/{prefix}", client().delete_objects, Bucket=bucket,
              Delete={"Objects": batch, "Quiet": True})
    return len(keys)


def pyarrow_filesystem(settings: config.S3Settings | None = None):
    """A pyarrow S3FileSystem on the same endpoint, for Ray's checkpoint storage.

    pyarrow ignores ``AWS_ENDPOINT_URL``: it wants the host:port without the scheme in
    ``endpoint_override`` and the scheme apart; a private CA goes in ``tls_ca_file_path``.
    """
    import pyarrow.fs

    s = settings or config.s3_settings()
    return pyarrow.fs.S3FileSystem(
        access_key=s.access_key, secret_key=s.secret_key, region=s.region,
        endpoint_override=s.host_port, scheme="https" if s.secure else "http",
        tls_ca_file_path=s.ca_bundle, connect_timeout=3, request_timeout=60,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=6))
