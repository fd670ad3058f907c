"""PICI's projectors (Zhang et al., "Deep image clustering with partial information
discrimination and cross-level interaction"), also those of Contrastive Clustering (CC, Li et
al. 2021): G_I, the instance MLP (h -> Z, 128-d), and G_C, the cluster MLP (h -> softmax over M
clusters). The losses they are trained with are in :mod:`imgclust.losses.pici`.

:class:`ClusteringNet` (encoder + G_I + G_C) and :func:`build_clustering_net` are the network
of the ``pici`` / ``cc`` recipes (:mod:`imgclust.methods.pici`).
"""

from __future__ import annotations

import numpy as np
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



MEAN_STD = 0.5  # per-channel normalisation of the from-scratch networks: (x - 0.5) / 0.5


def normalize_half(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> (x - 0.5) / 0.5, the input of PICI / CC's networks."""
    return (x - MEAN_STD) / MEAN_STD


class ClusteringNet(nn.Module):
    """Encoder F + instance MLP G_I + cluster MLP G_C (PICI and CC's network).

    Not :class:`~imgclust.heads.wrap.BackboneHead`: two heads on one encoder, and its state-dict
    keys (``encoder.*``, ``instance.*``, ``cluster.*``) are in saved ``pici`` / ``cc`` models.
    """

    def __init__(self, encoder: nn.Module, dim: int, instance_dim: int, n_clusters: int, bn: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.instance = InstanceMLP(dim, instance_dim, bn)
        self.cluster = ClusterMLP(dim, n_clusters, bn)

    @property
    def is_vit(self) -> bool:
        from imgclust.backbones.mae import MaskedAutoencoderViT

        return isinstance(self.encoder, MaskedAutoencoderViT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities (B, K) of unmasked images."""
        return self.cluster(self.encoder(x))

    @torch.no_grad()
    def encode_images(self, imgs: torch.Tensor, device: torch.device | str = "cpu",
                      batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Encoder features h and cluster probabilities of unmasked uint8 images (N, 3, S, S), eval mode."""
        self.eval()
        hs, ps = [], []
        for s in range(0, len(imgs), batch):
            h = self.encoder(normalize_half(imgs[s:s + batch].to(device).float().div_(255.0)))
            hs.append(h.float().cpu())
            ps.append(self.cluster(h).float().cpu())
        return torch.cat(hs).numpy(), torch.cat(ps).numpy()

    @torch.no_grad()
    def dataset_cli_labels(self, imgs: torch.Tensor, aug: nn.Module, n_clusters: int, device: torch.device | str,
                           seed: int, batch: int = 256) -> dict[str, np.ndarray]:
        """k-means (PICI eqs. 12-13) of the instance features Z of every image, weak view (``a``) and one
        strong view (``b``), fixed for the boosting stage (as PICI's reference code; it min-max scales
        Z per batch, here Z is L2-normalised)."""
        from sklearn.cluster import KMeans

        from imgclust.data.augment import seeded_augment

        self.eval()
        za, zb = [], []
        for s in range(0, len(imgs), batch):
            x = imgs[s:s + batch].to(device).float().div_(255.0)
            za.append(self.instance(self.encoder(normalize_half(x))).float().cpu())
            zb.append(self.instance(self.encoder(normalize_half(seeded_augment(aug, x, seed + s)))).float().cpu())
        out = {}
        for name, z in (("a", za), ("b", zb)):
            zn = torch.nn.functional.normalize(torch.cat(z), dim=1).numpy()
            out[name] = KMeans(n_clusters, n_init=10, random_state=seed % (2**31)).fit_predict(zn).astype(np.int64)
        return out


def build_clustering_net(encoder: str, n_clusters: int, *, image_size: int, instance_dim: int, bn: bool = False,
                         vit_size: str = "tiny", patch_size: int = 0, depth: int = 0, decoder_dim: int = 64,
                         decoder_depth: int = 1, decoder_heads: int = 4) -> ClusteringNet:
    """``encoder``: ``vit`` (the MAE ViT, with its decoder), ``cnn`` (:class:`~imgclust.backbones.smallcnn.SmallCNN`)
    or ``resnet18`` / ``resnet34`` (CIFAR-stem ResNets), trained from scratch, + G_I and G_C."""
    enc: nn.Module
    if encoder == "vit":
        from imgclust.backbones.mae import MaskedAutoencoderViT

        enc = MaskedAutoencoderViT(image_size, 3, vit_size, patch_size or None, depth or None, decoder_dim,
                                   decoder_depth, decoder_heads)
    elif encoder == "cnn":
        from imgclust.backbones.smallcnn import SmallCNN

        enc = SmallCNN()
    else:
        from imgclust.backbones.resnet import build_resnet

        enc = build_resnet(int(encoder[len("resnet"):]), small_images=True)
    return ClusteringNet(enc, enc.dim, instance_dim, n_clusters, bn)
