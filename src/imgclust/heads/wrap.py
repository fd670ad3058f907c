"""One backbone + head wrapper: images -> backbone features -> head -> logits (or latents).

Every method that trains a backbone together with a head on images uses :class:`BackboneHead`
(SPICE-Semi's end-to-end FixMatch, ICSR's end-to-end stage, ICBPL's fine-tuning); the
trainable backbone itself comes from :func:`imgclust.backbones.finetune.trainable_copy`.
It lives in ``heads/`` (a lower layer: refine/ and methods/ both import it) rather than in
``backbones/`` because what it adds to a backbone is the head. Its state-dict keys are
``backbone.*`` and ``head.*``, the keys of the wrappers it replaced (``refine.fixmatch.
BackboneClassifier``, ``refine.icsr.ImageClassifier``, ICBPL's ``ModuleDict``), so checkpoints
written before the change still resume. PICI / CC's :class:`~imgclust.heads.pici.ClusteringNet`
is not one of these: it has two heads on one encoder and its keys (``encoder.*``) are in saved
model files.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class BackboneHead(nn.Module):
    """``head(backbone(x))``; ``embed`` (the backbone's features, float32) and ``classify`` (the head)
    separately for callers that rank or re-label on the embeddings (ICSR)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).float()

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@torch.no_grad()
def apply_rows(fn: Callable[[torch.Tensor], torch.Tensor], features: np.ndarray, n_out: int,
               chunk: int = 65536) -> np.ndarray:
    """``fn`` (a (B, D) CPU float tensor -> (B, n_out)) over the rows of ``features`` (N, D), ``chunk``
    rows at a time, as float32 (N, n_out): how a fitted head predicts from frozen features."""
    x = np.asarray(features, dtype=np.float32)
    out = [fn(torch.from_numpy(np.ascontiguousarray(x[s:s + chunk]))).numpy() for s in range(0, len(x), chunk)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, n_out), np.float32)


__all__ = ["BackboneHead", "apply_rows"]
