"""Augmentation recipes of the self-supervised methods, as two batched view pipelines.

Every recipe is: random resized crop -> horizontal flip (p = 1/2) -> colour jitter
(brightness, contrast, saturation, hue; with probability ``jitter_p``) -> grayscale (p = 0.2)
-> Gaussian blur (sigma in [0.1, 2], kernel about 10% of the side) -> solarise (threshold 0.5).
The papers differ in the crop scale, the jitter strengths and the blur/solarise
probabilities per view (view 1, view 2):

=============  ============  ==================  ==========  ===========
method         crop scale    jitter b,c,s,h       blur        solarise
=============  ============  ==================  ==========  ===========
simclr         (0.08, 1)     0.4,0.4,0.4,0.1      0.5, 0.5    0, 0
mocov2         (0.2, 1)      0.4,0.4,0.4,0.1      0.5, 0.5    0, 0
byol           (0.08, 1)     0.4,0.4,0.2,0.1      1.0, 0.1    0, 0.2
barlowtwins    (0.08, 1)     0.4,0.4,0.2,0.1      1.0, 0.1    0, 0.2
=============  ============  ==================  ==========  ===========

(SimCLR's jitter strength s = 0.5 gives 0.4, 0.4, 0.4, 0.1 — the CIFAR setting of the paper
and of SCAN/SPICE's pretext stage; jitter p = 0.8, grayscale p = 0.2 everywhere.) As in
SimCLR's CIFAR-10 experiments, blur is left out for images smaller than 64 px: it destroys
most of what a 32 px image holds.

The operations are kornia's (``kornia.augmentation``, which follows torchvision's
definitions); kornia draws its parameters from the *global* RNG, so each call forks the
global RNG and seeds it from the explicit ``torch.Generator`` passed in: a seed fixes the
views exactly, and a resumed run draws the same views as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import torch

from imgclust.errors import InputError

METHODS = ("simclr", "mocov2", "byol", "barlowtwins")


@dataclass(frozen=True)
class Recipe:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: tuple[float, float] = (0.5, 0.5)
    solarize_p: tuple[float, float] = (0.0, 0.0)
    min_blur_size: int = 64  # no blur below this side (SimCLR's CIFAR setting)


RECIPES: dict[str, Recipe] = {
    "simclr": Recipe(),
    "mocov2": Recipe(crop_scale=(0.2, 1.0)),
    "byol": Recipe(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
    "barlowtwins": Recipe(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
}


def recipe_for(method: str) -> Recipe:
    if method not in RECIPES:
        raise InputError(f"unknown pre-training method {method!r}; allowed: {', '.join(METHODS)}")
    return RECIPES[method]


class TwoViews:
    """``views(x, generator) -> (v1, v2)``: two augmented views of a batch (B, C, S, S).

    Input uint8 in [0, 255] or float in [0, 1]; the views have the input's shape and dtype.
    """

    def __init__(self, recipe: Recipe, size: int):
        if size < 8:
            raise InputError(f"pre-training needs images of at least 8 px, got {size}")
        self.recipe, self.size = recipe, size
        self.pipes = [self._pipe(recipe, size, i) for i in (0, 1)]

    @staticmethod
    def _pipe(r: Recipe, size: int, view: int) -> K.AugmentationSequential:
        b, c, s, h = r.jitter
        ops: list[torch.nn.Module] = [
            K.RandomResizedCrop((size, size), scale=r.crop_scale, p=1.0),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(b, c, s, h, p=r.jitter_p),
            K.RandomGrayscale(p=r.gray_p),
        ]
        if size >= r.min_blur_size and r.blur_p[view] > 0:
            k = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd kernel, ~10% of the side
            ops.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=r.blur_p[view]))
        if r.solarize_p[view] > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=r.solarize_p[view]))
        return K.AugmentationSequential(*ops)

    def view(self, x: torch.Tensor, which: int, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise InputError(f"augmentations take images (B, C, H, W), got shape {tuple(x.shape)}")
        dtype = x.dtype
        xf = x.float().div(255.0) if dtype == torch.uint8 else x.float()
        if xf.shape[1] == 1:  # colour ops need RGB; gray images stay gray in the output
            xf = xf.expand(-1, 3, -1, -1)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [xf.device] if xf.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.pipes[which](xf).clamp(0.0, 1.0)
        if x.shape[1] == 1:
            out = out.mean(dim=1, keepdim=True)
        if dtype == torch.uint8:
            return out.mul(255.0).round().to(torch.uint8)
        return out.to(dtype)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(x, 0, generator), self.view(x, 1, generator)
