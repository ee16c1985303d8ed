"""Data-parallel training (DistributedDataParallel under torchrun) with its correctness tests'
guarantees: DDP == one process, accumulation == a big batch, resume == uninterrupted.

``from mlsyskit.train import TrainConfig, train, resume``. Names are imported on first use,
so importing the package (as ``mlsyskit --help`` does) does not load torch.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "mlsyskit.train.config",
    "train": "mlsyskit.train.trainer",
    "resume": "mlsyskit.train.trainer",
    "TrainData": "mlsyskit.train.data",
    "load_train_data": "mlsyskit.train.data",
    "load_stl10": "mlsyskit.train.stl10",
    "FFN": "mlsyskit.train.models",
    "STL10CNN": "mlsyskit.train.models",
    "CPUSyncBatchNorm": "mlsyskit.train.syncbn",
    "convert_sync_batchnorm": "mlsyskit.train.syncbn",
    "sbatch_script": "mlsyskit.train.slurm",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
