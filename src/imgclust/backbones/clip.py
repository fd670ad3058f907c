"""OpenAI CLIP image encoders (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px) in plain torch.

The module layout is that of ``openai/CLIP`` ``clip/model.py`` (``VisionTransformer`` under
``visual.``): ``visual.conv1`` (no bias), ``visual.class_embedding`` (W,),
``visual.positional_embedding`` (1 + G*G, W), ``visual.ln_pre``,
``visual.transformer.resblocks.{i}.ln_1 / attn.in_proj_weight / attn.in_proj_bias /
attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj`` (QuickGELU), ``visual.ln_post`` and
``visual.proj`` (W, E); heads = W / 64. The output is the projected image embedding
``ln_post(cls) @ proj`` (not L2-normalised), i.e. ``CLIP.encode_image``.

Weights
-------
``weights=PATH`` takes a **state dict**: a full CLIP one (its ``visual.*`` keys are used, the
text tower is ignored), an open_clip one (same ``visual.*`` layout), or the visual tower alone
(with or without the ``visual.`` prefix). fp16 files are fine. TorchScript archives -- which is
what OpenAI publishes (``ViT-B-32.pt`` ...) -- are refused: loading them executes code. Convert
one once where the ``clip`` package is installed::

    model, _ = clip.load("ViT-B/32", device="cpu", jit=False)
    torch.save(model.state_dict(), "clip_vitb32.pth")

Without ``weights`` the official weights are fetched with ``open_clip``
(``pip install 'imgclust[clip]'``, which needs torchvision) via
``open_clip.create_model_and_transforms(<arch>, pretrained="openai")``; without open_clip a
WeightsError says how to get a state dict. ``pretrained=False`` gives seeded random weights.

Preprocessing is CLIP's: shorter side resized to the model resolution (224, or 336 for
``clip_vitl14_336``) with bicubic interpolation, centre crop (``crop_pct=1.0``), CLIP mean/std.
``image_size`` other than the native one resizes the positional embedding bicubically;
``resize="squash"`` resizes whole images instead of cropping.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgclust.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    Backbone,
    BackboneInfo,
    Preprocess,
    register_backbone,
)
from imgclust.backbones.weights import (
    check_options,
    file_digest,
    freeze,
    load_state_dict,
    load_strict,
    seeded_init,
    strip_wrappers,
)
from imgclust.errors import InputError, WeightsError

_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"


@dataclass(frozen=True)
class ClipConfig:
    width: int
    layers: int
    patch_size: int
    resolution: int
    output_dim: int
    arch: str  # OpenAI name
    open_clip_name: str
    url: str

    @property
    def heads(self) -> int:
        return self.width // 64


CLIP_CONFIGS = {
    "clip_vitb32": ClipConfig(768, 12, 32, 224, 512, "ViT-B/32", "ViT-B-32", _URL.format(
        sha="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", file="ViT-B-32.pt")),
    "clip_vitb16": ClipConfig(768, 12, 16, 224, 512, "ViT-B/16", "ViT-B-16", _URL.format(
        sha="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", file="ViT-B-16.pt")),
    "clip_vitl14": ClipConfig(1024, 24, 14, 224, 768, "ViT-L/14", "ViT-L-14", _URL.format(
        sha="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", file="ViT-L-14.pt")),
    "clip_vitl14_336": ClipConfig(1024, 24, 14, 336, 768, "ViT-L/14@336px", "ViT-L-14-336", _URL.format(
        sha="3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", file="ViT-L-14-336px.pt")),
}


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResBlock(width, heads) for _ in range(layers)])


class _VisualTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        w, g = cfg.width, cfg.resolution // cfg.patch_size
        self.patch_size = cfg.patch_size
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(g * g + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = _Transformer(w, cfg.layers, cfg.heads)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.output_dim))

    def _pos(self, h0: int, w0: int) -> torch.Tensor:
        pe = self.positional_embedding
        m = int(math.isqrt(pe.shape[0] - 1))
        if (h0, w0) == (m, m):
            return pe
        grid = pe[1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", align_corners=False)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h0 * w0, -1).to(pe.dtype)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        h0, w0 = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos(h0, w0)
        x = self.transformer.resblocks(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class ClipImageEncoder(Backbone):
    """CLIP image tower; ``forward`` returns the projected image embedding (B, output_dim)."""

    def __init__(self, key: str):
        super().__init__()
        cfg = CLIP_CONFIGS[key]
        self.cfg = cfg
        self.name = key
        self.dim = cfg.output_dim
        self.weights_id = "random"
        self.preprocess = _preprocess(cfg.resolution, "center_crop")
        self.visual = _VisualTransformer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _preprocess(size: int, resize: str) -> Preprocess:
    return Preprocess(size=size, mean=CLIP_MEAN, std=CLIP_STD, resize=resize, crop_pct=1.0, interpolation="bicubic")


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (a zip with ``code/`` or ``constants.pkl`` inside)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in f"/{n}" or n.endswith("constants.pkl") for n in names)


def adapt_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the image tower: ``visual.*`` keys of a full CLIP dict, or a bare visual dict."""
    sd = strip_wrappers(sd, ("module.",))
    if any(k.startswith("visual.") for k in sd):
        return {k: v for k, v in sd.items() if k.startswith("visual.")}
    return {"visual." + k: v for k, v in sd.items()}


def _official_state_dict(key: str) -> dict[str, torch.Tensor]:
    cfg = CLIP_CONFIGS[key]
    try:
        import open_clip
    except Exception as e:
        raise WeightsError(
            f"{key}: OpenAI publishes CLIP only as TorchScript archives ({cfg.url}), which imgclust does not "
            "execute. Install open_clip to download them (pip install 'imgclust[clip]', needs torchvision), or "
            f"save a state dict once where the clip package is installed -- torch.save(clip.load('{cfg.arch}', "
            "device='cpu', jit=False)[0].state_dict(), 'clip.pth') -- and pass --weights clip.pth"
        ) from e
    try:
        model = open_clip.create_model_and_transforms(cfg.open_clip_name, pretrained="openai")[0]
    except Exception as e:
        raise WeightsError(
            f"{key}: open_clip could not load the OpenAI weights ({type(e).__name__}: {str(e)[:200]}); "
            "pass --weights PATH (a CLIP state dict) instead"
        ) from e
    return {"visual." + k: v.detach().float() for k, v in model.visual.state_dict().items()}


def build_clip(
    key: str,
    weights: str | Path | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
    resize: str = "center_crop",
) -> ClipImageEncoder:
    """A frozen, loaded CLIP image encoder (see the module docstring)."""
    cfg = CLIP_CONFIGS[key]
    size = cfg.resolution if image_size is None else int(image_size)
    if size < cfg.patch_size or size % cfg.patch_size:
        raise InputError(f"{key}: image_size must be a multiple of the patch size {cfg.patch_size}, got {size}")
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file() and is_torchscript(p):
            raise WeightsError(
                f"{p.name} is a TorchScript archive (what clip.load downloads); imgclust only reads state dicts. "
                f"Convert it once where the clip package is installed: torch.save(clip.load('{cfg.arch}', "
                "device='cpu', jit=False)[0].state_dict(), 'clip.pth'), then pass --weights clip.pth"
            )
        sd, weights_id, source = load_state_dict(p), file_digest(p), p.name
    elif pretrained:
        sd, weights_id, source = _official_state_dict(key), cfg.url, f"open_clip {cfg.open_clip_name} (openai)"
    else:
        sd, weights_id, source = None, "random", "random"
    with seeded_init():
        model = ClipImageEncoder(key)
    if sd is not None:
        load_strict(model, adapt_clip_state_dict(sd), source, key)
    model.weights_id = weights_id
    model.preprocess = _preprocess(size, resize)
    return freeze(model)


_OPTIONS = ("weights", "pretrained", "image_size", "resize")


def _factory(key: str):
    def factory(weights=None, pretrained=True, image_size=None, resize="center_crop", **extra):
        check_options(key, extra, _OPTIONS)
        return build_clip(key, weights, pretrained, image_size, resize)

    factory.__name__ = f"build_{key}"
    return factory


for _key, _cfg in CLIP_CONFIGS.items():
    register_backbone(
        BackboneInfo(
            name=_key,
            factory=_factory(_key),
            description=(
                f"OpenAI CLIP {_cfg.arch} image embedding, {_cfg.output_dim}-d; weights=<state dict> "
                "or download with open_clip"
            ),
            offline=False,
            family="clip",
        )
    )
