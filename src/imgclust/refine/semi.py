"""A classifier on frozen features trained with FixMatch from a clustering's reliable samples
(SPICE-Semi, SPICE paper sec. 3.3; FixMatch, Sohn et al. 2020), in one of two modes:

* ``"head"``: a one-head MLP (:class:`~imgclust.heads.spice.SingleHead`) on the frozen features'
  weak / strong views (:mod:`imgclust.views`) — the CPU mode;
* ``"end_to_end"``: a trainable copy of the backbone (:func:`~imgclust.backbones.finetune.trainable_copy`)
  plus an MLP head (:class:`~imgclust.heads.wrap.BackboneHead`) on augmented images
  (:class:`~imgclust.refine.fixmatch.ImageViews`), whose labels of the images are then distilled into
  a head on the frozen features, so the result predicts from features like every method.

The FixMatch loop itself is :func:`imgclust.refine.fixmatch.train_fixmatch`; the reliable samples
come from :func:`imgclust.refine.fixmatch.select_reliable`. Used by ``spice``; nothing here is
specific to SPICE's heads other than their shape.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclust.backbones.finetune import trainable_copy
from imgclust.data.augment import DEFAULT_SPEC, AugmentSpec
from imgclust.errors import InputError
from imgclust.heads.spice import MultiHeadMLP, SingleHead
from imgclust.heads.wrap import BackboneHead
from imgclust.refine.fixmatch import FixMatchConfig, ImageViews, distill_head, predict_images, train_fixmatch

SEMI_MODES = ("head", "end_to_end")
CPU = torch.device("cpu")


def fixmatch_classifier(x: torch.Tensor, views: Any, labeled_index: np.ndarray, labeled_targets: np.ndarray,
                        n_clusters: int, cfg: FixMatchConfig, *, mode: str = "head", hidden: int = 128,
                        norm: str = "standardize", seed: int = 0, source: Any = None, backbone: Any = None,
                        rows: np.ndarray | None = None, image_size: int = 0, spec: AugmentSpec = DEFAULT_SPEC,
                        distill_epochs: int = 30, device: torch.device = CPU, progress: bool = True,
                        desc: str = "fixmatch", lr_option: str = "lr") -> tuple[SingleHead, dict[str, Any]]:
    """FixMatch from ``labeled_index`` / ``labeled_targets`` over the N frozen features ``x`` (N, D): returns
    a one-head classifier on the CPU (features -> logits) and the FixMatch history. ``views`` are the
    feature views of head mode; end-to-end mode reads ``source`` rows ``rows`` through ``backbone``
    at ``image_size`` (0: the backbone's). Heads draw their initialisation from a generator seeded
    by ``seed``, which also drives FixMatch's batches."""
    gen = torch.Generator().manual_seed(int(seed))
    d = x.shape[1]

    def new_head() -> SingleHead:
        mlp = MultiHeadMLP(d, n_clusters, 1, hidden, norm, generator=gen)
        mlp.set_standardization(x.mean(0), x.std(0) if len(x) > 1 else torch.ones(d))
        return SingleHead(mlp)

    if mode == "head":
        model, info = train_fixmatch(new_head(), views, labeled_index, labeled_targets, len(x), cfg, gen,
                                     device=device, progress=progress, desc=f"{desc} fixmatch", lr_option=lr_option)
        return model.cpu(), info
    if mode != "end_to_end":
        raise InputError(f"mode must be one of {', '.join(SEMI_MODES)}; got {mode!r}")
    if source is None or backbone is None or rows is None:
        raise InputError("semi_mode=end_to_end needs the images (fit on a folder, archive or source)")
    if device.type != "cuda":
        warnings.warn("semi_mode=end_to_end on a CPU trains the whole backbone: expect it to be very slow",
                      stacklevel=3)
    pre = dataclasses.replace(backbone.preprocess, size=image_size) if image_size else backbone.preprocess
    img_views = ImageViews(source, np.asarray(rows), pre, spec, device)
    net_head = SingleHead(MultiHeadMLP(backbone.dim, n_clusters, 1, hidden, "none", generator=gen))
    net = BackboneHead(trainable_copy(backbone, "all", allow_empty=True)[0], net_head)
    return train_then_distill(net, img_views, labeled_index, labeled_targets, x, cfg, gen, new_head=new_head,
                              distill_epochs=distill_epochs, device=device, progress=progress,
                              desc=f"{desc} end-to-end", lr_option=lr_option)


def train_then_distill(net: nn.Module, views: ImageViews, labeled_index: np.ndarray, labeled_targets: np.ndarray,
                       features: torch.Tensor, cfg: FixMatchConfig, generator: torch.Generator, *,
                       new_head: Callable[[], nn.Module], distill_epochs: int, device: torch.device = CPU,
                       progress: bool = True, desc: str = "fixmatch end-to-end",
                       lr_option: str = "lr") -> tuple[nn.Module, dict[str, Any]]:
    """End-to-end FixMatch on ``net`` (a :class:`~imgclust.heads.wrap.BackboneHead` over ``views``'
    augmented images), then the EMA network's labels of the un-augmented images distilled into
    ``new_head()`` on the frozen ``features`` (N, D); returns (head, FixMatch history +
    ``distilled_agreement``). ``new_head`` is called after training (its initialisation draws
    from ``generator`` then)."""
    n = len(features)
    ema, info = train_fixmatch(net, views, labeled_index, labeled_targets, n, cfg, generator, device=device,
                               progress=progress, desc=desc, lr_option=lr_option)
    targets = torch.from_numpy(predict_images(ema, views, n).argmax(1)).long()
    head = distill_head(new_head(), features, targets, epochs=distill_epochs, generator=generator)
    return head, {**info, "distilled_agreement": float((head(features).argmax(1) == targets).float().mean())}


__all__ = ["SEMI_MODES", "fixmatch_classifier", "train_then_distill"]
