"""Weak and strong image augmentations, batched on tensors and driven by an explicit generator.

These are the two views of SCAN / SPICE / FixMatch:

* **weak** (FixMatch's "flip-and-shift"): horizontal flip with probability 1/2, then a
  random translation by up to ``shift`` x the image side (FixMatch: 4 px of 32, i.e. 0.125)
  with reflect padding — ``RandomCrop(size, padding=s, padding_mode="reflect")``.
* **strong** (SCAN's ``"scan"`` augmentation, used by SPICE-Self's training branch and
  SPICE-Semi): horizontal flip, then ``n_ops = 4`` operations drawn *per image, with
  replacement* from SCAN's RandAugment list, each with a magnitude drawn uniformly from its
  range, then Cutout (one square hole whose side is uniform in [1, ``cutout`` x side],
  centred anywhere; SCAN: length 16 on 32 px images, i.e. 0.5).

SCAN's list and ranges (``data/augment.py`` of the SCAN code): Identity, AutoContrast,
Equalize, Rotate [-30, 30] degrees, Solarize threshold [0, 256), Color / Contrast /
Brightness / Sharpness enhance factor [0.05, 0.95], ShearX / ShearY [-0.1, 0.1],
TranslateX / TranslateY [-0.1, 0.1] x side, Posterize [4, 8] bits. The enhance operations
follow PIL's ``ImageEnhance`` definition, ``out = degenerate + v * (img - degenerate)``
with degenerate = black (Brightness), the grey image (Color), the mean grey level
(Contrast) or the 3x3-smoothed image (Sharpness).

Why hand-written rather than ``kornia.augmentation.auto.RandAugment``: kornia applies the
*same* operations at one fixed magnitude ``m`` to every image of a batch and draws from the
global RNG; SCAN draws operations and magnitudes per image. Here every random number comes
from the ``torch.Generator`` passed in, so a seed fixes the views exactly, and the
operations are applied per operation type to the images that drew it (a loop over the 14
operation types, never over images). kornia supplies equalisation, sharpness, solarise and
posterise (``kornia.enhance``), which match PIL's definitions.

Differences from PIL, on purpose: geometric operations shear and rotate about the image
centre (PIL shears about the top-left corner, which adds a translation) and fill with
black as PIL does; Cutout fills with grey 0.5 in [0, 1] pixel space (SCAN zeroes the
*normalised* tensor, i.e. fills with the normalisation mean, about 0.45-0.5 grey).

Inputs are images ``(B, C, H, W)``, either uint8 in [0, 255] or float in [0, 1]; the output
has the same shape and dtype. ``C`` may be 1 or 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import nn

from imgclust.configcheck import check_fields, option
from imgclust.errors import InputError

KINDS = ("weak", "strong")

#: SCAN's RandAugment list: (name, low, high); magnitudes are drawn uniformly in [low, high).
SCAN_OPS: tuple[tuple[str, float, float], ...] = (
    ("identity", 0.0, 1.0),
    ("autocontrast", 0.0, 1.0),
    ("equalize", 0.0, 1.0),
    ("rotate", -30.0, 30.0),
    ("solarize", 0.0, 256.0),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("brightness", 0.05, 0.95),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.1, 0.1),
    ("translate_x", -0.1, 0.1),
    ("translate_y", -0.1, 0.1),
    ("posterize", 4.0, 8.0),
    ("shear_y", -0.1, 0.1),
)
_GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


@dataclass(frozen=True)
class AugmentSpec:
    """Parameters of the two views (defaults: FixMatch weak, SCAN strong)."""

    shift: float = option(0.125, Interval(ge=0, lt=0.5))  # weak: max translation as a fraction of the side (4 px of 32)
    n_ops: int = option(4, Ge(0))  # strong: RandAugment operations per image (SCAN/SPICE: 4)
    cutout: float = option(0.5, Interval(ge=0, le=1))  # strong: max Cutout side as a fraction of the image side (16 px of 32)

    def __post_init__(self) -> None:
        check_fields(self)  # the ranges declared above (imgclust.configcheck)

    def key(self) -> str:
        return f"shift={self.shift},n_ops={self.n_ops},cutout={self.cutout},ops=scan14"


DEFAULT_SPEC = AugmentSpec()


def _to_float(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    if x.dim() != 4:
        raise InputError(f"augmentations take images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0), x.dtype
    if not x.is_floating_point():
        raise InputError(f"images must be uint8 or float, got {x.dtype}")
    return x.float(), x.dtype


def _back(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.clamp_(0.0, 1.0)
    if dtype == torch.uint8:
        return x.mul_(255.0).round_().to(torch.uint8)
    return x.to(dtype)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_shift(x: torch.Tensor, generator: torch.Generator, fraction: float) -> torch.Tensor:
    """Translate each image by integer offsets in [-s, s] px (s = round(fraction * side)), reflect padding.

    Same as ``RandomCrop(side, padding=s, padding_mode="reflect")``: pad, then crop a window
    at a random offset, done for the whole batch with one gather.
    """
    b, _, h, w = x.shape
    sy, sx = round(fraction * h), round(fraction * w)
    if sy == 0 and sx == 0:
        return x
    sy, sx = min(sy, h - 1), min(sx, w - 1)  # reflect padding needs pad < side
    padded = F.pad(x, (sx, sx, sy, sy), mode="reflect")
    oy = torch.randint(0, 2 * sy + 1, (b,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * sx + 1, (b,), generator=generator, device=x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, generator: torch.Generator, fraction: float, fill: float = 0.5) -> torch.Tensor:
    """One square hole per image: side uniform in [1, fraction * side], centre uniform (SCAN's Cutout)."""
    b, _, h, w = x.shape
    max_len = int(fraction * min(h, w))
    if max_len < 1:
        return x
    length = torch.randint(1, max_len + 1, (b,), generator=generator, device=x.device)
    cy = torch.randint(0, h, (b,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (b,), generator=generator, device=x.device)
    half = length // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - half)[:, None]) & (ys < (cy + half)[:, None])  # (B, H)
    in_x = (xs >= (cx - half)[:, None]) & (xs < (cx + half)[:, None])  # (B, W)
    hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(hole, torch.full_like(x, fill), x)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return kornia.color.rgb_to_grayscale(x)  # ITU-R 601 weights, as PIL's convert("L")


def _blend(degenerate: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return degenerate + v[:, None, None, None] * (x - degenerate)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=1e-12), x)


def _geometric(x: torch.Tensor, names: list[str], v: torch.Tensor) -> torch.Tensor:
    """Apply one geometric op per image (``names[i]`` with magnitude ``v[i]``) in one grid_sample.

    ``theta`` maps output to input coordinates (normalised to [-1, 1]), PIL's convention for
    ``Image.transform(AFFINE)``; points mapped from outside the image are black.
    """
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    for i, (name, m) in enumerate(zip(names, v.tolist(), strict=True)):
        if name == "rotate":
            a = math.radians(m)
            theta[i, 0, 0], theta[i, 0, 1] = math.cos(a), -math.sin(a)
            theta[i, 1, 0], theta[i, 1, 1] = math.sin(a), math.cos(a)
        elif name == "shear_x":
            theta[i, 0, 1] = m
        elif name == "shear_y":
            theta[i, 1, 0] = m
        elif name == "translate_x":
            theta[i, 0, 2] = 2.0 * m
        elif name == "translate_y":
            theta[i, 1, 2] = 2.0 * m
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rand_augment(x: torch.Tensor, generator: torch.Generator, n_ops: int = 4,
                 ops: tuple[tuple[str, float, float], ...] = SCAN_OPS) -> torch.Tensor:
    """SCAN's RandAugment on float images in [0, 1]: ``n_ops`` ops per image, drawn with replacement.

    Step j draws an operation index and a magnitude for every image, then applies each
    operation type to the images that drew it (vectorised over those images).
    """
    b = x.shape[0]
    for _ in range(n_ops):
        which = torch.randint(0, len(ops), (b,), generator=generator, device=x.device)
        u = torch.rand(b, generator=generator, device=x.device)
        lo = torch.tensor([o[1] for o in ops], device=x.device)[which]
        hi = torch.tensor([o[2] for o in ops], device=x.device)[which]
        mag = lo + (hi - lo) * u
        out = x.clone()
        geo_rows = [i for i in range(b) if ops[int(which[i])][0] in _GEOMETRIC]
        if geo_rows:
            idx = torch.tensor(geo_rows, device=x.device)
            out[idx] = _geometric(x[idx], [ops[int(which[i])][0] for i in geo_rows], mag[idx])
        for k, (name, _, _) in enumerate(ops):
            if name in _GEOMETRIC or name == "identity":
                continue
            idx = torch.nonzero(which == k).flatten()
            if len(idx) == 0:
                continue
            xs, v = x[idx], mag[idx]
            if name == "autocontrast":
                y = _autocontrast(xs)
            elif name == "equalize":
                y = kornia.enhance.equalize(xs)
            elif name == "solarize":  # PIL: invert pixels >= threshold (v in 0..256 levels)
                y = torch.where(xs >= (v / 256.0)[:, None, None, None], 1.0 - xs, xs)
            elif name == "color":
                y = _blend(_grey(xs).expand_as(xs), xs, v)
            elif name == "contrast":
                y = _blend(_grey(xs).mean(dim=(1, 2, 3), keepdim=True).expand_as(xs), xs, v)
            elif name == "brightness":
                y = _blend(torch.zeros_like(xs), xs, v)
            elif name == "sharpness":
                y = kornia.enhance.sharpness(xs, v)
            elif name == "posterize":
                y = kornia.enhance.posterize(xs, v.floor().long())
            else:  # pragma: no cover - the list above is closed
                raise InputError(f"unknown augmentation op {name!r}")
            out[idx] = y.clamp(0.0, 1.0)
        x = out
    return x


def weak_augment(images: torch.Tensor, generator: torch.Generator, spec: AugmentSpec = AugmentSpec()) -> torch.Tensor:
    """FixMatch's weak view: flip (p = 1/2) + random shift by up to ``spec.shift`` x side."""
    x, dtype = _to_float(images)
    x = random_shift(hflip(x, generator), generator, spec.shift)
    return _back(x, dtype)


def strong_augment(images: torch.Tensor, generator: torch.Generator, spec: AugmentSpec = AugmentSpec()) -> torch.Tensor:
    """SCAN's strong view: flip + ``spec.n_ops`` RandAugment ops per image + Cutout."""
    x, dtype = _to_float(images)
    x = hflip(x, generator)
    x = rand_augment(x, generator, spec.n_ops)
    x = cutout(x, generator, spec.cutout)
    return _back(x, dtype)


def augment(images: torch.Tensor, kind: str, generator: torch.Generator, spec: AugmentSpec = AugmentSpec()) -> torch.Tensor:
    """``kind`` = ``"weak"`` or ``"strong"`` view of a batch of images (B, C, H, W)."""
    if kind == "weak":
        return weak_augment(images, generator, spec)
    if kind == "strong":
        return strong_augment(images, generator, spec)
    raise InputError(f"unknown augmentation {kind!r}; allowed: {', '.join(KINDS)}")


# ------------------------------------------------------- kornia pipelines (ICBPL, PICI)
def contrastive_augment(size: int, channels: int, crop_scale: float = 0.2) -> nn.Module:
    """The contrastive-learning view of ICBPL (sec. 3.2) and PICI's strong view: random resized crop,
    horizontal flip, colour jitter, random grayscale, Gaussian blur (kornia, on (B, C, H, W)
    tensors in [0, 1]). Apply it with :func:`seeded_augment` for reproducible views."""
    import kornia.augmentation as KA

    ops: list[nn.Module] = [KA.RandomResizedCrop((size, size), scale=(crop_scale, 1.0)), KA.RandomHorizontalFlip()]
    if channels == 3:
        ops += [KA.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), KA.RandomGrayscale(p=0.2)]
    if size >= 16:
        ks = max(3, (size // 10) | 1)  # odd kernel, ~10% of the side (SimCLR's rule)
        ops.append(KA.RandomGaussianBlur((ks, ks), (0.1, 2.0), p=0.5))
    return nn.Sequential(*ops)


def seeded_augment(aug: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """kornia draws from the global torch RNG: fork it and seed it, so a run is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return aug(x).clamp_(0.0, 1.0)


def feature_view(x: torch.Tensor, dropout: float, noise: float, generator: torch.Generator) -> torch.Tensor:
    """A feature-space augmented view of standardised features (no image work): dropout rescaled by
    1 / (1 - p) plus Gaussian noise of std ``noise`` (ICBPL's ``aug="feature"`` stand-in for its
    image augmentations; random numbers from ``generator`` on the CPU, then moved to ``x``'s device)."""
    out = x
    if dropout > 0:
        keep = torch.rand(x.shape, generator=generator) >= dropout
        out = out * keep.to(x.dtype).to(x.device) / (1.0 - dropout)
    if noise > 0:
        out = out + noise * torch.randn(x.shape, generator=generator).to(x.device)
    return out
