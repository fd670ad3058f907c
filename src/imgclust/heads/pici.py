"""PICI's projectors and losses (Zhang et al., "Deep image clustering with partial information
discrimination and cross-level interaction"), also those of Contrastive Clustering (CC, Li et
al. 2021), which is PICD alone. Losses are pure functions of tensors.

Notation: a mini-batch of N images, two views a (weak) and b (strong); h = encoder features,
Z = G_I(h) the instance-MLP output (128-d), C = G_C(h) the cluster-MLP softmax (N x M).

* PISD, eq. (1): L_PISD = (l_re^a + l_re^b) / 2, l_re = mean squared error between the
  predicted and the true pixels of the *masked* patches (MAE's loss).
* Instance contrast, eqs. (3)-(6): l_i^a = -log exp(sim(Z_i^a, Z_i^b)/tau_I) /
  sum_{k in {a,b}} sum_j exp(sim(Z_i^a, Z_j^k)/tau_I), cosine sim, j != i for k = a
  (NT-Xent: the self-similarity is left out, as in CC and SimCLR), L_ins = sum_i (l^a + l^b) / 2N,
  tau_I = 0.5.
* Cluster contrast, eqs. (7)-(11): the same InfoNCE over the M *columns* Y_i of C^a, C^b,
  tau_C = 1.0, minus the entropy H(C) = -sum_i [P(Y_i^a) log P(Y_i^a) + P(Y_i^b) log P(Y_i^b)]
  of the cluster-size distribution P(Y_i^k) = sum_j C_ji^k / sum_ji C_ji^k. Maximising H keeps
  clusters from collapsing. (CC's code adds the constant 2 log M so the term is >= 0; the
  gradient is the same.)
* CLI, eqs. (12)-(15): k-means (M clusters) on the batch's instance features Z^k gives
  pseudo-labels p^k; the cluster-MLP argmax q^k are the anchors; the Hungarian algorithm finds
  the one-to-one map w of k-means labels to cluster indices maximising their agreement;
  p~_i^k = one-hot(w(p_i^k)); L_CLI = -1/2 sum_k mean_i p~_i^k . log C_i^k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
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


def pisd_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """MSE over masked patches only: pred/target (B, L, P*P*C), mask (B, L) with 1 = masked.

    ``norm_pix``: the target is each patch standardised by its own mean and variance (MAE's
    ``norm_pix_loss``, which PICI's reference code switches on; the paper says plain pixel MSE).
    """
    if norm_pix:
        mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mu) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean InfoNCE over the 2n rows of (a; b), positives a_i <-> b_i, cosine / tau, self excluded."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, pos)


def instance_loss(za: torch.Tensor, zb: torch.Tensor, tau_i: float = 0.5) -> torch.Tensor:
    """L_ins, eq. (6): InfoNCE between the two views' instance features (N, 128)."""
    return nt_xent(za, zb, tau_i)


def cluster_entropy(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """H(C), eq. (9): entropy of each view's cluster-size distribution, summed over views."""
    h = ca.new_zeros(())
    for c in (ca, cb):
        p = c.sum(0) / c.sum()
        h = h - (p * torch.log(p.clamp(min=1e-12))).sum()
    return h


@dataclass
class ClusterLoss:
    loss: torch.Tensor  # contrast - entropy, eq. (11)
    contrast: torch.Tensor
    entropy: torch.Tensor


def cluster_loss(ca: torch.Tensor, cb: torch.Tensor, tau_c: float = 1.0) -> ClusterLoss:
    """L_clu, eq. (11): InfoNCE over the M columns of C^a, C^b (N, M) minus H(C)."""
    contrast = nt_xent(ca.T, cb.T, tau_c)
    ent = cluster_entropy(ca, cb)
    return ClusterLoss(contrast - ent, contrast, ent)


def hungarian_align(pseudo: np.ndarray, anchor: np.ndarray, n_clusters: int) -> np.ndarray:
    """Relabel ``pseudo`` (k-means labels) onto the anchor's label set by the one-to-one map that
    maximises agreement (the Hungarian algorithm on the M x M contingency table), eq. (15)'s w."""
    pseudo = np.asarray(pseudo, dtype=np.int64)
    anchor = np.asarray(anchor, dtype=np.int64)
    counts = np.zeros((n_clusters, n_clusters), dtype=np.int64)
    np.add.at(counts, (pseudo, anchor), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.empty(n_clusters, dtype=np.int64)
    mapping[rows] = cols
    return mapping[pseudo]


def kmeans_labels(z: torch.Tensor, n_clusters: int, seed: int, iters: int = 20) -> np.ndarray:
    """k-means (k-means++ init, Lloyd) of features (N, d), eq. (12)-(13). Hand-written rather than
    sklearn: one mini-batch per training step, and a few torch ops on <= a few hundred rows are
    cheaper than sklearn's per-call overhead; the explicit generator makes it reproducible."""
    x = z.detach().float().cpu()
    n = x.shape[0]
    k = min(n_clusters, n)
    g = torch.Generator().manual_seed(int(seed))
    centers = x[torch.randint(0, n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centers).pow(2).min(dim=1).values
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        centers = torch.cat([centers, x[torch.multinomial(probs, 1, generator=g)]])
    labels = torch.cdist(x, centers).argmin(dim=1)
    for _ in range(iters):
        onehot = F.one_hot(labels, k).float()
        sizes = onehot.sum(0)
        new = (onehot.T @ x) / sizes.clamp(min=1.0)[:, None]
        centers = torch.where(sizes[:, None] > 0, new, centers)  # an empty cluster keeps its centre
        new_labels = torch.cdist(x, centers).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels.numpy()


def cli_targets(z: torch.Tensor | None, c: torch.Tensor, seed: int, pseudo: np.ndarray | None = None) -> torch.Tensor:
    """p~ for one view: k-means labels of the instance features ``z`` (N, d) aligned to argmax ``c`` (N, M).

    ``pseudo``: k-means labels computed elsewhere (PICI's reference code clusters the whole
    data set once when boosting starts and aligns each batch's slice); then ``z`` is unused.
    """
    m = c.shape[1]
    if pseudo is None:
        assert z is not None
        pseudo = kmeans_labels(F.normalize(z.detach(), dim=1), m, seed)
    anchor = c.detach().argmax(dim=1).cpu().numpy()
    return torch.from_numpy(hungarian_align(pseudo, anchor, m)).to(c.device)


def cli_loss(c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-mean_i log C_i[target_i] for one view (the paper's eq. (15) averages this over both views)."""
    return F.nll_loss(torch.log(c.clamp(min=1e-12)), targets)
