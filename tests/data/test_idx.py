"""read_idx: round trips, every kind of broken file, and the real MNIST test set."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlsyskit.data import read_idx
from mlsyskit.errors import UserError


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(7, dtype=np.uint8),
        (np.arange(2 * 28 * 28) % 256).astype(np.uint8).reshape(2, 28, 28),
        np.array([[-5, 3], [2, 1]], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    ],
    ids=["labels", "images", "int32", "float32"],
)
def test_round_trip(tmp_path: Path, make_idx, array: np.ndarray, compress: bool) -> None:
    path = make_idx(tmp_path / "f.idx", array, compress=compress)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # writable, so torch.from_numpy works without a warning


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    array=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)),
    compress=st.booleans(),
)
def test_round_trip_property(tmp_path: Path, make_idx, array: np.ndarray, compress: bool) -> None:
    # The same file name each example: the writer overwrites it.
    out = read_idx(make_idx(tmp_path / "p.idx", array, compress=compress))
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_gzip_detected_by_content_not_extension(tmp_path: Path, make_idx) -> None:
    array = np.arange(10, dtype=np.uint8)
    gz_named_raw = make_idx(tmp_path / "raw.gz", array, compress=False)
    raw_named_gz = make_idx(tmp_path / "data.idx", array, compress=True)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)


def _broken(tmp_path: Path, name: str, data: bytes, gz: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


GOOD = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + b"\x01\x02\x03"


@pytest.mark.parametrize(
    ("data", "gz", "what"),
    [
        (b"", False, "not an IDX file"),
        (b"\x00\x00", False, "not an IDX file"),
        (b"\x12\x34\x08\x01" + GOOD[4:], False, "magic number 0x12340801"),
        (b"\x00\x00\x07\x01" + GOOD[4:], False, "magic number 0x00000701"),
        (b"\x00\x00\x08\x00", False, "magic number 0x00000800"),
        (b"\x00\x00\x08\x03" + (3).to_bytes(4, "big"), False, "header needs 16 bytes"),
        (GOOD[:-1], False, "truncated"),
        (GOOD[:-1], True, "truncated"),
        (GOOD + b"\x00", False, "1 extra bytes"),
        (
            bytes([0, 0, 8, 3]) + np.array([2, 28, 28], ">u4").tobytes() + bytes(100),
            True,
            "truncated",
        ),
    ],
    ids=[
        "empty",
        "short",
        "bad-zero-bytes",
        "bad-type",
        "zero-dims",
        "short-header",
        "short-payload",
        "short-payload-gz",
        "extra-bytes",
        "images-truncated-gz",
    ],
)
def test_broken_idx_names_file_and_problem(
    tmp_path: Path, data: bytes, gz: bool, what: str
) -> None:
    path = _broken(tmp_path, "bad-file.gz", data, gz)
    with pytest.raises(UserError) as err:
        read_idx(path)
    message = str(err.value)
    assert str(path) in message and what in message
    assert "\n" not in message


def test_bad_gzip_names_file(tmp_path: Path) -> None:
    corrupt = _broken(tmp_path, "corrupt.gz", b"\x1f\x8b\x08\x00" + b"not deflate data at all" * 4)
    truncated = _broken(tmp_path, "truncated.gz", gzip.compress(GOOD * 50)[:-12])
    for path in (corrupt, truncated):
        with pytest.raises(UserError, match="gzip") as err:
            read_idx(path)
        assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        read_idx(tmp_path / "nope")


def test_real_mnist_test_set(shared_data: Path) -> None:
    images = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.max() == 255 and images.min() == 0
