"""PICI's losses (Zhang et al., "Deep image clustering with partial information discrimination
and cross-level interaction"), also those of Contrastive Clustering (CC, Li et al. 2021), which
is PICD alone. Pure functions of tensors; the projectors G_I / G_C are in :mod:`imgclust.heads.pici`.

Notation: a mini-batch of N images, two views a (weak) and b (strong); h = encoder features,
Z = G_I(h) the instance-MLP output (128-d), C = G_C(h) the cluster-MLP softmax (N x M).

* PISD, eq. (1): L_PISD = (l_re^a + l_re^b) / 2, l_re = mean squared error between the
  predicted and the true pixels of the *masked* patches (MAE's loss).
* Instance contrast, eqs. (3)-(6): l_i^a = -log exp(sim(Z_i^a, Z_i^b)/tau_I) /
  sum_{k in {a,b}} sum_j exp(sim(Z_i^a, Z_j^k)/tau_I), cosine sim, j != i for k = a
  (NT-Xent: the self-similarity is left out, as in CC and SimCLR), L_ins = sum_i (l^a + l^b) / 2N,
  tau_I = 0.5. This is SimCLR's loss, so it is :func:`imgclust.losses.ssl.nt_xent` (one copy).
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

from imgclust.errors import InputError
from imgclust.losses import _check
from imgclust.losses.ssl import nt_xent


def pisd_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """MSE over masked patches only: pred/target (B, L, P*P*C), mask (B, L) with 1 = masked.

    ``norm_pix``: the target is each patch standardised by its own mean and variance (MAE's
    ``norm_pix_loss``, which PICI's reference code switches on; the paper says plain pixel MSE).

    Examples:
        >>> pred, target = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
        >>> float(pisd_loss(pred, target, torch.tensor([[1.0, 0.0]])))  # only the masked patch counts
        1.0
    """
    if pred.dim() != 3 or pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise InputError(f"pisd_loss needs pred and target (B, L, P) and mask (B, L); got "
                         f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
    if norm_pix:
        mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mu) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def instance_loss(za: torch.Tensor, zb: torch.Tensor, tau_i: float = 0.5) -> torch.Tensor:
    """L_ins, eq. (6): InfoNCE between the two views' instance features (N, 128), ``tau_i`` > 0.

    Examples:
        >>> z = torch.eye(4)
        >>> bool(instance_loss(z, z) < instance_loss(z, z.flip(0)))
        True
    """
    return nt_xent(za, zb, tau_i)


def cluster_entropy(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """H(C), eq. (9): entropy of each view's cluster-size distribution, summed over views.

    Examples:
        >>> c = torch.full((6, 3), 1 / 3)  # uniform sizes: log 3 per view
        >>> round(float(cluster_entropy(c, c)), 4)
        2.1972
    """
    _check.matrix("ca", ca)
    _check.matrix("cb", cb, cols=ca.shape[1])
    h = ca.new_zeros(())
    for c in (ca, cb):
        p = c.sum(0) / c.sum()
        h = h - (p * torch.log(p.clamp(min=1e-12))).sum()
    return h


@dataclass
class ClusterLoss:
    """:func:`cluster_loss`'s parts: ``loss`` = ``contrast`` - ``entropy`` (eq. 11)."""

    loss: torch.Tensor  # contrast - entropy, eq. (11)
    contrast: torch.Tensor
    entropy: torch.Tensor


def cluster_loss(ca: torch.Tensor, cb: torch.Tensor, tau_c: float = 1.0) -> ClusterLoss:
    """L_clu, eq. (11): InfoNCE over the M columns of C^a, C^b (N, M) minus H(C); ``tau_c`` > 0.

    Examples:
        >>> c = torch.eye(3).repeat(2, 1)  # 6 images, 3 confident balanced clusters
        >>> out = cluster_loss(c, c)
        >>> round(float(out.entropy), 4), bool(out.loss < cluster_loss(c, c.roll(1, 1)).loss)
        (2.1972, True)
    """
    _check.matrix("ca", ca)
    _check.matrix("cb", cb, rows=ca.shape[0], cols=ca.shape[1])
    contrast = nt_xent(ca.T, cb.T, tau_c)
    ent = cluster_entropy(ca, cb)
    return ClusterLoss(contrast - ent, contrast, ent)


def hungarian_align(pseudo: np.ndarray, anchor: np.ndarray, n_clusters: int) -> np.ndarray:
    """Relabel ``pseudo`` (k-means labels) onto the anchor's label set by the one-to-one map that
    maximises agreement (the Hungarian algorithm on the M x M contingency table), eq. (15)'s w.

    Examples:
        >>> hungarian_align(np.array([0, 0, 1, 2]), np.array([2, 2, 0, 1]), 3).tolist()
        [2, 2, 0, 1]
    """
    pseudo = np.asarray(pseudo, dtype=np.int64)
    anchor = np.asarray(anchor, dtype=np.int64)
    if pseudo.shape != anchor.shape or pseudo.ndim != 1:
        raise InputError(f"hungarian_align needs two label vectors of one length; got {pseudo.shape}, {anchor.shape}")
    if len(pseudo) and (min(pseudo.min(), anchor.min()) < 0 or max(pseudo.max(), anchor.max()) >= n_clusters):
        raise InputError(f"hungarian_align labels must lie in [0, {n_clusters})")
    counts = np.zeros((n_clusters, n_clusters), dtype=np.int64)
    np.add.at(counts, (pseudo, anchor), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.empty(n_clusters, dtype=np.int64)
    mapping[rows] = cols
    return mapping[pseudo]


def kmeans_labels(z: torch.Tensor, n_clusters: int, seed: int, iters: int = 20) -> np.ndarray:
    """k-means (k-means++ init, Lloyd) of features (N, d), eq. (12)-(13). Hand-written rather than
    sklearn: one mini-batch per training step, and a few torch ops on <= a few hundred rows are
    cheaper than sklearn's per-call overhead; the explicit generator makes it reproducible.

    Examples:
        >>> z = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
        >>> lab = kmeans_labels(z, 2, seed=0)
        >>> bool(lab[0] == lab[1] != lab[2] == lab[3])
        True
    """
    _check.matrix("z", z)
    if not (isinstance(n_clusters, int) and n_clusters >= 1):
        raise InputError(f"kmeans_labels n_clusters must be an integer >= 1; got {n_clusters!r}")
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

    Examples:
        >>> c = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
        >>> cli_targets(None, c, seed=0, pseudo=np.array([1, 1, 0])).tolist()
        [0, 0, 1]
    """
    _check.matrix("c", c)
    m = c.shape[1]
    if pseudo is None:
        if z is None:
            raise InputError("cli_targets needs the instance features z or precomputed pseudo labels")
        pseudo = kmeans_labels(F.normalize(z.detach(), dim=1), m, seed)
    anchor = c.detach().argmax(dim=1).cpu().numpy()
    return torch.from_numpy(hungarian_align(pseudo, anchor, m)).to(c.device)


def cli_loss(c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-mean_i log C_i[target_i] for one view (the paper's eq. (15) averages this over both views).

    Examples:
        >>> c = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
        >>> round(float(cli_loss(c, torch.tensor([0, 0]))), 4)  # (log 2 + 0) / 2
        0.3466
    """
    _check.matrix("c", c)
    _check.labels("targets", targets, c.shape[0])
    return F.nll_loss(torch.log(c.clamp(min=1e-12)), targets)
