"""A projection head on frozen features: standardise -> (Linear -> BatchNorm -> ReLU ->) Linear -> L2.

ICBPL's encoder head g (paper sec. 3, Fig. 1: z = g(f(x)) / |g(f(x))|, the latent features
that are pulled onto the PEDCC points); a generic module, so it lives in ``heads/`` with the
other heads. The standardisation (``mean`` / ``std`` buffers) is frozen to the statistics of
the fit features; its state-dict keys (``mean``, ``std``, ``net.*``) are those saved models
already hold.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Projection(nn.Module):
    """g: standardise -> (Linear -> BatchNorm -> ReLU ->) Linear -> L2 normalise, (B, D) -> (B, d)."""

    def __init__(self, in_dim: int, latent_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden_dim > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                                nn.ReLU(inplace=True), nn.Linear(hidden_dim, latent_dim))
        else:
            self.net = nn.Linear(in_dim, latent_dim)

    def set_standardization(self, x: np.ndarray) -> None:
        """Freeze the input standardisation to the mean and std (floored at 1e-6) of ``x`` (N, D)."""
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        self.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.std.copy_(torch.from_numpy(np.maximum(std, 1e-6).astype(np.float32)))  # constant pixels: no 0/0

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, standardized: bool = False) -> torch.Tensor:
        h = self.net(x if standardized else self.standardize(x))
        return nn.functional.normalize(h, dim=-1)

    @torch.no_grad()
    def encode_standardized(self, x: torch.Tensor, chunk: int = 8192) -> np.ndarray:
        """Latents of already standardised rows (N, D), eval mode, ``chunk`` rows at a time: (N, d) numpy."""
        self.eval()
        return torch.cat([self(x[s:s + chunk], standardized=True) for s in range(0, len(x), chunk)]).cpu().numpy()


__all__ = ["Projection"]
