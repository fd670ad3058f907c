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

    def new_head() -> SingleHead:
        return SingleHead(MultiHeadMLP.for_features(x, n_clusters, 1, hidden, norm, generator=gen))

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


def reliable_for_semi(features: np.ndarray, labels: np.ndarray, probs: np.ndarray, n_clusters: int, *,
                      min_clusters: float, work_dir: Any = None, seed: int = 0, progress: bool = False,
                      **select: Any) -> tuple[Any, dict[str, Any]]:
    """SPICE sec. 3.3's reliable set (:func:`~imgclust.refine.fixmatch.select_reliable`, options in
    ``select``) and the decision whether SPICE-Semi runs: (the set or None when skipped, history record).

    Skipped (with a warning, and ``record["semi"]`` saying why) when no sample is reliable or fewer
    than ``min_clusters`` of the clusters have any: FixMatch trained from scratch cannot create a
    cluster it has no labelled example of; with few clusters covered it collapses onto them (seen:
    3 reliable samples, all in one cluster, gave a single cluster). The paper notes the same limit
    on Tiny-ImageNet."""
    from imgclust.refine.fixmatch import select_reliable, warn_empty_clusters

    rel = select_reliable(features, labels, n_clusters, probs=probs, work_dir=work_dir, seed=seed, progress=progress,
                          **select)
    warn_empty_clusters(rel.empty_clusters, n_clusters)
    record: dict[str, Any] = {"reliable_per_cluster": rel.counts, "reliable_total": len(rel.index),
                              "reliable_empty_clusters": rel.empty_clusters, "reliable_info": rel.info}
    covered = sum(1 for c in rel.counts if c > 0)
    if len(rel.index) and covered >= min_clusters * n_clusters:
        return rel, record
    why = ("no reliable sample at all" if len(rel.index) == 0 else
           f"reliable samples in only {covered} of {n_clusters} clusters (< semi_min_clusters={min_clusters})")
    warnings.warn(f"SPICE-Semi skipped: {why}; keeping the SPICE-Self result (lower reliable_threshold "
                  "to label more samples)", stacklevel=4)
    record["semi"] = f"skipped: {why}"
    return rel, record


__all__ = ["SEMI_MODES", "fixmatch_classifier", "reliable_for_semi", "train_then_distill"]
