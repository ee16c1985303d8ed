"""Datasets (MNIST, MNIST-5k, Tiny Shakespeare) and federated client partitioners.

Names are imported on first use, so importing the package (as ``mlsyskit --help`` does)
does not load torch.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "Dataset": "mlsyskit.data.dataset",
    "read_idx": "mlsyskit.data.idx",
    "DATASETS": "mlsyskit.data.load",
    "load_dataset": "mlsyskit.data.load",
    "PARTITIONS": "mlsyskit.data.partition",
    "partition": "mlsyskit.data.partition",
    "partition_stats": "mlsyskit.data.partition",
    "default_cache_dir": "mlsyskit.data.paths",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
