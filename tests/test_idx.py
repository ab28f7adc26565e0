"""The strict IDX parser: round trips, and one clear DatasetError per kind of damage."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from dtrain.errors import DatasetError
from dtrain.idx import check_pair, encode_idx, gzip_reproducible, read_idx

RNG = np.random.default_rng(7)
IMAGES = RNG.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
LABELS = np.array([0, 9, 3, 3, 7], dtype=np.uint8)


def test_round_trip_bytes_and_file(tmp_path):
    data = encode_idx(IMAGES)
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (5, 28, 28)
    assert len(data) == 16 + 5 * 28 * 28
    np.testing.assert_array_equal(read_idx(data), IMAGES)

    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(encode_idx(LABELS))
    labels = read_idx(path, expect="labels")
    assert labels.dtype == np.uint8 and labels.tolist() == [0, 9, 3, 3, 7]
    assert check_pair(read_idx(data, expect="images"), labels, "pair") == 5


def test_empty_dataset_is_valid():
    assert read_idx(encode_idx(np.zeros((0,), np.uint8))).shape == (0,)


def _header(magic: int, *dims: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)


GOOD_IMAGES = encode_idx(IMAGES)
GOOD_LABELS = encode_idx(LABELS)
MALFORMED = {
    "empty": (b"", "truncated IDX header"),
    "short header": (GOOD_IMAGES[:10], "truncated IDX header"),
    "truncated data": (GOOD_IMAGES[:-1], "truncated, header promises 3920 data bytes but 3919 follow"),
    "trailing garbage": (GOOD_LABELS + b"\x00\x01", "trailing garbage, 2 bytes after the 5 data bytes"),
    "nonzero leading bytes": (b"\x01\x00" + GOOD_LABELS[2:], "wrong magic 0x01000801"),
    "two-dimensional": (_header(0x00000802, 5, 784) + bytes(5 * 784), "wrong magic 0x00000802"),
    "float type byte": (_header(0x00000D01, 5) + bytes(20), "wrong type byte 0x0d"),
    "not 28x28": (_header(0x00000803, 2, 32, 32) + bytes(2 * 32 * 32), "must be N x 28 x 28"),
    "label 10": (encode_idx(np.array([1, 10, 2], np.uint8)), "label 10 at index 1 is outside 0..9"),
    "label 255": (encode_idx(np.array([255], np.uint8)), "label 255 at index 0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_names_file_and_problem(case):
    data, problem = MALFORMED[case]
    with pytest.raises(DatasetError) as info:
        read_idx(data, name="t10k-images-idx3-ubyte")
    message = str(info.value)
    assert message.startswith("t10k-images-idx3-ubyte: ")
    assert problem in message
    assert "\n" not in message


def test_malformed_file_on_disk_is_named_by_path(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(GOOD_IMAGES + b"junk")
    with pytest.raises(DatasetError, match=r"^train-images-idx3-ubyte: trailing garbage, 4 bytes"):
        read_idx(path)


def test_missing_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="cannot read IDX file .*nothing-here"):
        read_idx(tmp_path / "nothing-here")


def test_expect_kind_is_checked():
    with pytest.raises(DatasetError, match="expected an IDX labels file, found images"):
        read_idx(GOOD_IMAGES, name="x", expect="labels")


def test_count_mismatch():
    with pytest.raises(DatasetError, match=r"^mnist train: count mismatch, 5 images but 4 labels$"):
        check_pair(IMAGES, LABELS[:4], "mnist train")


def test_encode_refuses_other_dtypes():
    with pytest.raises(DatasetError, match="uint8"):
        encode_idx(IMAGES.astype(np.int16))


def test_gzip_is_reproducible():
    first, second = gzip_reproducible(GOOD_IMAGES), gzip_reproducible(GOOD_IMAGES)
    assert first == second
    assert first[4:8] == b"\x00\x00\x00\x00"  # gzip header mtime field
    assert gzip.decompress(first) == GOOD_IMAGES
