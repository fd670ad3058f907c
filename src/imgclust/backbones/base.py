"""What every feature extractor provides: a module, its output size and its preprocessing."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from annotated_types import Ge, Gt
from PIL import Image
from torch import nn

from imgclust.configcheck import OneOf, check_fields, option

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes the backbone's input tensor.

    ``resize``: ``"squash"`` resizes straight to ``size x size`` (right for small benchmark
    images such as CIFAR, which are upsampled whole); ``"center_crop"`` resizes the shorter
    side to ``size / crop_pct`` then crops the centre (the ImageNet evaluation protocol).
    ``mean``/``std`` act on pixel values scaled to [0, 1].
    """

    size: int = option(224, Ge(1))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = option("squash", OneOf(("squash", "center_crop")))
    crop_pct: float = option(0.875, Gt(0))
    interpolation: str = option("bicubic", OneOf(sorted(_RESAMPLE)))
    grayscale: bool = False

    def __post_init__(self) -> None:
        check_fields(self)  # the ranges declared above (imgclust.configcheck)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def resize_image(self, img: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (size, size, 3) uint8 (or (size, size, 1) when grayscale)."""
        s = self.size
        pil = Image.fromarray(img)
        if self.grayscale:
            pil = pil.convert("L")
        rs = _RESAMPLE[self.interpolation]
        if self.resize == "squash":
            if pil.size != (s, s):
                pil = pil.resize((s, s), rs)
        else:
            short = max(s, int(round(s / self.crop_pct)))
            w, h = pil.size
            scale = short / min(w, h)
            nw, nh = max(s, int(round(w * scale))), max(s, int(round(h * scale)))
            if (nw, nh) != (w, h):
                pil = pil.resize((nw, nh), rs)
            left, top = (nw - s) // 2, (nh - s) // 2
            pil = pil.crop((left, top, left + s, top + s))
        out = np.asarray(pil, dtype=np.uint8)
        return out[:, :, None] if out.ndim == 2 else out

    def to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        """(B, size, size, C) uint8 -> normalised float32 (B, C, size, size)."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
        c = x.shape[1]
        mean = torch.tensor(self.mean[:c] if c > 1 else self.mean[:1]).view(1, -1, 1, 1)
        std = torch.tensor(self.std[:c] if c > 1 else self.std[:1]).view(1, -1, 1, 1)
        return (x - mean) / std


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward`` maps preprocessed images (B, C, H, W) to (B, dim).

    Subclasses set ``name``, ``dim``, ``preprocess`` and ``weights_id`` (a digest or label
    that changes when the weights change; it is part of the feature-cache key).
    """

    name: str = "backbone"
    dim: int = 0
    preprocess: Preprocess = Preprocess()
    weights_id: str = "random"

    def cache_key(self) -> str:
        return json.dumps(
            {"name": self.name, "dim": self.dim, "weights": self.weights_id, "pre": self.preprocess.key()},
            sort_keys=True,
        )

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "weights": self.weights_id, "preprocess": asdict(self.preprocess)}


@dataclass(frozen=True)
class BackboneInfo:
    """A registry entry: how to build a backbone and what a user should know about it."""

    name: str
    factory: Callable[..., Backbone]
    description: str
    offline: bool  # True when it works without downloading anything (weights ship in a package)
    family: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


# The registry's table (issue 17): filled by each family module through ``register_backbone``;
# read by :mod:`imgclust.backbones.registry`. Kept here, the lowest module, so registering a
# family never imports the registry (which imports pretrained_dir, which imports resnet and vit).
REGISTRY: dict[str, BackboneInfo] = {}
ALIASES: dict[str, str] = {}


def register_backbone(info: BackboneInfo) -> BackboneInfo:
    if info.name in REGISTRY:
        raise ValueError(f"backbone {info.name!r} registered twice")
    REGISTRY[info.name] = info
    for a in info.aliases:
        ALIASES[a] = info.name
    return info
