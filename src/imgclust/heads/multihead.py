"""H linear clustering heads trained together as one tensor program.

For features x (B, D) the heads compute, all at once,

    z = norm(x)                                   (B, D), shared by all heads
    logits[h] = z @ W[h] + b[h]                   W: (H, D, K), b: (H, K)  ->  (H, B, K)

with one ``torch.einsum("bd,hdk->hbk")`` (a single (B, D) x (D, H*K) matrix product), never
a Python loop over heads. ICCE stage 1 and TEMI train H = 50 heads this way; each head is
an independent K-way classifier (a head is exactly ``nn.Linear(D, K)`` with weight
``W[h].T`` and bias ``b[h]``).

Input normalisation (``norm``), shared by the heads:

* ``"none"`` — raw features.
* ``"l2"`` — x / |x| (TEMI's ``--l2_norm``).
* ``"standardize"`` — (x - mean) / std with statistics precomputed once on the training
  features and frozen (TEMI's "embedding normalisation", ``--embed_norm``).
* ``"batchnorm"`` — a ``BatchNorm1d(D)`` layer after the backbone (ICCE sec. 3.1, "Batch
  Normalization Layer Following the Backbone"): batch statistics in training, running
  statistics in evaluation, learnable affine scale/shift. Under torchrun the batch
  statistics are those of the global batch (:func:`imgclust.train.dist.batch_norm`; issue 20).

Initialisation follows ``nn.Linear`` (U(-1/sqrt(D), 1/sqrt(D)) for weights and biases),
drawn from an explicit ``torch.Generator`` so a seed fixes it.

Note: TEMI's reference heads are small MLPs (DINO head: Linear-GELU-Linear, L2-normalised
bottleneck, weight-normalised last layer); ICCE's "multi-head classifier" and this project
use linear heads, which cost ~40x less per image and keep head training far cheaper than
feature extraction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imgclust.errors import InputError
from imgclust.train import dist
from imgclust.train.optim import ema_update_  # noqa: F401  (the one EMA update; re-exported here)

NORMS = ("none", "l2", "standardize", "batchnorm")


class SharedInputNorm(nn.Module):
    """The input normalisation every multi-head module shares (``norm``, see the module doc).

    A base class rather than a submodule, so the buffers keep their names (``mean``, ``std``,
    ``bn.*``) in saved models."""

    def _init_norm(self, in_dim: int, norm: str) -> None:
        if norm not in NORMS:
            raise InputError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
        self.norm = norm
        if norm == "standardize":
            self.register_buffer("mean", torch.zeros(in_dim))
            self.register_buffer("std", torch.ones(in_dim))
        self.bn = nn.BatchNorm1d(in_dim) if norm == "batchnorm" else None

    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Freeze the statistics of ``norm="standardize"`` (computed on the training features)."""
        if self.norm != "standardize":
            raise InputError("set_standardization needs norm='standardize'")
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=eps))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "l2":
            return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
        if self.norm == "standardize":
            return (x - self.mean) / self.std
        if self.bn is not None:
            return dist.batch_norm(self.bn, x)  # issue 20: global-batch statistics under torchrun (gloo too)
        return x


class MultiHeadClassifier(SharedInputNorm):
    """``n_heads`` linear K-way heads on a shared input normalisation; forward gives (H, B, K)."""

    def __init__(self, in_dim: int, n_clusters: int, n_heads: int, norm: str = "none",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_heads < 1 or n_clusters < 2 or in_dim < 1:
            raise InputError(f"need heads >= 1, K >= 2, D >= 1; got H={n_heads}, K={n_clusters}, D={in_dim}")
        self.in_dim, self.n_clusters, self.n_heads = int(in_dim), int(n_clusters), int(n_heads)
        self.weight = nn.Parameter(torch.empty(n_heads, in_dim, n_clusters))
        self.bias = nn.Parameter(torch.empty(n_heads, n_clusters))
        self._init_norm(in_dim, norm)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)
        self.weight.uniform_(-bound, bound, generator=generator)
        self.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every head: (H, B, K) for x (B, D)."""
        z = self.normalize(x)
        return torch.einsum("bd,hdk->hbk", z, self.weight) + self.bias[:, None, :]

    def forward_head(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """Logits of one head: (B, K)."""
        return torch.addmm(self.bias[head], self.normalize(x), self.weight[head])
