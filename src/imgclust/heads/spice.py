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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgclust.errors import InputError
from imgclust.heads.wrap import load_frozen

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

    @classmethod
    def for_features(cls, x: torch.Tensor, n_clusters: int, n_heads: int, hidden: int = 512, norm: str = "none",
                     generator: torch.Generator | None = None) -> MultiHeadMLP:
        """Fresh heads (on the CPU) for features ``x`` (N, D), the input standardisation frozen to their
        mean and std (std 1 for a single row; used only when ``norm="standardize"``)."""
        heads = cls(x.shape[1], n_clusters, n_heads, hidden, norm, generator=generator)
        heads.set_standardization(x.mean(0).cpu(), x.std(0).cpu() if len(x) > 1 else torch.ones(x.shape[1]))
        return heads

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

    @torch.no_grad()
    def all_logits(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Logits of every head for shared inputs (N, D) in eval mode, ``chunk`` rows at a time: (H, N, K)."""
        self.eval()
        return torch.cat([self(x[s:s + chunk]) for s in range(0, len(x), chunk)], dim=1)


class SingleHead(nn.Module):
    """One MLP head as a plain (B, D) -> (B, K) classifier (FixMatch's model on frozen features)."""

    def __init__(self, mlp: MultiHeadMLP) -> None:
        super().__init__()
        if mlp.n_heads != 1:
            raise InputError("SingleHead wraps a MultiHeadMLP with one head")
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.forward_head(x, 0)


def load_multihead_mlp(state: dict[str, torch.Tensor], prefix: str, k: int, norm: str, name: str) -> MultiHeadMLP:
    """A frozen :class:`MultiHeadMLP` (eval mode) from the ``prefix*`` tensors of a saved state;
    InputError naming ``name`` when they are missing or do not fit K = ``k``."""
    w1, w2 = state.get(f"{prefix}w1"), state.get(f"{prefix}w2")
    if w1 is None or w2 is None or w1.ndim != 3 or w2.ndim != 3:
        raise InputError(f"not a {name} state: {prefix}w1 (H, D, E) / {prefix}w2 (H, E, K) missing")
    h, d, e = w1.shape
    if w2.shape[-1] != k:
        raise InputError(f"saved model has K={w2.shape[-1]} clusters, expected {k}")
    return load_frozen(MultiHeadMLP(d, k, h, e, norm), state, prefix, f"saved {name} heads do not fit")


def selected_heads_state(heads: MultiHeadMLP, best_head: int, head_losses=None) -> dict[str, torch.Tensor]:
    """SPICE-Self's saved model: the heads (``heads.*``), the selected head and its selection losses."""
    state = {f"heads.{kk}": v.detach().clone() for kk, v in heads.state_dict().items()}
    state["best_head"] = torch.tensor(best_head)
    if head_losses is not None:
        state["head_losses"] = torch.as_tensor(head_losses, dtype=torch.float64).clone()
    return state


def load_selected_heads(state: dict[str, torch.Tensor], k: int, norm: str, name: str) -> tuple[MultiHeadMLP, int, Any]:
    """The inverse of :func:`selected_heads_state`: (frozen heads, best head, head losses or None);
    InputError when the state is not one or the selected head is out of range."""
    heads = load_multihead_mlp(state, "heads.", k, norm, name)
    if "best_head" not in state:
        raise InputError(f"not a {name} state: best_head missing")
    best = int(state["best_head"])
    if not 0 <= best < heads.n_heads:
        raise InputError(f"saved best head {best} is out of range")
    return heads, best, state["head_losses"].numpy() if "head_losses" in state else None


def load_single_head(state: dict[str, torch.Tensor], prefix: str, k: int, norm: str, name: str) -> SingleHead | None:
    """A frozen :class:`SingleHead` from the ``prefix*`` tensors (None when the state has none)."""
    if not any(kk.startswith(prefix) for kk in state):
        return None
    mlp = load_multihead_mlp(state, prefix, k, norm, name)
    if mlp.n_heads != 1:
        raise InputError(f"saved {name} classifier ({prefix}*) must have one head")
    return SingleHead(mlp).eval()


def single_head_state(head: SingleHead | None, prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix*`` tensors of a :class:`SingleHead` (none for None), read by :func:`load_single_head`."""
    return {} if head is None else {f"{prefix}{kk}": v.detach().clone() for kk, v in head.mlp.state_dict().items()}


def freeze_selected(heads: MultiHeadMLP, best_state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[MultiHeadMLP, Any]:
    """SPICE-Self's result: the heads of the selected epoch (``best_state``), frozen on the CPU, and every
    head's labels of the features ``x`` (N, D): (H, N) int32 numpy."""
    heads.load_state_dict(best_state)
    heads.requires_grad_(False)
    heads = heads.eval().cpu()
    return heads, heads.all_logits(x).argmax(-1).numpy().astype("int32")
