"""Loading the dataset from MinIO versus local disk, with the same decode.

Two comparisons, each repeated with the two sides alternating (so a background load on
the machine hits both alike), reported as medians:

* **same bytes, same decode** (the headline ratio): the published gzipped IDX objects are
  fetched from MinIO with ``storage.get_bytes`` (transfer + size/sha256 check) or read
  from a local copy of the very same .gz files; then both go through one identical
  decode: gunzip → sha256 against manifest.json → IDX parse → normalised tensors. Only
  the storage medium differs.
* **the library's two loaders**: ``datasets.load`` (MinIO, gzipped objects) against
  ``datasets.load_local`` (the decompressed IDX cache on disk). These differ by more than
  the medium — the local cache is already decompressed — and the stage breakdown shows
  what that costs.
"""

from __future__ import annotations

import gzip
import statistics
import time
from pathlib import Path

from dtrain import config, datasets, storage
from dtrain.dataset_sources import SPLITS
from dtrain.errors import DatasetError
from dtrain.idx import check_pair, read_idx, sha256_hex


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def decode(name: str, manifest: dict, read_gz) -> None:
    """gzipped IDX bytes (from ``read_gz(entry)``) → the training/test tensors, verified."""
    for split, (img, lbl) in SPLITS.items():
        arrays = []
        for stem in (img, lbl):
            entry = manifest["files"][stem]
            raw = gzip.decompress(read_gz(entry))
            if sha256_hex(raw) != entry["sha256"]:
                raise DatasetError(f"{entry['key']}: sha256 differs from manifest.json")
            arrays.append(read_idx(raw, expect=datasets.kind_of(stem)))
        check_pair(*arrays, f"{name} {split}")
        datasets.to_tensors(*arrays, name)


def local_copies(name: str, manifest: dict) -> Path:
    """The published .gz objects downloaded once to a local folder (byte-identical)."""
    folder = config.state_dir() / "bench" / name
    for entry in manifest["files"].values():
        path = folder / Path(entry["key"]).name
        if not path.is_file() or path.stat().st_size != entry["gz_size"]:
            storage.download_file(config.DATASETS_BUCKET, entry["key"], path)
    return folder


def compare(name: str, repetitions: int = 5) -> dict:
    """Both comparisons; seconds are for train + test splits together."""
    datasets.prepare(name)  # idempotent: publishes to s3://datasets/<name>/ once
    manifest = datasets.read_manifest(name)
    folder = local_copies(name, manifest)
    from_minio = lambda entry: storage.get_bytes(config.DATASETS_BUCKET, entry["key"])  # noqa: E731
    from_disk = lambda entry: (folder / Path(entry["key"]).name).read_bytes()  # noqa: E731
    decode(name, manifest, from_minio)  # warm-up: client, connection pool, page cache
    same = {"minio": [], "disk": []}
    library = {"minio": [], "disk": []}
    for _ in range(repetitions):
        same["minio"].append(_timed(lambda: decode(name, manifest, from_minio)))
        same["disk"].append(_timed(lambda: decode(name, manifest, from_disk)))
        for side, loader in (("minio", datasets.load), ("disk", datasets.load_local)):
            datasets.clear_memory_cache()
            library[side].append(_timed(lambda loader=loader: [loader(name, s) for s in ("train", "test")]))
    datasets.clear_memory_cache()
    return {"repetitions": repetitions,
            "minio_s": [round(s, 3) for s in same["minio"]], "disk_s": [round(s, 3) for s in same["disk"]],
            "minio_median_s": _median(same["minio"]), "disk_median_s": _median(same["disk"]),
            "library_load_s": [round(s, 3) for s in library["minio"]],
            "library_load_local_s": [round(s, 3) for s in library["disk"]],
            "library_load_median_s": _median(library["minio"]),
            "library_load_local_median_s": _median(library["disk"]),
            "minio_stages_s": minio_stages(name, manifest)}


def minio_stages(name: str, manifest: dict) -> dict:
    """Where the seconds of one MinIO load of the training images go, stage by stage."""
    entry = manifest["files"]["train-images-idx3-ubyte"]
    labels = read_idx(gzip.decompress(storage.get_bytes(
        config.DATASETS_BUCKET, manifest["files"]["train-labels-idx1-ubyte"]["key"])), expect="labels")
    stages, payload = {}, {}
    stages["get_object_verified"] = _timed(
        lambda: payload.update(gz=storage.get_bytes(config.DATASETS_BUCKET, entry["key"])))
    stages["gunzip"] = _timed(lambda: payload.update(raw=gzip.decompress(payload["gz"])))
    stages["sha256"] = _timed(lambda: sha256_hex(payload["raw"]))
    stages["parse_idx"] = _timed(lambda: payload.update(images=read_idx(payload["raw"], expect="images")))
    stages["to_tensors"] = _timed(lambda: datasets.to_tensors(payload["images"], labels, name))
    return {"object": entry["key"], "gz_bytes": entry["gz_size"], "raw_bytes": entry["size"],
            **{k: round(v, 3) for k, v in stages.items()}}
