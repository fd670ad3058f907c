"""SPICE-Self's heads: H two-layer MLP heads as one batched module (SPICE, Niu et al., IEEE TIP 2022).

SPICE's CLSHead is an MLP Linear(D, E) - ReLU - Linear(E, k) with a softmax output (reference
``mlp.py``: E = D = 512 for its MoCo features). :class:`MultiHeadMLP` holds H such heads as
stacked weights, so H heads cost two batched matrix products (``einsum``), never a Python loop
over heads. Each head is trained on *its own* pseudo-labelled samples, so the training input
is per head, (H, B, D). The losses and the prototype pseudo-labelling are pure functions in
:mod:`imgclust.losses.spice`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imgclust.errors import InputError

HEAD_NORMS = ("none", "l2", "standardize")


class MultiHeadMLP(nn.Module):
    """H two-layer MLP heads (D -> E -> K, ReLU) on a shared, frozen input normalisation.

    ``forward(x)`` takes shared inputs (B, D) or per-head inputs (H, B, D) and returns logits
    (H, B, K). Initialisation as ``nn.Linear`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn
    from the given generator.
    """

    def __init__(self, in_dim: int, n_clusters: int, n_heads: int, hidden: int = 512, norm: str = "none",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if norm not in HEAD_NORMS:
            raise InputError(f"unknown norm {norm!r}; allowed: {', '.join(HEAD_NORMS)}")
        if n_heads < 1 or n_clusters < 2 or in_dim < 1 or hidden < 1:
            raise InputError(f"need heads >= 1, K >= 2, D >= 1, hidden >= 1; got H={n_heads}, K={n_clusters}, "
                             f"D={in_dim}, hidden={hidden}")
        self.in_dim, self.n_clusters, self.n_heads, self.hidden, self.norm = (
            int(in_dim), int(n_clusters), int(n_heads), int(hidden), norm)
        self.w1 = nn.Parameter(torch.empty(n_heads, in_dim, hidden))
        self.b1 = nn.Parameter(torch.empty(n_heads, hidden))
        self.w2 = nn.Parameter(torch.empty(n_heads, hidden, n_clusters))
        self.b2 = nn.Parameter(torch.empty(n_heads, n_clusters))
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for w, b, fan_in in ((self.w1, self.b1, self.in_dim), (self.w2, self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound, generator=generator)
            b.uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=eps))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "l2":
            return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        if self.norm == "standardize":
            return (x - self.mean) / self.std
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalize(x)
        if z.dim() == 2:
            h = torch.einsum("bd,hde->hbe", z, self.w1)
        elif z.dim() == 3 and z.shape[0] == self.n_heads:
            h = torch.bmm(z, self.w1)
        else:
            raise InputError(f"heads take (B, D) or (H={self.n_heads}, B, D) inputs, got {tuple(x.shape)}")
        h = F.relu(h + self.b1[:, None, :])
        return torch.bmm(h, self.w2) + self.b2[:, None, :]

    def forward_head(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """Logits of one head for shared inputs (B, D): (B, K)."""
        h = F.relu(torch.addmm(self.b1[head], self.normalize(x), self.w1[head]))
        return torch.addmm(self.b2[head], h, self.w2[head])
