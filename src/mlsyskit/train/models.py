"""The models `mlsyskit train` builds: its own (STL-10 CNN, FFN with BatchNorm) and those of
``mlsyskit.models`` (the MNIST models, the character transformer and LSTM)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.train.config import TrainConfig


class STL10CNN(nn.Module):
    """Three conv3x3-BatchNorm-ReLU-maxpool stages (32, 64, 128 channels), global average
    pooling and a linear classifier: any image size (STL-10's 96x96, MNIST's 28x28)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class FFN(nn.Module):
    """Feed-forward network: flatten, then (Linear, BatchNorm1d, ReLU) per hidden width, then a
    linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build(cfg: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A freshly initialised model for ``cfg`` (deterministic under ``torch.manual_seed``)."""
    if cfg.model == "ffn":
        return FFN(math.prod(input_shape), num_classes, cfg.hidden_sizes())
    if cfg.model == "stl10-cnn":
        if len(input_shape) != 3:
            raise UserError(f"stl10-cnn takes images (C, H, W); {cfg.dataset} has inputs of shape {input_shape}")
        return STL10CNN(input_shape[0], num_classes)
    from mlsyskit.models import build_model

    if cfg.dataset == "shakespeare":
        return build_model(cfg.model, vocab_size=num_classes, seq_len=cfg.seq_len)
    return build_model(cfg.model, num_classes=num_classes)
