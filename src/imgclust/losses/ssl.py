"""Self-supervised pretraining losses: SimCLR (NT-Xent), MoCo v2 (InfoNCE with a queue), BYOL,
Barlow Twins, and Wang & Isola's alignment / uniformity (reported, not optimised).

Written by hand on purpose: the maintained library for these losses (``lightly``) imports
torchvision, and the only torchvision build for our pinned torch is a CUDA one, so it does not
import here. Each loss is a pure function of the embeddings (the MoCo queue is a small module).
PICI / CC's instance contrast (:mod:`imgclust.losses.pici`) is this module's :func:`nt_xent`.

Notation: a batch of N images gives two views; ``z1, z2`` (N, D) are their projections,
``p`` a prediction (BYOL), ``sim(u, v) = u.v / (|u| |v|)``, ``tau`` a temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgclust.errors import InputError
from imgclust.losses import _check


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., 2020, eq. 1), averaged over all 2N anchors.

    With the 2N views ``z_1..z_2N`` where ``i`` and ``j(i)`` are the two views of one image:
    ``l(i) = -log exp(sim(z_i, z_j(i)) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)``, and
    ``L = (1 / 2N) sum_i l(i)``: the other 2N - 2 views of the batch are the negatives.

    ``z1``, ``z2``: (N, D) with N >= 1; ``temperature`` > 0.

    Examples:
        >>> z = torch.eye(4)
        >>> bool(nt_xent(z, z, 0.1) < nt_xent(z, z.roll(1, 0), 0.1))
        True
    """
    _check.matrix("z1", z1)
    _check.matrix("z2", z2, rows=z1.shape[0], cols=z1.shape[1])
    _check.positive("temperature", temperature)
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # k != i
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE (He et al., 2020, eq. 1; MoCo v2: tau = 0.2).

    ``L_q = -log exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{k- in queue} exp(q.k- / tau))`` with
    ``q`` the query (gradient flows), ``k+`` the key of the other view from the momentum encoder
    (no gradient) and the queue (K, D) of earlier keys as negatives; all vectors L2-normalised.

    ``q``, ``k``: (N, D); ``queue``: (K, D), K >= 1; ``temperature`` > 0.

    Examples:
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> round(float(moco_infonce(q, q, -q, 1.0)), 4)  # log(1 + e^-1 / e^1)
        0.1269
    """
    _check.matrix("q", q)
    _check.matrix("k", k, rows=q.shape[0], cols=q.shape[1])
    _check.matrix("queue", queue, cols=q.shape[1])
    _check.positive("temperature", temperature)
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().float().T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class KeyQueue(nn.Module):
    """MoCo's dictionary: a FIFO of the last ``size`` keys (a buffer, so it is checkpointed).

    Examples:
        >>> qu = KeyQueue(dim=2, size=3, generator=torch.Generator().manual_seed(0))
        >>> qu.enqueue(torch.tensor([[3.0, 4.0]]))
        >>> qu.keys[0].tolist(), int(qu.ptr)
        ([0.6000000238418579, 0.800000011920929], 1)
    """

    def __init__(self, dim: int, size: int, generator: torch.Generator | None = None):
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1 and isinstance(size, int) and size >= 1):
            raise InputError(f"KeyQueue dim and size must be integers >= 1; got {dim!r}, {size!r}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Replace the oldest ``len(k)`` keys by ``k`` (normalised), wrapping around."""
        k = F.normalize(k.detach().float(), dim=1)
        size, b = self.keys.shape[0], k.shape[0]
        idx = (int(self.ptr) + torch.arange(b, device=k.device)) % size
        self.keys[idx] = k[-size:] if b > size else k
        self.ptr.fill_((int(self.ptr) + b) % size)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al., 2020, eq. 2), one direction, averaged over the batch.

    ``L = || p / |p| - z' / |z'| ||^2 = 2 - 2 sim(p, z')`` with ``p`` the online prediction of one
    view and ``z'`` the target projection of the other view (no gradient: the target network is
    an exponential moving average). The trainer symmetrises it (swaps the views and adds).

    Examples:
        >>> p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> float(byol_loss(p, p)), float(byol_loss(p, -p))
        (0.0, 4.0)
    """
    _check.matrix("p", p)
    _check.matrix("z", z, rows=p.shape[0], cols=p.shape[1])
    return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins (Zbontar et al., 2021, eq. 1-2).

    Each embedding dimension is standardised along the batch; the cross-correlation is
    ``C_ij = sum_b z1_bi z2_bj / N`` and ``L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2``
    (paper: lambda = 5e-3 for D = 8192). ``z1``, ``z2``: (N, D), N >= 2; ``lambd`` >= 0.

    Examples:
        >>> z = torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.0, -2.0]])
        >>> round(float(barlow_twins_loss(z, z, 0.0)), 6)  # perfectly correlated: the diagonal is 1
        0.0
    """
    _check.matrix("z1", z1, min_rows=2)
    _check.matrix("z2", z2, rows=z1.shape[0], cols=z1.shape[1])
    _check.non_negative("lambd", lambd)
    n = z1.shape[0]
    a = z1.float()
    b = z2.float()
    a = (a - a.mean(0)) / a.std(0, unbiased=False).clamp_min(1e-6)
    b = (b - b.mean(0)) / b.std(0, unbiased=False).clamp_min(1e-6)
    c = a.T @ b / n
    on = (torch.diagonal(c) - 1.0).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


def alignment(f1: torch.Tensor, f2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): ``E ||f(x) - f(x+)||^alpha`` over positive pairs of unit vectors (lower is better).

    Examples:
        >>> f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> float(alignment(f, f)), float(alignment(f, -f))
        (0.0, 4.0)
    """
    _check.matrix("f1", f1)
    _check.matrix("f2", f2, rows=f1.shape[0], cols=f1.shape[1])
    _check.positive("alpha", alpha)
    f1, f2 = F.normalize(f1.float(), dim=1), F.normalize(f2.float(), dim=1)
    return (f1 - f2).norm(dim=1).pow(alpha).mean()


def uniformity(f: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): ``log E_{x != y} exp(-t ||f(x) - f(y)||^2)`` of unit vectors (lower = more uniform).

    Examples:
        >>> round(float(uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))), 4)  # distance 2: -t * 4
        -8.0
    """
    _check.matrix("f", f, min_rows=2)
    _check.positive("t", t)
    f = F.normalize(f.float(), dim=1)
    return torch.pdist(f, p=2).pow(2).mul(-t).exp().mean().log()
