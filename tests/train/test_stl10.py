"""The STL-10 binary loader on small files written here in the release's format, and a short
training run of the STL-10 CNN on them."""

import json

import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.train import TrainConfig, train
from mlsyskit.train.stl10 import IMAGE_BYTES, SIDE, find_stl10, load_stl10


def _write_split(folder, split, images, labels):
    """The release's layout, written byte by byte: per image, channel after channel, each
    channel column-major (byte c*96*96 + col*96 + row holds pixel (c, row, col)); labels 1..10."""
    buf = bytearray(len(images) * IMAGE_BYTES)
    for i, img in enumerate(images):
        base = i * IMAGE_BYTES
        for c in range(3):
            for col in range(SIDE):
                start = base + c * SIDE * SIDE + col * SIDE
                buf[start:start + SIDE] = bytes(int(v) for v in img[c, :, col])
    (folder / f"{split}_X.bin").write_bytes(bytes(buf))
    (folder / f"{split}_y.bin").write_bytes(bytes(int(y) + 1 for y in labels))


def _dataset(root, n_train=32, n_test=16, seed=0):
    """Images whose class shows as a bright horizontal band (rows 8k..8k+8 of the red channel)."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 3, SIDE, SIDE), dtype=np.uint8)
        for img, y in zip(images, labels, strict=True):
            img[0, 8 * y:8 * y + 8, :] = 255
        _write_split(folder, split, images, labels)
        out[split] = (images, labels)
    return out


def test_loader_reads_the_binary_format(tmp_path):
    written = _dataset(tmp_path)
    folder = find_stl10(tmp_path)
    assert folder == tmp_path / "stl10_binary"
    tx, ty, vx, vy = load_stl10(folder)
    assert tx.shape == (32, 3, 96, 96) and vx.shape == (16, 3, 96, 96) and tx.dtype == np.uint8
    np.testing.assert_array_equal(tx, written["train"][0])  # rows are rows, not columns
    np.testing.assert_array_equal(vy, written["test"][1])
    assert ty.min() == 0 and ty.max() == 9
    assert (tx[3, 0, 24:32, :] == 255).all() and not (tx[3, 0, :, 24:32] == 255).all()


def test_loader_rejects_broken_files(tmp_path):
    _dataset(tmp_path)
    folder = tmp_path / "stl10_binary"
    (folder / "train_y.bin").write_bytes(bytes([1] * 31))
    with pytest.raises(UserError, match="31 labels but its images file holds 32"):
        load_stl10(folder)
    (folder / "train_X.bin").write_bytes(b"\0" * (IMAGE_BYTES + 5))
    with pytest.raises(UserError, match="not a whole number of STL-10 images"):
        load_stl10(folder)
    (folder / "test_y.bin").unlink()
    (folder / "train_X.bin").write_bytes(b"\0" * IMAGE_BYTES)
    (folder / "train_y.bin").write_bytes(bytes([11]))
    with pytest.raises(UserError, match="outside 1..10"):
        load_stl10(folder)


def test_stl10_cnn_trains_on_the_files(tmp_path):
    _dataset(tmp_path, n_train=16, n_test=10)
    summary = train(TrainConfig(dataset="stl10", data_dir=str(tmp_path), batch_size=8, epochs=3, lr=0.001,
                                optimizer="adam", out=str(tmp_path / "run")))
    assert summary["model"] == "stl10-cnn" and summary["steps"] == 6 and summary["complete"]
    assert "STL-10 test set (10 images)" in summary["test_source"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["train_loss"] < rows[0]["train_loss"] - 0.1


def test_missing_stl10_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="STL-10 not found in"):
        train(TrainConfig(dataset="stl10", data_dir=str(tmp_path), out=str(tmp_path / "run")))
