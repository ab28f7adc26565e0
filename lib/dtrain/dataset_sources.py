"""Where MNIST and Fashion-MNIST come from, verified, into the local cache.

Sources, in order:
1. the local cache (``config.cache_dir()/<name>/``): decompressed IDX files, each with a
   ``<file>.json`` sidecar naming its sha256 and origin; a file whose sha256 no longer
   matches is ignored and fetched again;
2. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/<name>/``, override
   the parent folder with ``DTRAIN_DEBIAN_DATASETS``);
3. download mirrors (override with ``DTRAIN_MNIST_MIRRORS`` / ``DTRAIN_FASHION_MNIST_MIRRORS``,
   comma-separated base URLs).

Identity is the sha256 of the *decompressed* IDX bytes: Debian recompressed its gzip
files, so their md5 differs from the published one while the data is the same. Downloads
are also checked against the published md5 of the upstream gzip files. Every file is
written to a temporary name and renamed only once verified: the cache never holds half
a file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from dtrain import config
from dtrain.errors import ConfigError, DatasetError
from dtrain.idx import read_idx

DATASETS = ("mnist", "fashion-mnist")
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FILES = tuple(stem for pair in SPLITS.values() for stem in pair)

MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
}
# Published md5 of the upstream gzip files (torchvision lists the same values).
# Tests replace these tables with the checksums of small generated files.
GZ_MD5 = {
    "mnist": {"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion-mnist": {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"},
}
# sha256 of the decompressed IDX bytes, measured on Debian's files. MNIST's are not
# pinned here (no trusted source offline): its downloads are verified by the gzip md5
# and the sha256 measured then is recorded in the cache sidecar and in manifest.json.
IDX_SHA256 = {
    "mnist": {},
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
}
DEBIAN_DATASETS = "/usr/share/datasets"
HEAD_TIMEOUT_S = 3
DOWNLOAD_TIMEOUT_S = 10


# --- names -----------------------------------------------------------------------------------
def check_name(name: str) -> str:
    """Return ``name`` if it is a known dataset, else raise naming the choices."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}': choose one of auto, {', '.join(DATASETS)}")
    return name


def kind_of(stem: str) -> str:
    """'images' or 'labels', from a file stem such as 'train-images-idx3-ubyte'."""
    return "images" if "-images-" in stem else "labels"


# --- where a dataset can come from ------------------------------------------------------------
def mirrors(name: str) -> list[str]:
    """Base URLs to download from, each ending in '/'."""
    override = os.environ.get(f"DTRAIN_{check_name(name).upper().replace('-', '_')}_MIRRORS")
    bases = [b.strip() for b in override.split(",") if b.strip()] if override else MIRRORS[name]
    return [b if b.endswith("/") else b + "/" for b in bases]


def debian_dir(name: str) -> Path:
    """Where Debian's dataset package puts the gzip files of ``name``."""
    return Path(os.environ.get("DTRAIN_DEBIAN_DATASETS", DEBIAN_DATASETS)) / check_name(name)


def has_debian(name: str) -> bool:
    folder = debian_dir(name)
    return all((folder / f"{stem}.gz").is_file() for stem in FILES)


def dataset_cache(name: str) -> Path:
    path = config.cache_dir() / check_name(name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_file(name: str, stem: str) -> dict | None:
    """The verified cache entry {path, sha256, origin} of one file, or None."""
    path = dataset_cache(name) / stem
    if not path.is_file():
        return None
    try:
        meta = config.read_json(path.with_name(f"{stem}.json")) or {}
    except ConfigError:
        meta = {}
    expected = IDX_SHA256[name].get(stem) or meta.get("sha256")
    # Without a sidecar or a pinned sha256 nothing vouches for the file: fetch it again.
    if not expected or _file_sha256(path) != expected:
        return None
    return {"path": path, "sha256": expected, "origin": meta.get("origin", "cache")}


def is_cached(name: str) -> bool:
    return all(cached_file(name, stem) for stem in FILES)


def reachable_mirror(name: str, timeout: float = HEAD_TIMEOUT_S) -> str | None:
    """The first mirror answering a HEAD request for the smallest file, or None."""
    for base in mirrors(name):
        request = urllib.request.Request(base + "t10k-labels-idx1-ubyte.gz", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status == 200:
                    return base
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return None


def locate(name: str, probe_mirrors: bool = True) -> tuple[str, str] | None:
    """Which source :func:`fetch` would use now, as (kind, where): ('cache', folder),
    ('debian', folder) or ('mirror', url); None when nothing is available."""
    if is_cached(name):
        return "cache", str(dataset_cache(name))
    if has_debian(name):
        return "debian", str(debian_dir(name))
    base = reachable_mirror(name) if probe_mirrors else None
    return ("mirror", base) if base else None


def choose_auto() -> tuple[str, str]:
    """Pick a dataset for 'auto': the first of DATASETS (MNIST first) that is cached,
    packaged by Debian or downloadable. Returns (name, reason)."""
    for name in DATASETS:
        found = locate(name)
        if found:
            kind, where = found
            return name, {"cache": f"cached in {where}", "debian": f"Debian package in {where}",
                          "mirror": f"downloadable from {where}"}[kind]
    raise DatasetError("no dataset available: nothing cached, no Debian dataset-fashion-mnist in "
                       f"{debian_dir('fashion-mnist')}, and no mirror reachable")


def resolve_name(name: str = "auto") -> str:
    """A concrete dataset name; 'auto' is resolved by :func:`choose_auto` and the choice
    printed to stderr, so logs show which data a run used."""
    if name != "auto":
        return check_name(name)
    chosen, reason = choose_auto()
    print(f"dataset auto -> {chosen} ({reason})", file=sys.stderr)
    return chosen


# --- fetching into the cache -----------------------------------------------------------------
def _temp_in(folder: Path, stem: str, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def _download(name: str, stem: str, base: str) -> Path:
    """Stream ``<base><stem>.gz`` to a temporary file in the cache folder and check its
    md5; the caller owns (and deletes) the returned file. Raises on any failure."""
    from tqdm.auto import tqdm

    url = f"{base}{stem}.gz"
    tmp = _temp_in(dataset_cache(name), stem, ".gz.part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}/{stem}.gz", leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        expected = GZ_MD5[name].get(stem)
        if expected and digest.hexdigest() != expected:
            raise DatasetError(f"checksum mismatch for {stem}.gz from {base}: md5 {digest.hexdigest()}, "
                               f"expected {expected}")
        return tmp
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(f"download of {url} failed: {reason}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ingest(gz_path: Path, name: str, stem: str, origin: str) -> dict:
    """Decompress ``gz_path`` into the cache, check sha256 and IDX structure, then rename
    it into place and write its sidecar. Nothing is left behind on failure."""
    folder = dataset_cache(name)
    tmp = _temp_in(folder, stem, ".part")
    digest = hashlib.sha256()
    try:
        try:
            with gzip.open(gz_path, "rb") as source, open(tmp, "wb") as out:
                for block in iter(lambda: source.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DatasetError(f"{stem}.gz from {origin} is not a valid gzip file ({exc})") from exc
        expected = IDX_SHA256[name].get(stem)
        if expected and digest.hexdigest() != expected:
            raise DatasetError(f"checksum mismatch for {stem} from {origin}: decompressed sha256 "
                               f"{digest.hexdigest()[:16]}…, expected {expected[:16]}…")
        array = read_idx(tmp, name=f"{stem} from {origin}", expect=kind_of(stem))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other local users (Ray workers) read the cache
        os.replace(tmp, folder / stem)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {"sha256": digest.hexdigest(), "origin": origin, "shape": list(array.shape)}
    config.write_json_atomic(folder / f"{stem}.json", meta, mode=0o644)
    return {"path": folder / stem, "sha256": meta["sha256"], "origin": origin}


def fetch_file(name: str, stem: str) -> dict:
    """One verified decompressed IDX file in the cache, as {path, sha256, origin}."""
    found = cached_file(name, stem)
    if found:
        return found
    errors = []
    debian_gz = debian_dir(name) / f"{stem}.gz"
    if debian_gz.is_file():
        try:
            return _ingest(debian_gz, name, stem, origin=f"debian:{debian_gz.parent}")
        except DatasetError as exc:
            errors.append(str(exc))
    for base in mirrors(name):
        try:
            tmp = _download(name, stem, base)
        except DatasetError as exc:
            errors.append(str(exc))
            continue
        try:
            return _ingest(tmp, name, stem, origin=base)
        except DatasetError as exc:
            errors.append(str(exc))
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetError(f"could not fetch {name} {stem}: " + "; ".join(errors or ["no source configured"]))


def fetch_files(name: str) -> dict[str, dict]:
    """All four files of a dataset, {stem: {path, sha256, origin}}."""
    name = check_name(name)
    return {stem: fetch_file(name, stem) for stem in FILES}


def fetch(name: str) -> dict[str, dict[str, Path]]:
    """Local paths of the decompressed IDX files: {split: {"images": path, "labels": path}}."""
    files = fetch_files(name)
    return {split: {"images": files[img]["path"], "labels": files[lbl]["path"]}
            for split, (img, lbl) in SPLITS.items()}


