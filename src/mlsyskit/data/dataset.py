"""The Dataset record every loader returns, and the shared MNIST image preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Standard MNIST statistics (over the 60k training images), used by most reference code,
# so models and numbers stay comparable with published baselines.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IMAGE_SIDE = 28


@dataclass
class Dataset:
    """A loaded dataset, already split into train and test tensors.

    image task: x float32 (N, 1, 28, 28) normalised with MNIST mean/std, y int64 (N,).
    char task: x int64 (N, seq_len) character ids, y int64 (N, seq_len) = the next character
    at every position; `vocab[i]` is the character with id i.
    """

    name: str
    task: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    test_source: str
    natural_clients: list[np.ndarray] | None = None
    client_names: list[str] | None = None
    vocab: str | None = None

    def __repr__(self) -> str:
        # The default repr would print whole tensors.
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, num_classes={self.num_classes}, "
            f"clients={None if self.natural_clients is None else len(self.natural_clients)})"
        )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) pixels -> normalised float32 tensor (N, 1, 28, 28)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(torch.float32)
    x = x.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return x.unsqueeze(1)


def labels_to_tensor(labels: np.ndarray) -> torch.Tensor:
    """Integer labels -> int64 tensor (N,)."""
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
