"""load_dataset: one entry point for every dataset by name."""

from __future__ import annotations

from pathlib import Path

from mlsyskit.data.dataset import Dataset
from mlsyskit.data.mnist import load_mnist, load_mnist_5k
from mlsyskit.data.shakespeare import load_shakespeare
from mlsyskit.errors import UserError

DATASETS = ("mnist", "mnist-5k", "shakespeare")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    seq_len: int = 80,
) -> Dataset:
    """Load a dataset by name.

    data_dir: where to look first (None: $MLSYSKIT_DATA_DIR if set); then the cache dir
        (default_cache_dir()); then, if `download`, the network (mnist, shakespeare only;
        mnist-5k never downloads). seq_len: characters per example (shakespeare only).
    """
    if name == "mnist":
        return load_mnist(data_dir, download=download)
    if name == "mnist-5k":
        return load_mnist_5k(data_dir)
    if name == "shakespeare":
        return load_shakespeare(data_dir, download=download, seq_len=seq_len)
    raise UserError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
