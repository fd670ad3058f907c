"""The four ICBPL losses (Hu, Zhu, Wang: "Image clustering algorithm based on self-supervised
pretrained models and latent feature distribution optimization", sec. 3.2), as pure
functions of L2-normalised latent features.

Notation: z_i the latent feature of image i, z~_i that of its augmented view, z_{i,m} that of
its m-th nearest neighbour (m = 1..k), c_1..c_K the PEDCC points (:mod:`imgclust.heads.pedcc`),
all unit vectors; cosine distance d(a, b) = 1 - <a, b> / (|a| |b|).

* Loss1, eq. (2)-(3), :func:`mmd_loss` — maximum mean discrepancy between the latent
  features {z_i} U {z~_i} and the PEDCC distribution (the K points tiled to the same count,
  as the reference code does), with a sum of Gaussian kernels
  k(x, y) = sum_{q=0}^{Q-1} exp(-|x - y|^2 / (sigma mu^q)):

      MMD^2(X, Y) = mean_{i,j} k(x_i, x_j) + mean_{i,j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)

  (the biased V-statistic; it is exactly 0 when X and Y are the same samples). Bandwidths
  as ICBPC's ``mmd.py``: Q = 5 kernels, mu = 2, the middle one equal to the mean pairwise
  squared distance over X U Y (excluding the diagonal), detached from the graph, so the
  set {sigma mu^q} = mean_dist * {1/4, 1/2, 1, 2, 4}. A fixed ``sigma`` replaces the data-
  dependent one.
* Loss2, eq. (4), :func:`aug_cosine_loss` — mean_i d(z_i, z~_i).
* Loss3, eq. (5), :func:`knn_cosine_loss` — mean_i mean_m d(z_i, z_{i,m}).
* Loss4, eq. (6), :func:`min_cosine_pedcc_loss` — mean_i min_j d(z_i, c_j) = mean_i (1 - cos
  theta_i) with theta_i the angle to the nearest PEDCC point.

The total, eq. (7), is :func:`icbpl_loss`: sum_t lambda_t Loss_t.

Written here rather than taken from a library: the kernel-bandwidth rule (mean pairwise
distance, five multiples) is ICBPC's and not what generic MMD implementations use.

Data parallel: every term is a mean over the local batch; Loss1's bandwidth and kernel means
span the batch and are *not* reduced over ranks (each rank compares its own batch with the
PEDCC points, an MMD estimate on a smaller sample) — ICBPL has no data-parallel run yet.

Example::

    >>> import torch
    >>> c = torch.eye(3)  # 3 unit centroids
    >>> z = torch.eye(3)[[0, 1, 2, 0]]
    >>> out = icbpl_loss(z, z, z[:, None], c, (1.0, 1.0, 1.0, 1.0))
    >>> [round(float(v), 4) for v in (out.aug, out.knn, out.pedcc)]
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel_sum(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5,
                        sigma: float | None = None) -> torch.Tensor:
    """Sum of ``kernel_num`` Gaussian kernels on the rows of [x; y]: an (n+m, n+m) matrix.

    Squared distances |a - b|^2 = |a|^2 + |b|^2 - 2 <a, b> (clamped at 0). Bandwidth: the
    mean off-diagonal squared distance (or ``sigma``) divided by mu^(Q // 2), times mu^q.
    """
    total = torch.cat([x, y], dim=0)
    sq = (total * total).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * total @ total.T).clamp_min(0.0)
    n = total.shape[0]
    if sigma is None:
        bw = d2.detach().sum() / max(n * n - n, 1)
        bw = bw.clamp_min(1e-12)  # all points equal: any bandwidth gives exp(0) = 1
    else:
        bw = torch.as_tensor(float(sigma), dtype=d2.dtype, device=d2.device)
    bw = bw / kernel_mul ** (kernel_num // 2)
    return sum(torch.exp(-d2 / (bw * kernel_mul**q)) for q in range(kernel_num))


def mmd_loss(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5,
             sigma: float | None = None) -> torch.Tensor:
    """Loss1: multi-kernel Gaussian MMD^2 (biased) between samples ``x`` (n, d) and ``y`` (m, d)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_loss needs (n, d) and (m, d) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    k = gaussian_kernel_sum(x, y, kernel_mul, kernel_num, sigma)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


def tile_centroids(centroids: torch.Tensor, n: int) -> torch.Tensor:
    """The K PEDCC points repeated to ``n`` rows (n // K full copies, then the first n % K)."""
    k = centroids.shape[0]
    return torch.cat([centroids.repeat(n // k, 1), centroids[: n % k]], dim=0)


def aug_cosine_loss(z: torch.Tensor, z_aug: torch.Tensor) -> torch.Tensor:
    """Loss2: mean cosine distance between each image and its augmented view, both (B, d)."""
    return (1.0 - F.cosine_similarity(z, z_aug, dim=-1)).mean()


def knn_cosine_loss(z: torch.Tensor, z_nb: torch.Tensor) -> torch.Tensor:
    """Loss3: mean cosine distance between each image (B, d) and its neighbours (B, k, d)."""
    if z_nb.ndim == 2:
        z_nb = z_nb[:, None, :]
    return (1.0 - F.cosine_similarity(z[:, None, :], z_nb, dim=-1)).mean()


def min_cosine_pedcc_loss(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Loss4: mean over images of the cosine distance to the nearest PEDCC point."""
    cos = F.normalize(z, dim=-1) @ F.normalize(centroids, dim=-1).T
    return (1.0 - cos.max(dim=1).values).mean()


@dataclass
class ICBPLLossOutput:
    loss: torch.Tensor  # weighted total, eq. (7)
    mmd: torch.Tensor
    aug: torch.Tensor
    knn: torch.Tensor
    pedcc: torch.Tensor


def icbpl_loss(z: torch.Tensor, z_aug: torch.Tensor, z_nb: torch.Tensor | None, centroids: torch.Tensor,
               weights: tuple[float, float, float, float], kernel_mul: float = 2.0, kernel_num: int = 5,
               sigma: float | None = None) -> ICBPLLossOutput:
    """Eq. (7): lambda1 Loss1 + lambda2 Loss2 + lambda3 Loss3 + lambda4 Loss4.

    ``z``, ``z_aug``: (B, d) unit rows; ``z_nb``: (B, k, d) or None (Loss3 = 0); Loss1 compares
    [z; z_aug] with the PEDCC points tiled to 2B rows. A term whose weight is 0 is not
    computed (returned as 0).
    """
    if len(weights) != 4 or min(weights) < 0:
        raise ValueError(f"weights are the four non-negative lambdas of eq. (7); got {weights}")
    if kernel_num < 1 or not kernel_mul > 0:
        raise ValueError(f"need kernel_num >= 1 and kernel_mul > 0; got {kernel_num}, {kernel_mul}")
    w1, w2, w3, w4 = weights
    zero = z.new_zeros(())
    mmd = mmd_loss(torch.cat([z, z_aug]), tile_centroids(centroids, 2 * z.shape[0]), kernel_mul, kernel_num,
                   sigma) if w1 else zero
    aug = aug_cosine_loss(z, z_aug) if w2 else zero
    knn = knn_cosine_loss(z, z_nb) if (w3 and z_nb is not None) else zero
    ped = min_cosine_pedcc_loss(z, centroids) if w4 else zero
    return ICBPLLossOutput(w1 * mmd + w2 * aug + w3 * knn + w4 * ped, mmd, aug, knn, ped)


def draw_neighbors(neighbors: torch.Tensor, rows: torch.Tensor, per_step: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Loss3's neighbours of a batch, (B, m): all k of each row's (N, k) ``neighbors`` when
    ``per_step`` >= k (eq. (5) exactly), else m = ``per_step`` drawn uniformly with replacement —
    an unbiased estimate of the mean over the k at a fraction of the cost.

    Example::

        >>> nb = torch.tensor([[1, 2], [0, 2], [0, 1]])
        >>> draw_neighbors(nb, torch.tensor([2, 0]), 2).tolist()
        [[0, 1], [1, 2]]
        >>> draw_neighbors(nb, torch.tensor([2, 0]), 1, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1])
    """
    nb = neighbors[rows]
    if per_step >= nb.shape[1]:
        return nb
    return torch.gather(nb, 1, torch.randint(nb.shape[1], (len(rows), per_step), generator=generator))


def pedcc_proba(z: np.ndarray, centroids: np.ndarray, temperature: float = 0.1) -> np.ndarray:
    """Eq. (8) as probabilities: softmax_j(<z, c_j> / temperature) of unit latents ``z`` (N, d) and the
    PEDCC points (K, d) (numpy in and out, float32; argmax = the nearest point). All-zero rows of ``z``
    (images that did not decode) get all-zero probabilities.

    Example::

        >>> p = pedcc_proba(np.array([[1.0, 0.0], [0.0, 0.0]]), np.eye(2), 0.1)
        >>> p.argmax(1)[0], p[1].tolist()
        (np.int64(0), [0.0, 0.0])
    """
    z = np.asarray(z)
    cos = torch.from_numpy(np.asarray(z @ np.asarray(centroids).T, dtype=np.float32))  # the product in the inputs' dtype
    out = torch.softmax(cos / temperature, dim=-1).numpy().astype(np.float32)
    out[~z.any(axis=1)] = 0.0
    return out
