"""Self-supervised losses: SimCLR (NT-Xent), MoCo v2 (InfoNCE with a queue), BYOL, Barlow Twins.

Written by hand on purpose: the maintained library for these losses (``lightly``) imports
torchvision, and the only torchvision build for our pinned torch is a CUDA one, so it does not
import here. Each loss is a pure function of the embeddings (the MoCo queue is a small module).

Notation: a batch of N images gives two views; ``z1, z2`` (N, D) are their projections,
``p`` a prediction (BYOL), ``sim(u, v) = u.v / (|u| |v|)``, ``tau`` a temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., 2020, eq. 1), averaged over all 2N anchors.

    With the 2N views ``z_1..z_2N`` where ``i`` and ``j(i)`` are the two views of one image:
    ``l(i) = -log exp(sim(z_i, z_j(i)) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)``, and
    ``L = (1 / 2N) sum_i l(i)``: the other 2N - 2 views of the batch are the negatives.
    """
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
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().float().T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class KeyQueue(nn.Module):
    """MoCo's dictionary: a FIFO of the last ``size`` keys (a buffer, so it is checkpointed)."""

    def __init__(self, dim: int, size: int, generator: torch.Generator | None = None):
        super().__init__()
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
    """
    return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins (Zbontar et al., 2021, eq. 1-2).

    Each embedding dimension is standardised along the batch; the cross-correlation is
    ``C_ij = sum_b z1_bi z2_bj / N`` and ``L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2``
    (paper: lambda = 5e-3 for D = 8192).
    """
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
    """Wang & Isola (2020): ``E ||f(x) - f(x+)||^alpha`` over positive pairs of unit vectors (lower is better)."""
    f1, f2 = F.normalize(f1.float(), dim=1), F.normalize(f2.float(), dim=1)
    return (f1 - f2).norm(dim=1).pow(alpha).mean()


def uniformity(f: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): ``log E_{x != y} exp(-t ||f(x) - f(y)||^2)`` of unit vectors (lower = more uniform)."""
    f = F.normalize(f.float(), dim=1)
    return torch.pdist(f, p=2).pow(2).mul(-t).exp().mean().log()
