"""H TEMI-style MLP heads (DINO head) trained together as one batched tensor program.

TEMI's reference code (Adaloglou et al., BMVC 2023; heads built as DINO's ``DINOHead``,
Caron et al. 2021) puts a small MLP on the frozen features of every head::

    z  = norm(x)                                        shared input normalisation (as the linear heads)
    a1 = GELU(z  W1[h] + b1[h])                         D -> hidden (512)
    a2 = GELU(a1 W2[h] + b2[h])                         hidden -> hidden
    u  = a2 W3[h] + b3[h];  u <- u / |u|                hidden -> bottleneck (256), L2-normalised
    logits[h] = u @ (g[h] * V[h] / |V[h]|_col)          weight-normalised last layer, no bias

The weight normalisation is per output unit (column k of V[h], norm over the bottleneck
dimension) as ``torch.nn.utils.weight_norm(nn.Linear(bottleneck, K, bias=False))``; with
``norm_last_layer=True`` (DINO's default, used by TEMI) the gain g is fixed to 1, so every
logit is a cosine in [-1, 1] before the temperature.

All H heads are one program: the first layer is one ``einsum("bd,hdk->hbk")`` (a single
(B, D) x (D, H*hidden) product), the others are ``torch.baddbmm`` / ``torch.bmm`` over the
head dimension — never a Python loop over heads. ``tests/heads/test_heads_mlp.py`` checks it
against H separate ``nn.Sequential`` heads.

Initialisation as DINO's head: truncated normal (std 0.02) weights, zero biases; the last
layer's direction V drawn the same way. Deviation: the reference uses 50 heads on a GPU;
one MLP head costs ~80x a linear head on EfficientNet-Lite0's 1280-d features, so on CPU
the methods default to few MLP heads (see ``methods/temi.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgclust.errors import InputError
from imgclust.heads.multihead import SharedInputNorm


class MultiHeadMLP(SharedInputNorm):
    """``n_heads`` DINO-style MLP heads on a shared input normalisation; forward gives (H, B, K)."""

    def __init__(self, in_dim: int, n_clusters: int, n_heads: int, norm: str = "none",
                 generator: torch.Generator | None = None, hidden_dim: int = 512, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        if n_heads < 1 or n_clusters < 2 or in_dim < 1 or hidden_dim < 1 or bottleneck_dim < 1:
            raise InputError(f"need heads >= 1, K >= 2, D, hidden, bottleneck >= 1; got H={n_heads}, "
                             f"K={n_clusters}, D={in_dim}, hidden={hidden_dim}, bottleneck={bottleneck_dim}")
        self.in_dim, self.n_clusters, self.n_heads = int(in_dim), int(n_clusters), int(n_heads)
        self.hidden_dim, self.bottleneck_dim = int(hidden_dim), int(bottleneck_dim)
        h = self.n_heads
        self.fc1_weight = nn.Parameter(torch.empty(h, in_dim, hidden_dim))
        self.fc1_bias = nn.Parameter(torch.zeros(h, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.empty(h, hidden_dim, hidden_dim))
        self.fc2_bias = nn.Parameter(torch.zeros(h, hidden_dim))
        self.fc3_weight = nn.Parameter(torch.empty(h, hidden_dim, bottleneck_dim))
        self.fc3_bias = nn.Parameter(torch.zeros(h, bottleneck_dim))
        self.last_v = nn.Parameter(torch.empty(h, bottleneck_dim, n_clusters))
        g = torch.ones(h, n_clusters)
        if norm_last_layer:
            self.register_buffer("last_g", g)  # fixed gain 1, as DINO's norm_last_layer=True
        else:
            self.last_g = nn.Parameter(g)
        self._init_norm(in_dim, norm)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for w in (self.fc1_weight, self.fc2_weight, self.fc3_weight, self.last_v):
            nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04, generator=generator)
        for b in (self.fc1_bias, self.fc2_bias, self.fc3_bias):
            b.zero_()

    def last_layer_weight(self) -> torch.Tensor:
        """g * V / |V| per head and output unit (norm over the bottleneck dim): (H, bottleneck, K)."""
        return self.last_g[:, None, :] * self.last_v / self.last_v.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every head: (H, B, K) for x (B, D)."""
        z = self.normalize(x)
        a = F.gelu(torch.einsum("bd,hdk->hbk", z, self.fc1_weight) + self.fc1_bias[:, None, :])
        a = F.gelu(torch.baddbmm(self.fc2_bias[:, None, :], a, self.fc2_weight))
        u = torch.baddbmm(self.fc3_bias[:, None, :], a, self.fc3_weight)
        u = F.normalize(u, dim=-1, eps=1e-12)
        return torch.bmm(u, self.last_layer_weight())

    def forward_head(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """Logits of one head: (B, K)."""
        z = self.normalize(x)
        a = F.gelu(torch.addmm(self.fc1_bias[head], z, self.fc1_weight[head]))
        a = F.gelu(torch.addmm(self.fc2_bias[head], a, self.fc2_weight[head]))
        u = F.normalize(torch.addmm(self.fc3_bias[head], a, self.fc3_weight[head]), dim=-1, eps=1e-12)
        return u @ self.last_layer_weight()[head]


def build_heads(kind: str, in_dim: int, n_clusters: int, n_heads: int, norm: str,
                generator: torch.Generator | None = None, **mlp: int) -> nn.Module:
    """``kind`` "linear" (:class:`MultiHeadClassifier`) or "mlp" (:class:`MultiHeadMLP`)."""
    from imgclust.heads.multihead import MultiHeadClassifier

    if kind == "linear":
        return MultiHeadClassifier(in_dim, n_clusters, n_heads, norm, generator=generator)
    if kind == "mlp":
        return MultiHeadMLP(in_dim, n_clusters, n_heads, norm, generator=generator, **mlp)
    raise InputError(f"head must be 'linear' or 'mlp'; got {kind!r}")
