"""A directory written by ``imgclust pretrain`` used as a backbone: ``--backbone DIR``.

The directory holds

* ``backbone.pt`` — the encoder's state dict (tensors only; read with ``weights_only=True``
  through :func:`imgclust.backbones.weights.load_state_dict` and loaded strictly);
* ``backbone.json`` — ``{"format": "imgclust-pretrained-backbone", "arch", "image_size",
  "patch_size", "preprocess", "dim", "method", "history", ...}``: everything needed to
  rebuild the architecture and its preprocessing, plus the training history.

:func:`make_encoder` builds the trainable architectures ``pretrain`` offers: ResNet-18/34/50
(torchvision layout; the small-image stem — 3x3 stride-1 conv, no max-pool — when the image
side is at most 64 px) and small ViTs (``vit_tiny`` 192-d/12 blocks/3 heads, ``vit_small``
384-d/12/6; patch 4 px up to 64 px images, 16 px above). The registry resolves any name that is
such a directory through :func:`dir_backbone_info`, so a pretrained directory works wherever a
built-in backbone name does (features, every method, ``predict``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from imgclust.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneInfo, Preprocess
from imgclust.backbones.weights import check_options, file_digest, freeze, load_state_dict, load_strict
from imgclust.errors import InputError, WeightsError
from imgclust.rundir import atomic_open

FORMAT = "imgclust-pretrained-backbone"
WEIGHTS_FILE = "backbone.pt"
META_FILE = "backbone.json"
ARCHS = ("resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small")
_VIT = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6)}


def default_patch_size(image_size: int) -> int:
    return 4 if image_size <= 64 else 16


def make_encoder(arch: str, image_size: int, patch_size: int | None = None) -> Backbone:
    """A randomly initialised, trainable encoder of ``arch`` for ``image_size`` px inputs."""
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHS)}")
    if image_size < 8:
        raise InputError(f"image_size must be >= 8, got {image_size}")
    if arch.startswith("resnet"):
        from imgclust.backbones.resnet import build_resnet

        model: Backbone = build_resnet(int(arch[len("resnet"):]), small_images=image_size <= 64)
    else:
        from imgclust.backbones.vit import VisionTransformer, ViTConfig

        p = patch_size or default_patch_size(image_size)
        if image_size % p:
            raise InputError(f"{arch}: image_size {image_size} is not a multiple of the patch size {p}")
        d, depth, heads = _VIT[arch]
        cfg = ViTConfig(d, depth, heads, p, image_size, url="", description=f"{arch}/{p}")
        model = VisionTransformer(cfg, name=arch)
    model.preprocess = preprocess_for(image_size)
    return model


def preprocess_for(image_size: int) -> Preprocess:
    return Preprocess(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="squash", interpolation="bilinear")


def save_pretrained(out: str | Path, encoder: Backbone, meta: dict) -> None:
    """Write ``backbone.pt`` then ``backbone.json`` (last: a directory with the JSON is complete)."""
    out = Path(out)
    sd = {k: v.detach().to("cpu").clone() for k, v in encoder.state_dict().items()}
    with atomic_open(out / WEIGHTS_FILE, "wb") as f:
        torch.save(sd, f)
    with atomic_open(out / META_FILE, "w") as f:
        json.dump({"format": FORMAT, "version": 1, **meta}, f, indent=1, default=str)


def read_meta(path: str | Path) -> dict:
    p = Path(path).expanduser()
    try:
        meta = json.loads((p / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: not a pretrained backbone directory ({META_FILE}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{p / META_FILE}: not an imgclust pretrained backbone (format {meta.get('format')!r})")
    for key, typ in (("arch", str), ("image_size", int)):
        if not isinstance(meta.get(key), typ):
            raise InputError(f"{p / META_FILE}: missing or invalid {key!r}")
    return meta


def is_pretrained_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / META_FILE).is_file()


def build_pretrained_dir(path: str | Path, weights: str | None = None, image_size: int | None = None,
                         **extra: object) -> Backbone:
    """The frozen encoder stored in ``path`` (``image_size`` overrides the training size)."""
    check_options(str(path), extra, ("weights", "image_size"))
    p = Path(path).expanduser().resolve()
    meta = read_meta(p)
    wfile = Path(weights).expanduser() if weights is not None else p / WEIGHTS_FILE
    if not wfile.is_file():
        raise WeightsError(f"{p}: {wfile.name} is missing (pre-training not finished?)")
    model = make_encoder(meta["arch"], int(meta["image_size"]), meta.get("patch_size"))
    load_strict(model, load_state_dict(wfile), wfile.name, f"{meta['arch']} ({p.name})")
    size = int(image_size) if image_size is not None else int(meta["image_size"])
    pre = meta.get("preprocess") or {}
    model.preprocess = Preprocess(size=size, mean=tuple(pre.get("mean", IMAGENET_MEAN)),
                                  std=tuple(pre.get("std", IMAGENET_STD)), resize=pre.get("resize", "squash"),
                                  interpolation=pre.get("interpolation", "bilinear"))
    model.name = f"pretrained:{p.name}"
    model.weights_id = file_digest(wfile)
    return freeze(model)


def dir_backbone_info(name: str) -> BackboneInfo | None:
    """A registry entry for a pretrained directory ``name``, or None when it is not one."""
    if not is_pretrained_dir(name):
        return None
    meta = read_meta(name)

    def factory(weights: str | None = None, **options: object) -> Backbone:
        return build_pretrained_dir(name, weights=weights, **options)

    desc = f"{meta['arch']} pre-trained with {meta.get('method', '?')} on {meta.get('source', '?')}"
    return BackboneInfo(name=str(name), factory=factory, description=desc, offline=True, family="pretrained")
