"""Image models for 28x28 grayscale inputs (MNIST / FEMNIST), after McMahan et al. 2017.

All take float32 ``(B, 1, 28, 28)`` or ``(B, 784)`` and return logits ``(B, num_classes)``.
No dropout, no batch norm: all of them train under ``torch.func.vmap``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIZE = 28
IMAGE_PIXELS = IMAGE_SIZE * IMAGE_SIZE


def _flat(x: Tensor) -> Tensor:
    if x.dim() not in (2, 4) or x.shape[1:].numel() != IMAGE_PIXELS:
        raise ValueError(
            f"expected images of shape (B, 1, 28, 28) or (B, 784), got {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], IMAGE_PIXELS)


class TwoNN(nn.Module):
    """McMahan's "2NN": 784-200-200-C MLP with ReLU (199,210 parameters for C=10)."""

    supports_vmap: bool = True

    def __init__(self, num_classes: int = 10, hidden: int = 200) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_PIXELS, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(_flat(x)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """McMahan's CNN: conv5x5(32)-pool-conv5x5(64)-pool-fc512-C (1,663,370 params for C=10)."""

    supports_vmap: bool = True

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):  # keep channels-last input
            x = _flat(x).reshape(x.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
        # relu(maxpool(x)) == maxpool(relu(x)) exactly (relu is monotone), on 4x fewer values.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class MLP(nn.Module):
    """Small 784-64-C MLP with ReLU."""

    supports_vmap: bool = True

    def __init__(self, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_PIXELS, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(_flat(x))))


class LogReg(nn.Module):
    """Multinomial logistic regression: one 784-C linear layer (softmax lives in the loss)."""

    supports_vmap: bool = True

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(IMAGE_PIXELS, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(_flat(x))
