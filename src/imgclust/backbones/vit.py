"""DINO and DINOv2 Vision Transformers in plain torch, with the official state-dict layout.

One compact ViT covers both families; its parameter names and shapes are those of
``facebookresearch/dino`` (``vision_transformer.py``) and ``facebookresearch/dinov2``
(``dinov2/models/vision_transformer.py`` built by ``dinov2/hub/backbones.py``), so the
official checkpoints load unchanged and strictly:

* ``patch_embed.proj`` (conv, kernel = stride = patch size), ``cls_token`` (1, 1, D),
  ``pos_embed`` (1, 1 + G*G, D) for the grid G the checkpoint was trained at (DINO: 224 px,
  DINOv2: 518 px -> 37x37 patches of 14 px), DINOv2 only: ``mask_token`` (1, D) and, for the
  ``_reg`` models, ``register_tokens`` (1, 4, D);
* ``blocks.{i}.norm1 / attn.qkv / attn.proj / ls1.gamma / norm2 / mlp.fc1 / mlp.fc2 /
  ls2.gamma`` (LayerScale ``ls*`` in DINOv2 only; ViT-g/14 uses a SwiGLU MLP ``mlp.w12`` /
  ``mlp.w3`` with hidden size 4096), LayerNorm eps 1e-6, final ``norm``.

The positional embedding is resized bicubically to the input's patch grid exactly as the
official ``interpolate_pos_encoding`` does (scale factor with +0.1 offset for DINO/DINOv2,
output size with antialiasing for the DINOv2 ``_reg`` models), so any input size that is a
multiple of the patch size works; 224 px inputs give 16x16 patches for /14 models.

Options of every entry: ``weights`` (a local checkpoint; official hub file, a DINO/DINOv2
training checkpoint whose ``teacher`` holds ``backbone.*`` keys, ``module.``-wrapped dicts,
DINOv2 block-chunked ``blocks.c.i.*`` keys), ``pretrained`` (default True: download the official
file; False: seeded random weights, ``weights_id="random"``), ``feature`` (``"cls"`` or
``"cls+mean"``: CLS token concatenated with the mean patch token after the final norm, the
"enhanced" feature of ICCE; doubles ``dim`` and appends ``+mean`` to ``name``), ``image_size``
(default 224), ``resize`` (default ``"squash"``: the whole image is resized to
``image_size``², right for small benchmark images; ``"center_crop"`` with ``crop_pct``
(default 0.875) is the ImageNet evaluation protocol).



"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgclust.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneInfo,
    Preprocess,
    register_backbone,
)
from imgclust.backbones.weights import (
    check_options,
    freeze,
    load_strict,
    resolve_weights,
    seeded_init,
    strip_wrappers,
)
from imgclust.errors import InputError

# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int  # resolution the stored pos_embed belongs to
    url: str
    layerscale: bool = False  # DINOv2: ls1/ls2 gammas
    mask_token: bool = False  # DINOv2 keeps its iBOT mask token in the checkpoint
    swiglu: bool = False  # DINOv2 ViT-g: SwiGLU MLP (w12, w3)
    num_registers: int = 0  # DINOv2 "_reg" models: 4
    interp_offset: float = 0.1  # official interpolate_offset (0 for the _reg models)
    interp_antialias: bool = False  # official interpolate_antialias (True for the _reg models)
    description: str = ""

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        h = 4 * self.embed_dim
        return (int(h * 2 / 3) + 7) // 8 * 8 if self.swiglu else h


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # official hub models use init_values=1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = _Attention(d, cfg.num_heads)
        self.ls1 = _LayerScale(d) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = (_SwiGLU if cfg.swiglu else _Mlp)(d, cfg.mlp_hidden)
        self.ls2 = _LayerScale(d) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """DINO / DINOv2 ViT; ``forward`` returns the CLS token (or CLS ++ mean patch token)."""

    def __init__(self, cfg: ViTConfig, name: str = "vit", feature: str = "cls"):
        super().__init__()
        if feature not in ("cls", "cls+mean"):
            raise InputError(f"feature must be 'cls' or 'cls+mean', got {feature!r}")
        d = cfg.embed_dim
        self.cfg = cfg
        self.feature = feature
        self.name = name + ("+mean" if feature == "cls+mean" else "")
        self.dim = d * (2 if feature == "cls+mean" else 1)
        self.weights_id = "random"
        self.preprocess = Preprocess(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.patch_embed = _PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid**2, d))
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, d))
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference, kept for the layout
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if cfg.num_registers:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, h0: int, w0: int) -> torch.Tensor:
        """Positional embedding for an ``h0 x w0`` patch grid (official DINO/DINOv2 resizing)."""
        pe = self.pos_embed
        n = pe.shape[1] - 1
        if n == h0 * w0 and h0 == w0:
            return pe
        m = int(math.sqrt(n))
        grid = pe[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        off = self.cfg.interp_offset
        size_kw = {"scale_factor": ((h0 + off) / m, (w0 + off) / m)} if off else {"size": (h0, w0)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.cfg.interp_antialias, **size_kw)
        if tuple(grid.shape[-2:]) != (h0, w0):  # pragma: no cover - guarded by the +offset kludge
            raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, wanted {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1).to(pe.dtype)
        return torch.cat([pe[:, :1], grid], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm: (B, 1 + registers + patches, D)."""
        p = self.cfg.patch_size
        h0, w0 = x.shape[-2] // p, x.shape[-1] // p
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(h0, w0)
        if self.cfg.num_registers:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        cls = t[:, 0]
        if self.feature == "cls":
            return cls
        return torch.cat([cls, t[:, 1 + self.cfg.num_registers :].mean(dim=1)], dim=1)


# ----------------------------------------------------------------------------------------------
# official models
# ----------------------------------------------------------------------------------------------

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{full}_pretrain.pth"
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{f}_pretrain/{f}_pretrain.pth"
_ARCH = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}

VIT_CONFIGS: dict[str, ViTConfig] = {}
for _a, _label in (("s", "ViT-S/14"), ("b", "ViT-B/14"), ("l", "ViT-L/14"), ("g", "ViT-g/14")):
    _d, _depth, _heads = _ARCH[_a]
    _base = f"dinov2_vit{_a}14"
    VIT_CONFIGS[_base] = ViTConfig(
        _d, _depth, _heads, 14, 518, _DINOV2_URL.format(base=_base, full=_base),
        layerscale=True, mask_token=True, swiglu=_a == "g",
        description=f"DINOv2 {_label} (LVD-142M), CLS token, {_d}-d",
    )
    VIT_CONFIGS[_base + "_reg"] = ViTConfig(
        _d, _depth, _heads, 14, 518, _DINOV2_URL.format(base=_base, full=_base + "_reg4"),
        layerscale=True, mask_token=True, swiglu=_a == "g", num_registers=4,
        interp_offset=0.0, interp_antialias=True,
        description=f"DINOv2 {_label} with 4 registers (LVD-142M), CLS token, {_d}-d",
    )
for _name, _a, _p, _file in (
    ("dino_vits16", "s", 16, "dino_deitsmall16"),
    ("dino_vits8", "s", 8, "dino_deitsmall8"),
    ("dino_vitb16", "b", 16, "dino_vitbase16"),
    ("dino_vitb8", "b", 8, "dino_vitbase8"),
):
    _d, _depth, _heads = _ARCH[_a]
    VIT_CONFIGS[_name] = ViTConfig(
        _d, _depth, _heads, _p, 224, _DINO_URL.format(f=_file),
        description=f"DINO ViT-{_a.upper()}/{_p} (ImageNet, self-supervised), CLS token, {_d}-d",
    )


def adapt_vit_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map DINO/DINOv2 checkpoint variants onto the hub layout."""
    sd = strip_wrappers(sd, ("module.",))
    if any(k.startswith("backbone.") for k in sd):  # training checkpoints: backbone.* + heads
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    # DINOv2 FSDP block chunks: blocks.<chunk>.<i>.* -> blocks.<i>.*
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def vit_model(key: str, feature: str = "cls") -> VisionTransformer:
    """An unloaded (randomly initialised, trainable) model of registry entry ``key``."""
    if key not in VIT_CONFIGS:
        raise InputError(f"unknown ViT {key!r}; known: {', '.join(VIT_CONFIGS)}")
    return VisionTransformer(VIT_CONFIGS[key], name=key, feature=feature)


def build_vit(
    key: str,
    weights: str | Path | None = None,
    pretrained: bool = True,
    feature: str = "cls",
    image_size: int | None = None,
    resize: str = "squash",
    crop_pct: float = 0.875,
) -> VisionTransformer:
    """A frozen, loaded DINO/DINOv2 backbone (see the module docstring for the options)."""
    cfg = VIT_CONFIGS[key]
    size = 224 if image_size is None else int(image_size)
    if size < cfg.patch_size or size % cfg.patch_size:
        raise InputError(f"{key}: image_size must be a multiple of the patch size {cfg.patch_size}, got {size}")
    if feature not in ("cls", "cls+mean"):
        raise InputError(f"feature must be 'cls' or 'cls+mean', got {feature!r}")
    sd, weights_id, source = resolve_weights(weights, cfg.url, pretrained, key)
    with seeded_init():
        model = vit_model(key, feature)
    if sd is not None:
        sd = adapt_vit_state_dict(sd)
        pe = sd.get("pos_embed")
        if pe is not None and pe.ndim == 3 and pe.shape[0] == 1 and pe.shape[2] == cfg.embed_dim:
            n = pe.shape[1] - 1
            if n != cfg.grid**2 and math.isqrt(n) ** 2 == n:  # trained at another resolution
                model.pos_embed = nn.Parameter(torch.zeros_like(pe, dtype=model.pos_embed.dtype))
        load_strict(model, sd, source, key)
    model.weights_id = weights_id
    model.preprocess = Preprocess(
        size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=resize, crop_pct=crop_pct, interpolation="bicubic"
    )
    return freeze(model)


_OPTIONS = ("weights", "pretrained", "feature", "image_size", "resize", "crop_pct")


def _factory(key: str):
    def factory(
        weights=None, pretrained=True, feature="cls", image_size=None, resize="squash", crop_pct=0.875, **extra
    ):
        check_options(key, extra, _OPTIONS)
        return build_vit(key, weights, pretrained, feature, image_size, resize, crop_pct)

    factory.__name__ = f"build_{key}"
    return factory


for _key, _cfg in VIT_CONFIGS.items():
    register_backbone(
        BackboneInfo(
            name=_key,
            factory=_factory(_key),
            description=_cfg.description + "; feature='cls+mean' adds the mean patch token",
            offline=False,
            family="dinov2" if _key.startswith("dinov2") else "dino",
        )
    )
