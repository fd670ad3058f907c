"""PICI's projectors (Zhang et al., "Deep image clustering with partial information
discrimination and cross-level interaction"), also those of Contrastive Clustering (CC, Li et
al. 2021): G_I, the instance MLP (h -> Z, 128-d), and G_C, the cluster MLP (h -> softmax over M
clusters). The losses they are trained with are in :mod:`imgclust.losses.pici`.
"""

from __future__ import annotations

import torch
from torch import nn


def _mlp(in_dim: int, out_dim: int, bn: bool) -> nn.Sequential:
    mid: list[nn.Module] = [nn.BatchNorm1d(in_dim)] if bn else []
    return nn.Sequential(nn.Linear(in_dim, in_dim), *mid, nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class InstanceMLP(nn.Module):
    """G_I: Linear -> ReLU -> Linear to ``out_dim`` (128), as PICI and CC.

    ``bn=True`` puts a BatchNorm1d after the first Linear (SimCLR's projector). Not in the
    paper: a ViT trained from scratch starts with nearly identical [CLS] features for all
    images (mean pairwise cosine 0.99 on digits), and without the BatchNorm the contrastive
    losses sat at chance (ln(2N - 1)) for the first hundreds of steps in short CPU runs.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, bn: bool = False) -> None:
        super().__init__()
        self.net = _mlp(in_dim, out_dim, bn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ClusterMLP(nn.Module):
    """G_C: Linear -> ReLU -> Linear to M -> softmax (``bn``: as :class:`InstanceMLP`)."""

    def __init__(self, in_dim: int, n_clusters: int, bn: bool = False) -> None:
        super().__init__()
        self.net = _mlp(in_dim, n_clusters, bn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(h), dim=1)

