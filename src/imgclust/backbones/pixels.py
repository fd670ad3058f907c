"""Raw pixels as features: each image resized to ``image_size`` and flattened.

The classical baseline for tiny images (digits, MNIST); combine with ``pca`` in the feature
stage to get a compact representation.
"""

from __future__ import annotations

import torch

from imgclust.backbones.base import Backbone, BackboneInfo, Preprocess, register_backbone
from imgclust.errors import InputError


class Pixels(Backbone):
    def __init__(self, weights: str | None = None, image_size: int | None = None, grayscale: bool = False, **extra: object):
        super().__init__()
        if extra:  # an unknown option must not be silently ignored (issue 22)
            raise InputError(f"unknown backbone option(s) {sorted(extra)} for 'pixels'; allowed: grayscale, image_size")
        if weights is not None:
            raise InputError("the 'pixels' backbone has no weights")
        size = image_size or 32
        self.name = "pixels-gray" if grayscale else "pixels"
        self.preprocess = Preprocess(
            size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="squash", interpolation="bilinear", grayscale=grayscale
        )
        self.dim = size * size * (1 if grayscale else 3)
        self.weights_id = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


register_backbone(
    BackboneInfo(
        name="pixels",
        factory=lambda **kw: Pixels(**kw),
        description="raw pixels resized to image_size (default 32) and flattened; for tiny images",
        offline=True,
        family="pixels",
    )
)
