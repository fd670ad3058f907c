"""Any ``timm`` model as a backbone: ``timm:<model_name>`` (optional dependency).

``build_backbone("timm:convnext_tiny.fb_in22k")`` calls
``timm.create_model(model_name, pretrained=True, num_classes=0)`` (pooled pre-logits
features) and takes the preprocessing from ``timm.data.resolve_data_config`` (input size,
mean/std, interpolation, ``crop_pct``; resize ``"center_crop"``, overridable with ``resize``
and ``image_size``). ``weights=PATH`` builds the model without download and loads that state
dict safely (``weights_only=True``; classifier keys are ignored, anything else must match);
``pretrained=False`` gives seeded random weights.

timm needs torchvision, whose only build for the pinned torch is a CUDA one, so it is an extra:
``pip install 'imgclust[timm]'``. Without it the entry is still listed and building it raises
a one-line InputError. timm is imported only inside the factory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from imgclust.backbones.base import Backbone, BackboneInfo, Preprocess, register_backbone
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


def _import_timm(model_name: str):
    try:
        import timm
        import timm.data
    except Exception as e:  # ImportError, or torchvision failing to load its CUDA libraries
        raise InputError(
            f"backbone 'timm:{model_name}' needs the optional 'timm' package (pip install 'imgclust[timm]'), "
            f"which needs torchvision ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from e
    return timm


class TimmBackbone(Backbone):
    """A timm model built with ``num_classes=0``; ``forward`` returns its pooled features."""

    def __init__(self, model: nn.Module, model_name: str, dim: int, preprocess: Preprocess, weights_id: str):
        super().__init__()
        self.model = model
        self.name = f"timm:{model_name}"
        self.dim = dim
        self.preprocess = preprocess
        self.weights_id = weights_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _load_local(model: nn.Module, sd: dict[str, torch.Tensor], source: str, label: str) -> None:
    sd = strip_wrappers(sd, ("module.", "model."))
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    extra = [k for k in sd if k not in own and any(k == h or k.startswith(h + ".") for h in heads)]
    for k in extra:  # classifier weights of a num_classes>0 checkpoint
        sd.pop(k)
    load_strict(model, sd, source, label)


def build_timm(
    model_name: str | None = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
    resize: str = "center_crop",
) -> TimmBackbone:
    if not model_name:
        raise InputError("the timm backbone needs a model name: use 'timm:<model_name>', e.g. 'timm:resnet50.a1_in1k'")
    label = f"timm:{model_name}"
    timm = _import_timm(model_name)
    local = Path(weights).expanduser() if weights is not None else None
    sd = load_state_dict(local) if local is not None else None
    download = local is None and pretrained
    try:
        with seeded_init():
            model = timm.create_model(model_name, pretrained=download, num_classes=0)
    except Exception as e:
        raise WeightsError(f"timm could not create {model_name!r} ({type(e).__name__}: {str(e)[:200]})") from e
    if sd is not None:
        _load_local(model, sd, local.name, label)
        weights_id = file_digest(local)
    elif download:
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        src = {k: cfg.get(k) for k in ("hf_hub_id", "url", "file", "tag", "architecture") if cfg.get(k)}
        weights_id = "timm:" + json.dumps(src or {"model": model_name}, sort_keys=True)
    else:
        weights_id = "random"
    data = timm.data.resolve_data_config({}, model=model)
    size = int(data["input_size"][-1]) if image_size is None else int(image_size)
    interp = data.get("interpolation", "bicubic")
    preprocess = Preprocess(
        size=size,
        mean=tuple(float(v) for v in data.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in data.get("std", (0.229, 0.224, 0.225))),
        resize=resize,
        crop_pct=float(data.get("crop_pct", 0.875)),
        interpolation=interp if interp in ("nearest", "bilinear", "bicubic", "lanczos") else "bicubic",
    )
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return freeze(TimmBackbone(model, model_name, dim, preprocess, weights_id))


_OPTIONS = ("model_name", "weights", "pretrained", "image_size", "resize")


def _factory(weights=None, model_name=None, pretrained=True, image_size=None, resize="center_crop", **extra):
    check_options(f"timm:{model_name}", extra, _OPTIONS)
    return build_timm(model_name, weights, pretrained, image_size, resize)


register_backbone(
    BackboneInfo(
        name="timm",
        factory=_factory,
        description="any timm model as timm:<model_name> (pooled features; needs pip install 'imgclust[timm]')",
        offline=False,
        family="timm",
    )
)
