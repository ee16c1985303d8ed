"""The data of a training run: every data set as in-memory tensors with one batch accessor.

Every rank loads the same tensors (the data sets here fit in memory); DistributedSampler
decides which indices each rank reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlsyskit.errors import UserError
from mlsyskit.train.config import TrainConfig

SYNTHETIC = {"features": 32, "classes": 4, "train": 4096, "test": 1024}


@dataclass
class TrainData:
    """Tensors of one data set. image: float32 (N, C, H, W) or uint8 (STL-10, normalised per
    batch to save memory); features: float32 (N, D); char: int64 (N, T) with next-character
    targets (N, T)."""

    name: str
    task: str  # "image", "features" or "char"
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    test_source: str
    mean: torch.Tensor | None = None  # per-channel, for uint8 images
    std: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def batch(self, split: str, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.train_x if split == "train" else self.test_x).index_select(0, idx)
        y = (self.train_y if split == "train" else self.test_y).index_select(0, idx)
        if x.dtype == torch.uint8:
            x = (x.to(torch.float32).div_(255.0) - self.mean) / self.std
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def synthetic(seed: int = 1234) -> TrainData:
    """Gaussian classes: 4 centres in 32 dimensions, unit noise; a fixed seed (the same data
    for every run; --seed changes the model's initialisation and the shuffling, not the data)."""
    rng = np.random.default_rng(seed)
    d, k = SYNTHETIC["features"], SYNTHETIC["classes"]
    centres = rng.standard_normal((k, d)) * 0.6

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, k, n)
        x = centres[y] + rng.standard_normal((n, d))
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    tx, ty = draw(SYNTHETIC["train"])
    vx, vy = draw(SYNTHETIC["test"])
    return TrainData("synthetic", "features", tx, ty, vx, vy, k, f"{SYNTHETIC['test']} held-out synthetic samples")


def _stl10(data_dir: str | None) -> TrainData:
    from mlsyskit.data.paths import resolve_data_dir
    from mlsyskit.train import stl10

    root = resolve_data_dir(data_dir)
    folder = stl10.find_stl10(root)
    if folder is None:
        where = f"in {root}" if root is not None else "(no --data-dir or $MLSYSKIT_DATA_DIR given)"
        raise UserError(
            f"STL-10 not found {where}: download stl10_binary.tar.gz from "
            "https://cs.stanford.edu/~acoates/stl10/, unpack it into DATA_DIR (DATA_DIR/stl10_binary/train_X.bin) "
            "and pass --data-dir DATA_DIR"
        )
    tx, ty, vx, vy = stl10.load_stl10(folder)
    stat = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
    return TrainData(
        "stl10", "image", torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx), torch.from_numpy(vy),
        len(stl10.CLASSES), f"STL-10 test set ({len(vy):,} images) from {folder}", stat(stl10.MEAN), stat(stl10.STD),
    )


def load_train_data(cfg: TrainConfig) -> TrainData:
    """The data set of ``cfg`` (train/test limits applied)."""
    if cfg.dataset == "synthetic":
        data = synthetic()
    elif cfg.dataset == "stl10":
        data = _stl10(cfg.data_dir)
    else:
        from mlsyskit.data import load_dataset

        ds = load_dataset(cfg.dataset, cfg.data_dir, seq_len=cfg.seq_len)
        task = "char" if ds.task == "char" else "image"
        num_classes = len(ds.vocab) if task == "char" else ds.num_classes
        data = TrainData(ds.name, task, ds.train_x, ds.train_y, ds.test_x, ds.test_y, num_classes, ds.test_source)
    # a fixed random subset (not the first N: mnist-5k is sorted by class), the same whatever --seed
    if cfg.train_limit is not None and cfg.train_limit < len(data.train_y):
        keep = _subset(len(data.train_y), cfg.train_limit)
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    if cfg.test_limit is not None and cfg.test_limit < len(data.test_y):
        keep = _subset(len(data.test_y), cfg.test_limit)
        data.test_x, data.test_y = data.test_x[keep], data.test_y[keep]
    return data


def _subset(n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.random.default_rng(0).permutation(n)[:k]))
