"""Dataset sources (cache, Debian folder, mirrors), publishing to S3 and loading back.

Downloads run against a local http.server holding small generated IDX files whose
checksums are injected into the module's tables; the S3 tests use the real MinIO
from conftest's ``s3`` fixture.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dtrain import cli, dataset_sources, datasets
from dtrain.errors import DatasetError
from dtrain.idx import encode_idx

COUNTS = {"train": 40, "test": 12}
FASHION_SHA256 = {  # from docs/field-notes.md, measured on Debian's dataset-fashion-mnist
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def make_dataset(seed: int) -> dict[str, bytes]:
    """Small valid IDX files for the four stems, {stem: raw bytes}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, (img, lbl) in datasets.SPLITS.items():
        n = COUNTS[split]
        out[img] = encode_idx(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        out[lbl] = encode_idx(rng.integers(0, 10, size=n, dtype=np.uint8))
    return out


def write_gz(folder: Path, files: dict[str, bytes], level: int = 9) -> dict[str, bytes]:
    """Gzip each file into folder/<stem>.gz; return {stem: gz bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    packed = {stem: gzip.compress(raw, compresslevel=level, mtime=0) for stem, raw in files.items()}
    for stem, data in packed.items():
        (folder / f"{stem}.gz").write_bytes(data)
    return packed


def pin_checksums(monkeypatch, name: str, packed: dict[str, bytes] | None, raw: dict[str, bytes] | None):
    monkeypatch.setitem(dataset_sources.GZ_MD5, name,
                        {s: hashlib.md5(d).hexdigest() for s, d in (packed or {}).items()})
    monkeypatch.setitem(dataset_sources.IDX_SHA256, name,
                        {s: hashlib.sha256(d).hexdigest() for s, d in (raw or {}).items()})


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def serve(tmp_path):
    """serve(folder) -> base URL of a threaded http.server on 127.0.0.1, free port."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own state folder, an empty Debian folder and no real mirrors for every test."""
    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DTRAIN_CACHE", raising=False)
    monkeypatch.setenv("DTRAIN_DEBIAN_DATASETS", str(tmp_path / "no-debian"))
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", closed_port_url())
    monkeypatch.setenv("DTRAIN_FASHION_MNIST_MIRRORS", closed_port_url())
    datasets.clear_memory_cache()
    yield
    datasets.clear_memory_cache()


@pytest.fixture
def mnist_mirror(tmp_path, serve, monkeypatch):
    """A good local MNIST mirror with injected checksums; returns (base URL, raw files)."""
    raw = make_dataset(seed=1)
    packed = write_gz(tmp_path / "good", raw)
    pin_checksums(monkeypatch, "mnist", packed, None)  # like real MNIST: gz md5 pinned only
    base = serve(tmp_path / "good")
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", base)
    return base, raw


def cache_listing(name: str) -> list[str]:
    folder = dataset_sources.dataset_cache(name)
    return sorted(p.name for p in folder.iterdir())


# --- downloads -------------------------------------------------------------------------------
def test_download_verifies_and_caches(mnist_mirror, monkeypatch):
    base, raw = mnist_mirror
    files = datasets.fetch_files("mnist")
    for stem, info in files.items():
        assert info["path"].read_bytes() == raw[stem]
        assert info["sha256"] == hashlib.sha256(raw[stem]).hexdigest()
        assert info["origin"] == base
    assert cache_listing("mnist") == sorted([*datasets.FILES, *(f"{s}.json" for s in datasets.FILES)])
    # The second fetch needs no network: the mirror is gone and the cache still answers.
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", closed_port_url())
    paths = datasets.fetch("mnist")
    assert paths["test"]["labels"].name == "t10k-labels-idx1-ubyte"
    assert datasets.locate("mnist") == ("cache", str(dataset_sources.dataset_cache("mnist")))


def test_corrupted_mirror_falls_back_to_next(mnist_mirror, tmp_path, serve, monkeypatch):
    good, raw = mnist_mirror
    bad_files = dict(raw, **{"train-images-idx3-ubyte": raw["train-images-idx3-ubyte"][:-784]})
    write_gz(tmp_path / "bad", bad_files)
    bad = serve(tmp_path / "bad")
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", f"{bad},{good}")
    files = datasets.fetch_files("mnist")
    assert files["train-images-idx3-ubyte"]["origin"] == good
    assert files["train-images-idx3-ubyte"]["path"].read_bytes() == raw["train-images-idx3-ubyte"]
    assert not [n for n in cache_listing("mnist") if n.startswith(".")]


def test_corrupted_only_mirror_is_a_clear_error_and_cache_stays_clean(tmp_path, serve, monkeypatch):
    raw = make_dataset(seed=2)
    pin_checksums(monkeypatch, "mnist", write_gz(tmp_path / "good", raw), None)
    corrupted = dict(raw, **{"train-images-idx3-ubyte": raw["train-images-idx3-ubyte"][:-1] + b"\x07"})
    write_gz(tmp_path / "bad", corrupted)
    bad = serve(tmp_path / "bad")
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", bad)
    with pytest.raises(DatasetError) as info:
        datasets.fetch("mnist")
    assert f"checksum mismatch for train-images-idx3-ubyte.gz from {bad}: md5 " in str(info.value)
    assert cache_listing("mnist") == []


def test_pinned_decompressed_sha256_is_checked(mnist_mirror, monkeypatch):
    base, raw = mnist_mirror
    monkeypatch.setitem(dataset_sources.IDX_SHA256, "mnist", {"train-images-idx3-ubyte": "0" * 64})
    with pytest.raises(DatasetError, match=f"checksum mismatch for train-images-idx3-ubyte from {base}: "
                                           "decompressed sha256"):
        datasets.fetch("mnist")
    assert cache_listing("mnist") == []


def test_malformed_idx_from_mirror_is_rejected(tmp_path, serve, monkeypatch):
    raw = make_dataset(seed=3)
    raw["train-labels-idx1-ubyte"] += b"\x00"  # valid gzip, md5 matches, IDX has trailing garbage
    pin_checksums(monkeypatch, "mnist", write_gz(tmp_path / "m", raw), None)
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", serve(tmp_path / "m"))
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte from .*: trailing garbage, 1 bytes"):
        datasets.fetch("mnist")
    assert cache_listing("mnist") == ["train-images-idx3-ubyte", "train-images-idx3-ubyte.json"]


def test_unreachable_mirror_fails_fast(monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", url)
    start = time.monotonic()
    with pytest.raises(DatasetError, match=rf"could not fetch mnist train-images-idx3-ubyte: download of "
                                           rf"{url}train-images-idx3-ubyte.gz failed: .*refused"):
        datasets.fetch("mnist")
    assert time.monotonic() - start < 5
    assert cache_listing("mnist") == []


def test_missing_file_on_mirror_is_reported(tmp_path, serve, monkeypatch):
    (tmp_path / "empty").mkdir()
    base = serve(tmp_path / "empty")
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", base)
    with pytest.raises(DatasetError, match="HTTP Error 404|File not found"):
        datasets.fetch("mnist")


def test_tampered_cache_is_fetched_again(mnist_mirror):
    base, raw = mnist_mirror
    path = datasets.fetch("mnist")["test"]["labels"]
    path.write_bytes(raw["t10k-labels-idx1-ubyte"][:-1] + b"\x05")
    assert dataset_sources.cached_file("mnist", "t10k-labels-idx1-ubyte") is None
    assert datasets.fetch("mnist")["test"]["labels"].read_bytes() == raw["t10k-labels-idx1-ubyte"]


# --- Debian folder and choosing a dataset -----------------------------------------------------
@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """A Debian-style fashion-mnist folder whose gzips differ from 'upstream' (level 1)."""
    raw = make_dataset(seed=4)
    write_gz(tmp_path / "debian" / "fashion-mnist", raw, level=1)
    pin_checksums(monkeypatch, "fashion-mnist", {s: b"upstream" for s in raw}, raw)  # md5 can't match
    monkeypatch.setenv("DTRAIN_DEBIAN_DATASETS", str(tmp_path / "debian"))
    return raw


def test_debian_folder_is_used_and_verified_by_decompressed_sha256(fake_debian, tmp_path):
    assert datasets.has_debian("fashion-mnist") and not datasets.has_debian("mnist")
    assert datasets.locate("fashion-mnist") == ("debian", str(tmp_path / "debian" / "fashion-mnist"))
    files = datasets.fetch_files("fashion-mnist")
    assert {f["origin"] for f in files.values()} == {f"debian:{tmp_path / 'debian' / 'fashion-mnist'}"}
    assert files["t10k-images-idx3-ubyte"]["path"].read_bytes() == fake_debian["t10k-images-idx3-ubyte"]
    assert datasets.locate("fashion-mnist")[0] == "cache"


def test_debian_file_with_wrong_content_is_refused(fake_debian, monkeypatch):
    monkeypatch.setitem(dataset_sources.IDX_SHA256["fashion-mnist"], "train-labels-idx1-ubyte", "f" * 64)
    with pytest.raises(DatasetError, match="checksum mismatch for train-labels-idx1-ubyte from debian:.*; "
                                           "download of .* failed"):
        datasets.fetch("fashion-mnist")
    assert "train-labels-idx1-ubyte" not in cache_listing("fashion-mnist")


def test_auto_prefers_downloadable_mnist(mnist_mirror, fake_debian, capsys):
    assert datasets.choose_auto() == ("mnist", f"downloadable from {mnist_mirror[0]}")
    assert datasets.resolve_name("auto") == "mnist"
    assert "dataset auto -> mnist (downloadable from" in capsys.readouterr().err


def test_auto_prefers_cached_mnist(mnist_mirror, monkeypatch):
    datasets.fetch("mnist")
    monkeypatch.setenv("DTRAIN_MNIST_MIRRORS", closed_port_url())
    assert datasets.choose_auto()[1].startswith("cached in ")


def test_auto_falls_back_to_fashion_mnist_from_debian(fake_debian):
    name, reason = datasets.choose_auto()
    assert (name, reason.split(" in ")[0]) == ("fashion-mnist", "Debian package")


def test_auto_with_nothing_available():
    with pytest.raises(DatasetError, match="no dataset available"):
        datasets.resolve_name("auto")


def test_unknown_name_lists_choices():
    with pytest.raises(DatasetError, match=r"^unknown dataset 'cifar10': choose one of auto, mnist, fashion-mnist$"):
        datasets.resolve_name("cifar10")
    assert datasets.resolve_name("fashion-mnist") == "fashion-mnist"
    assert datasets.class_names("fashion-mnist")[9] == "Ankle boot"
    assert datasets.class_names("mnist") == [str(d) for d in range(10)]


def test_load_local_normalises(mnist_mirror):
    _, raw = mnist_mirror
    images, labels = datasets.load_local("mnist", "test")
    assert tuple(images.shape) == (12, 1, 28, 28) and str(images.dtype) == "torch.float32"
    assert tuple(labels.shape) == (12,) and str(labels.dtype) == "torch.int64"
    pixels = np.frombuffer(raw["t10k-images-idx3-ubyte"], np.uint8, offset=16).reshape(12, 28, 28)
    expected = (pixels / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(images[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == list(raw["t10k-labels-idx1-ubyte"][8:])


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist_matches_field_notes(monkeypatch):
    monkeypatch.setenv("DTRAIN_DEBIAN_DATASETS", str(DEBIAN_FASHION.parent))
    assert dataset_sources.IDX_SHA256["fashion-mnist"] == FASHION_SHA256
    for stem, expected in FASHION_SHA256.items():
        assert hashlib.sha256(gzip.decompress((DEBIAN_FASHION / f"{stem}.gz").read_bytes())).hexdigest() == expected
    images, labels = datasets.load_local("fashion-mnist", "train")
    assert tuple(images.shape) == (60000, 1, 28, 28)
    assert abs(float(images.mean())) < 1e-3 and abs(float(images.std()) - 1) < 1e-3  # the hard-coded mean/std
    assert np.bincount(labels.numpy()).tolist() == [6000] * 10


# --- publishing to S3 and loading back (real MinIO) ------------------------------------------
@pytest.fixture
def published(s3, bucket, mnist_mirror):
    """The small generated MNIST, prepared into a fresh bucket; returns (bucket, raw, manifest)."""
    return bucket, mnist_mirror[1], datasets.prepare("mnist", bucket=bucket)


def test_prepare_publishes_files_then_manifest(published):
    from dtrain import storage

    bucket, raw, manifest = published
    keys = sorted(o["key"] for o in storage.list_objects(bucket, "mnist/"))
    assert keys == sorted([f"mnist/{s}.gz" for s in datasets.FILES] + ["mnist/manifest.json"])
    stored = json.loads(storage.get_bytes(bucket, "mnist/manifest.json"))
    assert stored == {k: v for k, v in manifest.items() if k != "transfer"}
    assert stored["splits"]["train"]["count"] == 40 and stored["splits"]["test"]["count"] == 12
    entry = stored["files"]["train-images-idx3-ubyte"]
    assert entry["shape"] == [40, 28, 28] and entry["sha256"] == hashlib.sha256(raw[
        "train-images-idx3-ubyte"]).hexdigest()
    assert gzip.decompress(storage.get_bytes(bucket, entry["key"])) == raw["train-images-idx3-ubyte"]
    assert hashlib.sha256(storage.get_bytes(bucket, entry["key"])).hexdigest() == entry["gz_sha256"]
    assert stored["classes"] == [str(d) for d in range(10)] and stored["source"].startswith("http://127.0.0.1:")
    assert manifest["transfer"]["uploaded_files"] == 5 and manifest["transfer"]["skipped_files"] == 0


def test_second_prepare_uploads_nothing(published):
    bucket, _, first = published
    again = datasets.prepare("mnist", bucket=bucket)
    assert again["transfer"] == {"uploaded_files": 0, "uploaded_bytes": 0, "skipped_files": 5,
                                 "skipped_bytes": first["transfer"]["uploaded_bytes"]}
    assert "uploaded 0 files (0.0 kB), skipped 5" in datasets.format_transfer(again, bucket)


def test_prepare_repairs_a_replaced_object_and_recompresses_reproducibly(published):
    from dtrain import storage

    bucket, raw, first = published
    storage.upload_bytes(b"not the data", bucket, "mnist/t10k-images-idx3-ubyte.gz")
    repaired = datasets.prepare("mnist", bucket=bucket)["transfer"]
    assert (repaired["uploaded_files"], repaired["skipped_files"]) == (1, 4)  # the manifest is unchanged
    # Without a manifest every file is gzipped again: same bytes, so nothing but the manifest goes up.
    storage.delete(bucket, "mnist/manifest.json")
    rebuilt = datasets.prepare("mnist", bucket=bucket)
    assert (rebuilt["transfer"]["uploaded_files"], rebuilt["transfer"]["skipped_files"]) == (1, 4)
    assert rebuilt["files"] == first["files"]


def test_load_reads_s3_and_matches_local(published):
    bucket, raw, _ = published
    images, labels = datasets.load("mnist", "train", bucket=bucket)
    assert tuple(images.shape) == (40, 1, 28, 28) and str(images.dtype) == "torch.float32"
    assert str(labels.dtype) == "torch.int64" and labels.tolist() == list(raw["train-labels-idx1-ubyte"][8:])
    local_images, _ = datasets.load_local("mnist", "train")
    assert bool((images == local_images).all())
    assert datasets.load("auto", "test", bucket=bucket)[0].shape[0] == 12


def test_load_refuses_object_that_differs_from_manifest(published):
    from dtrain import storage

    bucket, raw, _ = published
    tampered = bytearray(raw["t10k-labels-idx1-ubyte"])
    tampered[8] = (tampered[8] + 1) % 10
    storage.upload_bytes(gzip.compress(bytes(tampered)), bucket, "mnist/t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match=r"s3://.*/mnist/t10k-labels-idx1-ubyte.gz: sha256 .* does not match"):
        datasets.load("mnist", "test", bucket=bucket)


def test_load_missing_dataset_says_what_to_run(s3, bucket):
    with pytest.raises(DatasetError, match=rf"^dataset 'fashion-mnist' not found in s3://{bucket}/fashion-mnist/: "
                                           r"run 'dtrain data prepare --dataset fashion-mnist'$"):
        datasets.load("fashion-mnist", "train", bucket=bucket)
    with pytest.raises(DatasetError, match="no dataset in s3://"):
        datasets.load("auto", bucket=bucket)
    with pytest.raises(DatasetError, match="unknown split 'validation'"):
        datasets.load("mnist", "validation", bucket=bucket)


def test_cli_prepare_and_info(s3, bucket, mnist_mirror, capsys):
    assert cli.main(["data", "prepare", "--dataset", "mnist", "--bucket", bucket]) == 0
    out = capsys.readouterr().out
    assert f"mnist (train 40, test 12) in s3://{bucket}/mnist/ from http://127.0.0.1:" in out
    assert "uploaded 5 files" in out
    assert cli.main(["data", "info", "--dataset", "mnist", "--bucket", bucket]) == 0
    out = capsys.readouterr().out
    assert "5 objects" in out and re.search(r"\nmanifest +train 40, test 12; source http", out)
    assert cli.main(["data", "info", "--bucket", bucket, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["dataset"] for r in reports] == ["mnist", "fashion-mnist"]
    assert reports[1]["manifest"] is None and "not found" in reports[1]["bucket_note"]


def test_cli_failure_is_one_line_exit_2(capsys):
    assert cli.main(["data", "fetch", "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtrain: error: could not fetch mnist") and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_round_trip_through_minio(s3, bucket, monkeypatch):
    monkeypatch.setenv("DTRAIN_DEBIAN_DATASETS", str(DEBIAN_FASHION.parent))
    manifest = datasets.prepare("fashion-mnist", bucket=bucket)
    assert manifest["splits"]["train"]["count"] == 60000 and manifest["splits"]["test"]["count"] == 10000
    assert {s: e["sha256"] for s, e in manifest["files"].items()} == FASHION_SHA256
    images, labels = datasets.load("fashion-mnist", "test", bucket=bucket)
    assert tuple(images.shape) == (10000, 1, 28, 28) and np.bincount(labels.numpy()).tolist() == [1000] * 10
    assert datasets.prepare("fashion-mnist", bucket=bucket)["transfer"]["uploaded_files"] == 0
