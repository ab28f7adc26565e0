"""The IDX file format of MNIST and Fashion-MNIST, read strictly.

An IDX file is two zero bytes, a type byte (0x08 = unsigned byte), a byte giving the
number of dimensions, each dimension as a big-endian uint32, then exactly that many
data bytes. Images are ``0x00000803`` (N, 28, 28); labels are ``0x00000801`` (N,).

The parser refuses anything else with a one-line :class:`DatasetError` naming the
file and the problem, because a silently short or padded file would train a model on
shifted pixels without any visible error.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from dtrain.errors import DatasetError

UBYTE = 0x08
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SIDE = 28
NUM_CLASSES = 10
_KIND_BY_MAGIC = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}


def sha256_hex(data: bytes) -> str:
    """The sha256 of bytes, as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def gzip_reproducible(data: bytes) -> bytes:
    """Gzip with a zero timestamp and no file name, so equal input gives equal bytes
    and a second upload of the same data is recognised and skipped."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def _source_bytes(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    """The raw bytes of ``source`` plus the name to use in error messages."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), name or "<bytes>"
    path = Path(source)
    try:
        return path.read_bytes(), name or path.name
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc.strerror or exc}") from exc


def parse_header(data: bytes, name: str) -> tuple[str, tuple[int, ...], int]:
    """Check the header; return (kind, dims, header length). ``kind`` is images/labels."""
    if len(data) < 4:
        raise DatasetError(f"{name}: truncated IDX header ({len(data)} bytes, need at least 4)")
    zero0, zero1, type_byte, ndim = data[:4]
    magic = struct.unpack(">I", data[:4])[0]
    if zero0 or zero1:
        raise DatasetError(f"{name}: wrong magic 0x{magic:08x} (an IDX file starts with two zero bytes)")
    if type_byte != UBYTE:
        raise DatasetError(f"{name}: wrong type byte 0x{type_byte:02x} (only 0x08, unsigned byte, is supported)")
    kind = _KIND_BY_MAGIC.get(magic)
    if kind is None:
        raise DatasetError(f"{name}: wrong magic 0x{magic:08x} (expected 0x{IMAGES_MAGIC:08x} for images "
                           f"or 0x{LABELS_MAGIC:08x} for labels)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{name}: truncated IDX header ({len(data)} bytes, need {header_len})")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if kind == "images" and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(f"{name}: images must be N x {IMAGE_SIDE} x {IMAGE_SIDE}, header says "
                           f"{' x '.join(map(str, dims))}")
    return kind, dims, header_len


def read_idx(source: str | Path | bytes, name: str | None = None, expect: str | None = None) -> np.ndarray:
    """Parse an uncompressed IDX file (a path or its bytes) into a uint8 array.

    ``expect`` ("images" or "labels") also checks which of the two it is. Labels must
    lie in 0..9. Every problem raises :class:`DatasetError` naming ``name`` (default:
    the file name).
    """
    data, name = _source_bytes(source, name)
    kind, dims, header_len = parse_header(data, name)
    if expect and kind != expect:
        raise DatasetError(f"{name}: expected an IDX {expect} file, found {kind}")
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(data) - header_len
    if found < expected:
        raise DatasetError(f"{name}: truncated, header promises {expected} data bytes but {found} follow")
    if found > expected:
        raise DatasetError(f"{name}: trailing garbage, {found - expected} bytes after the {expected} data bytes")
    array = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
    if kind == "labels" and array.size and int(array.max()) >= NUM_CLASSES:
        bad = int(np.argmax(array >= NUM_CLASSES))
        raise DatasetError(f"{name}: label {int(array[bad])} at index {bad} is outside 0..{NUM_CLASSES - 1}")
    return array


def check_pair(images: np.ndarray, labels: np.ndarray, name: str) -> int:
    """Check that an images array and a labels array belong together; return the count."""
    if len(images) != len(labels):
        raise DatasetError(f"{name}: count mismatch, {len(images)} images but {len(labels)} labels")
    return len(images)


def encode_idx(array: np.ndarray) -> bytes:
    """Serialise a uint8 array of shape (N,) or (N, 28, 28) as IDX bytes (the inverse
    of :func:`read_idx`; used to generate small test datasets)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise DatasetError(f"can only encode uint8 arrays of 1 or 3 dimensions, got {array.dtype} {array.shape}")
    header = bytes((0, 0, UBYTE, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()
