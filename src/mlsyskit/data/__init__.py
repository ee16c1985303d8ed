"""Datasets (MNIST, MNIST-5k, Tiny Shakespeare) and federated client partitioners."""

from mlsyskit.data.dataset import Dataset
from mlsyskit.data.idx import read_idx
from mlsyskit.data.load import DATASETS, load_dataset
from mlsyskit.data.partition import PARTITIONS, partition, partition_stats
from mlsyskit.data.paths import default_cache_dir

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "default_cache_dir",
    "load_dataset",
    "partition",
    "partition_stats",
    "read_idx",
]
