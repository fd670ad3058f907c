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
        self.latent_dim = int(latent_dim)
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

    @classmethod
    def for_features(cls, x: np.ndarray, latent_dim: int, hidden_dim: int, seed: int) -> Projection:
        """A fresh projection for features ``x`` (N, D): weights drawn from ``seed`` without touching the
        caller's global RNG, standardisation frozen to ``x``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            head = cls(x.shape[1], latent_dim, hidden_dim)
        head.set_standardization(x)
        return head

    @torch.no_grad()
    def encode_standardized(self, x: torch.Tensor, chunk: int = 8192) -> np.ndarray:
        """Latents of already standardised rows (N, D), eval mode, ``chunk`` rows at a time: (N, d) numpy."""
        self.eval()
        return torch.cat([self(x[s:s + chunk], standardized=True) for s in range(0, len(x), chunk)]).cpu().numpy()


    def encode(self, features: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Latents (N, d), unit rows, of raw features (N, D) in eval mode, ``chunk`` rows at a time;
        InputError for features of another shape."""
        from imgclust.errors import InputError
        from imgclust.heads.wrap import apply_rows

        x, d_in = np.asarray(features, dtype=np.float32), self.mean.shape[0]
        if x.ndim != 2 or x.shape[1] != d_in:
            raise InputError(f"features must be (N, {d_in}), got shape {x.shape}")
        return apply_rows(self.eval(), x, self.latent_dim, chunk)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, latent_dim: int, hidden_dim: int,
                   name: str = "icbpl") -> Projection:
        """A frozen projection (eval mode) from the ``prefix*`` tensors of a saved state; InputError
        (naming ``name``) when they are missing, do not fit ``hidden_dim`` or are not finite."""
        from imgclust.errors import InputError

        mean = state.get(f"{prefix}mean")
        if not isinstance(mean, torch.Tensor) or mean.ndim != 1:
            raise InputError(f"not an {name} state: '{prefix}mean' missing")
        head = cls(int(mean.shape[0]), latent_dim, hidden_dim)
        try:
            head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as e:
            raise InputError(f"saved {name} projection does not match hidden_dim={hidden_dim}: {e}") from e
        if not all(torch.isfinite(v).all() for v in head.state_dict().values() if v.is_floating_point()):
            raise InputError(f"saved {name} model has non-finite weights")
        head.requires_grad_(False)
        return head.eval()



def centroid_model_state(head: Projection, centroids: torch.Tensor,
                         backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A projection-onto-fixed-centroids model (ICBPL) as tensors: the projection (``head.*``), the
    centroids (``centroids``) and any fine-tuned backbone parameters (``backbone.*``)."""
    return {**{f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}, "centroids": centroids.clone(),
            **{f"backbone.{k}": v.clone() for k, v in backbone_state.items()}}


def load_centroid_model(state: dict[str, torch.Tensor], k: int, latent_dim: int, hidden_dim: int,
                        finetune: str = "head", name: str = "icbpl") -> tuple[Projection, torch.Tensor, dict]:
    """The inverse of :func:`centroid_model_state`: (frozen projection, float32 (K, d) centroids, backbone
    parameters); InputError for a state that is not one, does not fit, or lacks the backbone parameters
    of a fine-tuned (``finetune`` other than "head") model."""
    from imgclust.errors import InputError
    from imgclust.heads.pedcc import load_centroids

    centroids = load_centroids(state, k, latent_dim, name)
    head = Projection.from_state(state, "head.", latent_dim, hidden_dim, name)
    tuned = {kk[len("backbone."):]: v for kk, v in state.items() if kk.startswith("backbone.")}
    if finetune != "head" and not tuned:
        raise InputError(f"saved {name} model has finetune={finetune} but no backbone parameters")
    return head, centroids, tuned


__all__ = ["Projection", "centroid_model_state", "load_centroid_model"]
