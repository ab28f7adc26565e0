"""Bad input, end to end, as one table: the CLI, the library, notebook parameters and
manifest parameters.

Every case must fail the same way: a typed DtrainError (library) or exit code 2 with
exactly one ``dtrain…: error: …`` line on stderr and no traceback (CLI), naming the
problem. And nothing may be left half-written: no new file in the state folder or the
output folder, no temporary file anywhere in them, no object added to or changed in MinIO.

Cases other test files assert too (one per module) are repeated here on purpose: this
file is the single list of what the lab refuses. "More workers than the cluster holds"
needs a running Ray cluster and lives in test_faults.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dtrain import config, datasets, driver, s3server, storage, submit, train
from dtrain.errors import (
    ConfigError,
    DatasetError,
    DtrainError,
    IntegrityError,
    ServerError,
    StorageError,
    TrainingError,
)
from dtrain.idx import encode_idx

REPO = Path(__file__).resolve().parents[1]
CLEAN_KEYS = (*config.S3_ENV_KEYS, "AWS_CA_BUNDLE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "DTRAIN_HOME")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- what each case runs in ----------------------------------------------------------------
@dataclass
class Ctx:
    """Where a case runs: a fresh state folder, an output folder, maybe MinIO and a bucket."""

    home: Path
    out: Path
    env: dict[str, str]
    s3: config.S3Settings | None = None
    bucket: str | None = None
    notes: dict = field(default_factory=dict)


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_KEYS}
    return {**env, "DTRAIN_HOME": str(home), "PYTHONUNBUFFERED": "1"}


# Environments: how the S3 settings look for a case.
def env_offline(ctx: Ctx) -> None:
    """No endpoint at all."""


def env_s3(ctx: Ctx) -> None:
    ctx.env.update(ctx.s3.as_env())


def env_garbage_state(ctx: Ctx) -> None:
    (ctx.home / "s3.json").write_text('{"endpoint_url": "http://127.0.0.1:9000", "access')


def env_bad_url(ctx: Ctx) -> None:
    ctx.env.update(AWS_ENDPOINT_URL="127.0.0.1:9000", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")


def env_unreachable(ctx: Ctx) -> None:
    ctx.env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}", AWS_ACCESS_KEY_ID="k",
                   AWS_SECRET_ACCESS_KEY="s")


def env_wrong_key(ctx: Ctx) -> None:
    ctx.env.update({**ctx.s3.as_env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret-" + "x" * 24})


NEEDS_S3 = {env_s3, env_wrong_key}


# --- a tiny published dataset, broken in chosen ways -----------------------------------------
def _tiny_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays = {}
    for split, (img, lbl) in datasets.SPLITS.items():
        count = 6 if split == "train" else 4
        arrays[img] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[lbl] = rng.integers(0, 10, count, dtype=np.uint8)
    return arrays


def publish_tiny(bucket: str, stored: dict[str, bytes] | None = None, described: dict[str, bytes] | None = None):
    """Publish a 6+4 image 'mnist' to ``bucket``. ``stored`` replaces a file's bytes in the
    bucket; ``described`` replaces the bytes the manifest's sha256 is computed from."""
    raw = {stem: encode_idx(array) for stem, array in _tiny_arrays().items()}
    stored, described = {**raw, **(stored or {})}, {**raw, **(described or {})}
    files = {}
    for stem in datasets.FILES:
        key = f"mnist/{stem}.gz"
        storage.upload_bytes(gzip.compress(stored[stem], mtime=0), bucket, key)
        files[stem] = {"key": key, "sha256": hashlib.sha256(described[stem]).hexdigest()}
    manifest = {"dataset": "mnist", "files": files}
    storage.upload_bytes(json.dumps(manifest).encode(), bucket, "mnist/manifest.json")
    datasets.clear_memory_cache()


def publish_broken(stem: str, data: bytes):
    """A setup step: publish the tiny set with ``stem`` replaced by ``data``, consistently
    described by the manifest (the file itself is bad, not its transfer)."""
    return lambda ctx: publish_tiny(ctx.bucket, stored={stem: data}, described={stem: data})


def _truncated(stem: str) -> bytes:
    return encode_idx(_tiny_arrays()[stem])[:-5]


def _wrong_magic(stem: str) -> bytes:
    return b"\x00\x00\x08\x02" + encode_idx(_tiny_arrays()[stem])[4:]


def _load_test(ctx: Ctx):
    return datasets.load("mnist", "test", bucket=ctx.bucket)


# --- the table ------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input. ``argv`` (CLI, ``{out}``/``{bucket}`` filled in) or ``call`` (library)."""

    id: str
    expect: str  # a fragment of the one-line message
    argv: list[str] | None = None
    call: object = None
    error: type[DtrainError] = DtrainError
    env: object = env_offline
    setup: object = None  # run before the "before" snapshot


CASES = [
    # CLI: arguments
    Case("cli-unknown-dataset", "invalid choice: 'imagenet'", argv=["data", "prepare", "--dataset", "imagenet"]),
    Case("cli-train-unknown-dataset", "unknown dataset 'imagenet'",
         argv=["train", "--dataset", "imagenet", "--workers", "1"]),
    Case("cli-workers-0", "--workers: must be ≥ 1, got 0", argv=["train", "--workers", "0"]),
    Case("cli-epochs-negative", "--epochs: must be ≥ 1, got -1", argv=["train", "--epochs", "-1"]),
    Case("cli-workers-not-a-number", "expected a whole number, got 'two'", argv=["train", "--workers", "two"]),
    Case("cli-bad-run-id", "bad run id 'Bad_ID!'", argv=["train", "--workers", "1", "--run-id", "Bad_ID!"]),
    Case("cli-bad-port", "port 70000 is out of range", argv=["s3", "up", "--port", "70000"]),
    Case("cli-cluster-0-nodes", "need at least 1 worker node", argv=["cluster", "up", "--workers", "0"]),
    # CLI: manifest parameters
    Case("k8s-workers-0", "must be at least 1", argv=["k8s", "render", "--workers", "0", "--out", "{out}/m"]),
    Case("k8s-cpus-0", "must be at least 1", argv=["k8s", "render", "--cpus", "0", "--out", "{out}/m"]),
    Case("k8s-memory-banana", "'banana' is not a Kubernetes quantity",
         argv=["k8s", "render", "--memory", "banana", "--out", "{out}/m"]),
    Case("k8s-more-workers-than-pods-hold", "--workers 9 exceeds worker nodes x CPUs",
         argv=["k8s", "render", "--workers", "9", "--out", "{out}/m"]),
    Case("k8s-epochs-0", "--epochs", argv=["k8s", "render", "--epochs", "0", "--out", "{out}/m"]),
    # CLI: settings and state
    Case("cli-no-endpoint", "no S3 endpoint: run 'dtrain s3 up'", argv=["bucket", "list", "--bucket", "datasets"]),
    Case("cli-malformed-endpoint", "AWS_ENDPOINT_URL must start with http:// or https://",
         argv=["bucket", "list", "--bucket", "datasets"], env=env_bad_url),
    Case("cli-corrupt-state-file", "is corrupt", argv=["bucket", "list", "--bucket", "datasets"],
         env=env_garbage_state),
    Case("cli-unreachable-endpoint", "cannot reach S3 at http://127.0.0.1:",
         argv=["bucket", "list", "--bucket", "datasets"], env=env_unreachable),
    Case("cli-wrong-credentials", "rejected the credentials", argv=["bucket", "list", "--bucket", "{bucket}"],
         env=env_wrong_key),
    Case("cli-missing-bucket", "bucket not found", argv=["bucket", "list", "--bucket", "no-such-bucket-dtrain"],
         env=env_s3),
    Case("cli-missing-local-file", "local file not found", env=env_s3,
         argv=["bucket", "upload", "--bucket", "{bucket}", "--file", "{out}/nope.bin"]),
    Case("cli-missing-key", "not found while reading s3://", env=env_s3,
         argv=["bucket", "download", "--bucket", "{bucket}", "--key", "nope.bin", "--out", "{out}/"]),
    Case("cli-unknown-run-id", "no model for run 'no-such-run'", argv=["evaluate", "--run", "no-such-run"],
         env=env_s3, setup=lambda ctx: storage.upload_bytes(b"{}", config.MODELS_BUCKET, "placeholder.json")),
    # Library: data in the bucket
    Case("dataset-missing-from-bucket", "dataset 'mnist' not found in s3://", call=_load_test,
         error=DatasetError, env=env_s3),
    Case("truncated-idx", "truncated, header promises", call=_load_test, error=DatasetError, env=env_s3,
         setup=publish_broken("t10k-images-idx3-ubyte", _truncated("t10k-images-idx3-ubyte"))),
    Case("wrong-magic", "wrong magic 0x00000802", call=_load_test, error=DatasetError, env=env_s3,
         setup=publish_broken("t10k-labels-idx1-ubyte", _wrong_magic("t10k-labels-idx1-ubyte"))),
    Case("count-mismatch", "count mismatch, 4 images but 3 labels", call=_load_test, error=DatasetError, env=env_s3,
         setup=publish_broken("t10k-labels-idx1-ubyte", encode_idx(np.zeros(3, np.uint8)))),
    Case("checksum-mismatch", "does not match manifest.json", call=_load_test, error=DatasetError, env=env_s3,
         setup=lambda ctx: publish_tiny(ctx.bucket, stored={"t10k-images-idx3-ubyte": encode_idx(
             np.full((4, 28, 28), 3, np.uint8))})),
    Case("not-gzip", "is not a valid gzip file", call=_load_test, error=DatasetError, env=env_s3,
         setup=lambda ctx: [publish_tiny(ctx.bucket),
                            storage.upload_bytes(b"plain bytes", ctx.bucket, "mnist/t10k-images-idx3-ubyte.gz")]),
    Case("object-corrupted-at-rest", "received", error=IntegrityError, env=env_s3,
         setup=lambda ctx: storage.client().put_object(Bucket=ctx.bucket, Key="blob", Body=b"changed",
                                                       Metadata={"sha256": hashlib.sha256(b"original").hexdigest()}),
         call=lambda ctx: storage.get_bytes(ctx.bucket, "blob")),
    # Library: settings
    Case("endpoint-without-keys", "AWS_SECRET_ACCESS_KEY is not", error=ConfigError,
         call=lambda ctx: config.s3_settings({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k"})),
    Case("s3-unknown-backend", "unknown S3 backend 'ceph'", error=ServerError,
         call=lambda ctx: s3server.up(backend="ceph")),
    Case("storage-wrong-credentials", "rejected the credentials", error=StorageError, env=env_wrong_key,
         call=lambda ctx: storage.list_objects(ctx.bucket)),
    # Notebook parameters (notebook 04 hands them to submit.submit, which checks them first)
    Case("nb-workers-0", "workers must be a whole number ≥ 1, got 0", error=TrainingError,
         call=lambda ctx: submit.submit("fashion-mnist", workers=0, epochs=1)),
    Case("nb-dataset-imagenet", "unknown dataset 'imagenet'", error=DatasetError,
         call=lambda ctx: submit.submit("imagenet", workers=2, epochs=1)),
    Case("nb-epochs-negative", "epochs must be a whole number ≥ 1, got -1", error=TrainingError,
         call=lambda ctx: train.run_config({"epochs": -1})),
    Case("nb-batch-smaller-than-workers", "batch-size 4 is smaller than workers 8", error=TrainingError,
         call=lambda ctx: train.run_config({"workers": 8, "batch_size": 4})),
    Case("driver-run-id-path", "bad run id '../models'", error=TrainingError,
         call=lambda ctx: driver.check_run_id("../models")),
]


# --- snapshots: what "nothing half-written" means ---------------------------------------------
def _files(*folders: Path) -> set[str]:
    return {str(p) for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()}


def _objects(settings: config.S3Settings | None) -> set[tuple[str, str, str]]:
    if settings is None:
        return set()
    s3 = storage.client(settings)
    found = set()
    for bucket in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            found |= {(bucket["Name"], o["Key"], o["ETag"]) for o in page.get("Contents", [])}
    return found


@pytest.fixture
def ctx(request, tmp_path, monkeypatch):
    case: Case = request.param
    # The session's MinIO first: its fixture sets DTRAIN_HOME for the session, and
    # monkeypatch must restore that value, not the one from before MinIO started.
    settings = request.getfixturevalue("s3") if case.env in NEEDS_S3 else None
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    for key in CLEAN_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DTRAIN_HOME", str(home))
    context = Ctx(home=home, out=out, env=_base_env(home))
    if settings is not None:
        context.s3 = settings
        context.bucket = "bad-" + case.id[:40]
        for key, value in context.s3.as_env().items():
            monkeypatch.setenv(key, value)
        storage.ensure_bucket(context.bucket)
        storage.clean(context.bucket)
    case.env(context)
    for key, value in context.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    storage._client_for.cache_clear()
    if case.setup:
        case.setup(context)
    return context


@pytest.mark.parametrize("ctx", CASES, ids=[c.id for c in CASES], indirect=True)
def test_bad_input_fails_in_one_line_and_writes_nothing(ctx, request):
    case: Case = request.node.callspec.params["ctx"]
    files_before = _files(ctx.home, ctx.out)
    objects_before = _objects(ctx.s3)

    if case.argv is not None:
        argv = [a.format(out=ctx.out, bucket=ctx.bucket) for a in case.argv]
        proc = subprocess.run([sys.executable, "-m", "dtrain", *argv], env=ctx.env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr
        assert len(lines) == 1 and lines[0].startswith("dtrain") and ": error: " in lines[0], proc.stderr
        assert case.expect in lines[0], lines[0]
    else:
        with pytest.raises(case.error) as raised:
            case.call(ctx)
        assert isinstance(raised.value, DtrainError)
        assert "\n" not in str(raised.value)
        assert case.expect in str(raised.value), str(raised.value)

    files_after = _files(ctx.home, ctx.out)
    assert files_after == files_before, f"files written: {sorted(files_after - files_before)}"
    assert not [f for f in files_after if Path(f).name.startswith(".")], "temporary file left"
    storage._client_for.cache_clear()
    settings = ctx.s3
    if settings is not None:
        assert _objects(settings) == objects_before, "objects in MinIO changed"


def test_the_table_is_big_enough():
    assert len({c.id for c in CASES}) == len(CASES) >= 15
    assert {c.error for c in CASES if c.call} >= {ConfigError, DatasetError, IntegrityError, StorageError,
                                                   TrainingError, ServerError}
    assert any(c.argv and c.argv[0] == "k8s" for c in CASES)


@pytest.mark.slow
def test_notebook_with_a_bad_mode_fails_with_the_one_line_error(tmp_path):
    """papermill runs notebook 01 with mode='cloud': the first code cell refuses it."""
    import papermill

    env = _base_env(tmp_path / "home")
    out = tmp_path / "out.ipynb"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with pytest.raises(papermill.PapermillExecutionError) as failed:
            papermill.execute_notebook(str(REPO / "notebooks" / "01_cluster.ipynb"), str(out),
                                       parameters={"mode": "cloud"}, kernel_name="python3",
                                       cwd=str(REPO), progress_bar=False)
    assert failed.value.ename == "ConfigError"
    assert failed.value.evalue == "unknown mode 'cloud': choose one of local, kubernetes, ray"
    assert not (tmp_path / "home").exists() or not _files(tmp_path / "home")
