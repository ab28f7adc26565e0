"""MNIST and Fashion-MNIST for the lab: publish them to S3, load them as tensors.

:mod:`dtrain.dataset_sources` finds and verifies the files locally (cache, Debian
package, mirrors); this module publishes them to ``s3://<bucket>/<name>/`` with a
manifest.json and reads them back, checking every file against the manifest.
"""

from __future__ import annotations

import functools
import gzip
import json
import zlib
from pathlib import Path

from dtrain import config
from dtrain.dataset_sources import (  # noqa: F401 - re-exported: datasets is the public entry point
    DATASETS,
    FILES,
    SPLITS,
    check_name,
    choose_auto,
    debian_dir,
    fetch,
    fetch_file,
    fetch_files,
    has_debian,
    is_cached,
    kind_of,
    locate,
    mirrors,
    resolve_name,
)
from dtrain.errors import DatasetError, DtrainError
from dtrain.idx import check_pair, gzip_reproducible, read_idx, sha256_hex  # noqa: F401 - read_idx re-exported

# Pixel mean/std of the training set after scaling to [0, 1]. Fashion-MNIST's were
# computed once from Debian's train-images (0.28604, 0.35302).
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}
MANIFEST = "manifest.json"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    return split


def class_names(name: str) -> list[str]:
    """The ten class names, index = label."""
    return list(CLASS_NAMES[check_name(name)])


# --- publishing to S3 ------------------------------------------------------------------------
def _count(transfer: dict, uploaded: bool, size: int) -> None:
    done = "uploaded" if uploaded else "skipped"
    transfer[f"{done}_files"] += 1
    transfer[f"{done}_bytes"] += size


def _still_published(bucket: str, previous: dict | None, entry: dict) -> dict | None:
    """The previous manifest's entry for the same decompressed bytes, when the object it
    describes is still in the bucket unchanged. Lets a repeated prepare skip recompressing
    (gzip of the training images takes seconds)."""
    from dtrain import storage

    old = (previous or {}).get("files", {}).get(Path(entry["key"]).name.removesuffix(".gz"))
    if not old or old.get("sha256") != entry["sha256"] or old.get("key") != entry["key"]:
        return None
    try:
        info = storage.object_info(bucket, entry["key"])
    except DtrainError:
        return None
    return old if (info["sha256"], info["size"]) == (old.get("gz_sha256"), old.get("gz_size")) else None


def prepare(name: str = "auto", bucket: str = config.DATASETS_BUCKET) -> dict:
    """Fetch and validate a dataset, then publish it to ``s3://<bucket>/<name>/``: the four
    IDX files gzipped reproducibly, then manifest.json last (a reader never sees a manifest
    for files that are not there). Uploads are idempotent: a second run sends nothing.

    Returns the manifest plus a ``transfer`` entry (bytes/files uploaded and skipped) that
    is not part of the stored manifest.
    """
    from dtrain import storage

    name = resolve_name(name)
    files = fetch_files(name)
    raw = {stem: info["path"].read_bytes() for stem, info in files.items()}
    arrays = {stem: read_idx(data, name=f"{name} {stem}", expect=kind_of(stem)) for stem, data in raw.items()}
    splits = {split: {"images": img, "labels": lbl,
                      "count": check_pair(arrays[img], arrays[lbl], f"{name} {split}")}
              for split, (img, lbl) in SPLITS.items()}
    storage.ensure_bucket(bucket)
    try:
        previous = read_manifest(name, bucket)
    except DatasetError:
        previous = None
    entries, transfer = {}, {"uploaded_files": 0, "uploaded_bytes": 0, "skipped_files": 0, "skipped_bytes": 0}
    for stem in FILES:
        entry = {"key": f"{name}/{stem}.gz", "sha256": files[stem]["sha256"], "size": len(raw[stem]),
                 "count": int(arrays[stem].shape[0]), "shape": list(arrays[stem].shape),
                 "origin": files[stem]["origin"]}
        old = _still_published(bucket, previous, entry)
        if old:
            entry.update(gz_sha256=old["gz_sha256"], gz_size=old["gz_size"])
            _count(transfer, False, entry["gz_size"])
        else:
            packed = gzip_reproducible(raw[stem])
            result = storage.upload_bytes(packed, bucket, entry["key"], content_type="application/gzip")
            entry.update(gz_sha256=result["sha256"], gz_size=len(packed))
            _count(transfer, result["uploaded"], len(packed))
        entries[stem] = entry
    normalization = dict(zip(("mean", "std"), NORMALIZATION[name], strict=True))
    manifest = {"dataset": name, "format": "idx-gzip", "classes": class_names(name),
                "source": ", ".join(sorted({info["origin"] for info in files.values()})),
                "normalization": normalization, "files": entries, "splits": splits}
    body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    result = storage.upload_bytes(body, bucket, f"{name}/{MANIFEST}", content_type="application/json")
    _count(transfer, result["uploaded"], len(body))
    return {**manifest, "transfer": transfer}


def read_manifest(name: str, bucket: str = config.DATASETS_BUCKET) -> dict:
    """The manifest.json of a published dataset; a clear error when it is not there."""
    from dtrain import storage

    key = f"{check_name(name)}/{MANIFEST}"
    if not storage.exists(bucket, key):
        raise DatasetError(f"dataset '{name}' not found in s3://{bucket}/{name}/: "
                           f"run 'dtrain data prepare --dataset {name}'")
    try:
        return json.loads(storage.get_bytes(bucket, key))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"s3://{bucket}/{key} is not valid JSON ({exc}); run 'dtrain data prepare' "
                           "again") from exc


def published(bucket: str = config.DATASETS_BUCKET) -> list[str]:
    """The datasets that have a manifest in the bucket."""
    from dtrain import storage

    return [name for name in DATASETS if storage.exists(bucket, f"{name}/{MANIFEST}")]


# --- loading ---------------------------------------------------------------------------------
def to_tensors(images, labels, name: str):
    """uint8 arrays → (float32 N×1×28×28 normalised with the dataset's mean/std, int64 N)."""
    import numpy as np
    import torch

    mean, std = NORMALIZATION[name]
    pixels = images.astype(np.float32)
    # In place: the training set is 188 MB as float32; avoid two more temporaries.
    pixels *= np.float32(1 / (255 * std))
    pixels -= np.float32(mean / std)
    return torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _read_s3_idx(bucket: str, entry: dict, stem: str):
    from dtrain import storage

    where = f"s3://{bucket}/{entry['key']}"
    try:
        data = gzip.decompress(storage.get_bytes(bucket, entry["key"]))
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{where} is not a valid gzip file ({exc})") from exc
    if sha256_hex(data) != entry["sha256"]:
        raise DatasetError(f"{where}: sha256 of the decompressed data does not match manifest.json; "
                           "run 'dtrain data prepare' again")
    return read_idx(data, name=where, expect=kind_of(stem))


@functools.lru_cache(maxsize=4)  # a training split is 190 MB as float32
def _load_s3_split(bucket: str, name: str, split: str, manifest_json: str):
    # Keyed on the manifest text, so republished data is never served stale from memory.
    manifest = json.loads(manifest_json)
    img, lbl = SPLITS[split]
    images = _read_s3_idx(bucket, manifest["files"][img], img)
    labels = _read_s3_idx(bucket, manifest["files"][lbl], lbl)
    check_pair(images, labels, f"s3://{bucket}/{name} {split}")
    return to_tensors(images, labels, name)


def load(name: str, split: str = "train", bucket: str = config.DATASETS_BUCKET):
    """(images, labels) of one split read from S3 and checked against manifest.json:
    float32 N×1×28×28 normalised, int64 N. 'auto' means the first dataset published in
    the bucket. Cached in memory per process: treat the tensors as read-only."""
    check_split(split)
    if name == "auto":
        available = published(bucket)
        if not available:
            raise DatasetError(f"no dataset in s3://{bucket}/: run 'dtrain data prepare'")
        name = available[0]
    manifest = read_manifest(check_name(name), bucket)
    return _load_s3_split(bucket, name, split, json.dumps(manifest, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _load_local_split(name: str, split: str, images: tuple[str, str], labels: tuple[str, str]):
    # images/labels are (path, sha256): the sha256 keys the cache so changed files reload.
    pixels = read_idx(images[0], expect="images")
    targets = read_idx(labels[0], expect="labels")
    check_pair(pixels, targets, f"{name} {split}")
    return to_tensors(pixels, targets, name)


def load_local(name: str, split: str = "train"):
    """The same tensors as :func:`load`, read from the local source (cache, Debian or a
    mirror) instead of S3; for benchmarks comparing MinIO with local disk."""
    name, split = resolve_name(name), check_split(split)
    img, lbl = (fetch_file(name, stem) for stem in SPLITS[split])
    return _load_local_split(name, split, (str(img["path"]), img["sha256"]), (str(lbl["path"]), lbl["sha256"]))


def clear_memory_cache() -> None:
    """Forget tensors cached by :func:`load` and :func:`load_local` (benchmarks call this
    between timed runs)."""
    _load_s3_split.cache_clear()
    _load_local_split.cache_clear()


# --- reporting -------------------------------------------------------------------------------
def describe(name: str, bucket: str = config.DATASETS_BUCKET) -> dict:
    """What is known about a dataset: its local sources and what the bucket holds."""
    from dtrain import storage

    name = check_name(name)
    found = locate(name)
    report = {"dataset": name, "classes": class_names(name),
              "would_fetch_from": f"{found[0]}: {found[1]}" if found else None,
              "cached": bool(found and found[0] == "cache"),
              "debian_folder": str(debian_dir(name)) if has_debian(name) else None,
              "mirrors": mirrors(name), "bucket": bucket}
    report.update(objects=None, manifest=None, bucket_note=None)
    try:
        report["objects"] = storage.list_objects(bucket, f"{name}/")
        report["manifest"] = read_manifest(name, bucket)
    except DtrainError as exc:  # no S3, no bucket or not prepared: still report the local half
        report["bucket_note"] = str(exc)
    return report


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _split_counts(manifest: dict) -> str:
    return ", ".join(f"{split} {manifest['splits'][split]['count']}" for split in SPLITS)


def format_description(report: dict) -> str:
    """:func:`describe`'s report as aligned lines for the terminal."""
    manifest = report["manifest"]
    rows = [("dataset", report["dataset"]),
            ("local source", report["would_fetch_from"] or "none (not cached, no Debian package, no mirror)"),
            ("mirrors", ", ".join(report["mirrors"])),
            ("bucket", f"s3://{report['bucket']}/{report['dataset']}/: " + (
                "not readable" if report["objects"] is None else
                f"{len(report['objects'])} objects, {_megabytes(sum(o['size'] for o in report['objects']))}"))]
    if manifest:
        rows += [("manifest", f"{_split_counts(manifest)}; source {manifest['source']}")]
        rows += [(f"  {stem}", f"{entry['key']}  sha256 {entry['sha256'][:12]}…  shape {entry['shape']}")
                 for stem, entry in ((stem, manifest["files"][stem]) for stem in FILES)]
    else:
        rows += [("manifest", report["bucket_note"] or "none")]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def format_transfer(manifest: dict, bucket: str) -> str:
    """One line summing up what :func:`prepare` did."""
    t = manifest["transfer"]
    return (f"{manifest['dataset']} ({_split_counts(manifest)}) in s3://{bucket}/{manifest['dataset']}/ from {manifest['source']}: "
            f"uploaded {t['uploaded_files']} files ({_megabytes(t['uploaded_bytes'])}), "
            f"skipped {t['skipped_files']} already there ({_megabytes(t['skipped_bytes'])})")
