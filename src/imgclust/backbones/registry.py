"""Backbone registry: a name -> how to build it.

Families register themselves in their own modules (``efficientnet.py``, ``pixels.py``,
``vit.py``, ``clip.py``, ``timm.py``, ``resnet.py``); ``build_backbone`` resolves a name or a
directory made by ``imgclust pretrain``.
"""

from __future__ import annotations

# The table itself lives in base.py, so the family modules (resnet, vit, ...) register into it
# without importing this module, which imports pretrained_dir -> resnet/vit (issue 17: no cycle).
from imgclust.backbones.base import ALIASES, REGISTRY, Backbone, BackboneInfo, register_backbone
from imgclust.errors import InputError

__all__ = ["available_backbones", "build_backbone", "get_backbone_info", "register_backbone"]


def available_backbones() -> list[BackboneInfo]:
    _load_families()
    return [REGISTRY[k] for k in sorted(REGISTRY)]


def get_backbone_info(name: str) -> BackboneInfo:
    _load_families()
    key = ALIASES.get(name, name)
    if key.startswith("timm:") and "timm" in REGISTRY:
        return REGISTRY["timm"]
    if key not in REGISTRY:
        from imgclust.backbones.pretrained_dir import dir_backbone_info  # a dir from `imgclust pretrain`

        info = dir_backbone_info(name)
        if info is not None:
            return info
        raise InputError(
            f"unknown backbone {name!r}; available: {', '.join(sorted(REGISTRY))} (or timm:<model_name>)"
        )
    return REGISTRY[key]


def build_backbone(name: str, weights: str | None = None, **options) -> Backbone:
    """Build a backbone by registry name. ``weights`` is a local file that replaces any download.

    ``NAME+mean`` (the name a ViT reports for ICCE's CLS + mean-patch feature) is the same as
    ``NAME`` with ``feature="cls+mean"``.
    """
    if name.endswith("+mean"):
        name = name[: -len("+mean")]
        options.setdefault("feature", "cls+mean")
    info = get_backbone_info(name)
    if name.startswith("timm:"):
        options.setdefault("model_name", name.split(":", 1)[1])
    return info.factory(weights=weights, **options)


_LOADED = False


def _load_families() -> None:
    """Import every family module once so that each registers its entries."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    for mod in ("pixels", "efficientnet", "vit", "clip", "timm", "resnet"):
        try:
            importlib.import_module(f"imgclust.backbones.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"imgclust.backbones.{mod}":
                raise
