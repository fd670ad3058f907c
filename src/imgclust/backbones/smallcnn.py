"""A CPU-sized convolutional encoder trained from scratch (Contrastive Clustering's ``encoder="cnn"``).

Not a pretrained backbone (nothing to download, not in the registry): the default encoder of
``cc``, a stand-in for CC's ResNet-34 that a CPU can train in minutes on 32 px images.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (32, 64, 128, 256 channels; stride 2 after the first), global
    average pool: a CPU-sized stand-in for CC's ResNet-34. (B, 3, S, S) -> (B, 256)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for c_out, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.net = nn.Sequential(*layers)
        self.dim = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


__all__ = ["SmallCNN"]
