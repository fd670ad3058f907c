"""ICSR (sample ranking + weighted self-training) on top of another method: ``--method icsr``.

``imgclust cluster SOURCE --method icsr --option base=kmeans`` fits the base method, then
refines it with ICSR (:mod:`imgclust.refine.icsr`); ``imgclust refine MODEL_DIR`` refines an
already fitted model (any method) and saves the result as a model of this method. Either
way the fitted state is ICSR's linear classifier on the (PCA-reduced, when the run used PCA)
features, so ``predict`` needs only the frozen backbone; with ``--option mode=end_to_end`` the
backbone is fine-tuned too (a GPU job) and the model classifies images through the tuned copy
(``image_level``; the tuned parameters are saved as ``backbone.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgclust.errors import InputError
from imgclust.heads.wrap import features_tensor, predict_finetuned_images
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, get_method, register_method
from imgclust.refine.icsr import ICSRConfig, make_views, train_icsr, train_icsr_end_to_end
from imgclust.refine.selftrain import LinearClassifier


@dataclass
class ICSRMethodConfig(ICSRConfig, MethodConfig):
    """ICSR's options (:class:`~imgclust.refine.icsr.ICSRConfig`) as a method config."""


@register_method
class ICSR(ClusteringMethod):
    """ICSR: rank samples inside clusters, then weighted self-training of a linear head, optionally end to end (refines a base method)."""

    name = "icsr"
    Config = ICSRMethodConfig
    config: ICSRMethodConfig

    def __init__(self, n_clusters: int, config: ICSRMethodConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.classifier_: LinearClassifier | None = None
        self.backbone_state_: dict[str, torch.Tensor] = {}  # end_to_end: the fine-tuned backbone parameters
        self.fit_proba_: np.ndarray | None = None  # end_to_end: the network's probabilities of the fit images

    @property
    def image_level(self) -> bool:
        """True for ``mode=end_to_end``: the model classifies images through its fine-tuned backbone."""
        return self.config.mode == "end_to_end"

    def fit(self, features: np.ndarray, ctx: FitContext) -> ICSR:
        """``ctx.base_proba`` (N, K): the fitted model to refine; without it the base method is fitted here.

        ``ctx.truth`` (or the labels of ``ctx.source``) feed the R_sr diagnostics only.
        """
        cfg = self.config
        x = np.ascontiguousarray(features, dtype=np.float32)
        base_proba = ctx.base_proba
        base_info: dict[str, Any] = {"method": cfg.base, "options": dict(cfg.base_options)}
        if base_proba is None:
            if cfg.base == self.name:
                raise InputError("icsr cannot use itself as its base method")
            base = get_method(cfg.base)(self.n_clusters, cfg.base_options)
            base.fit(x, ctx)
            base_proba = base.fit_proba(x)
            base_info["history"] = base.history_
        base_proba = np.asarray(base_proba, dtype=np.float32)
        truth, source, rows = ctx.truth, ctx.source, ctx.rows
        if truth is None and source is not None and rows is not None and getattr(source, "labels", None) is not None:
            truth = np.asarray(source.labels)[np.asarray(rows)]
        views = make_views(features_tensor(x), cfg, ctx)
        res = train_icsr(x, base_proba, self.n_clusters, cfg, views, truth=truth, seed=ctx.seed, progress=ctx.progress)
        hist: dict[str, Any] = dict(res.history)
        if self.image_level:
            from imgclust.features import resolve_device

            head_hist = hist
            res = train_icsr_end_to_end(res.classifier, x, self.n_clusters, cfg, source=source,
                                        backbone=ctx.backbone,
                                        rows=np.arange(len(x)) if rows is None else np.asarray(rows),
                                        device=resolve_device(ctx.device), work_dir=ctx.work_dir, truth=truth,
                                        seed=ctx.seed, progress=ctx.progress)
            hist = {**res.history, "rsr_first": head_hist.get("rsr_first"), "head_stage": head_hist}
            self.backbone_state_, self.fit_proba_ = res.backbone_state, res.fit_proba
        self.classifier_ = res.classifier
        self.labels_ = self.fit_proba_.argmax(1) if self.image_level else self.predict(x)
        sizes = np.bincount(self.labels_, minlength=self.n_clusters)
        self.history_ = {**hist, "base": base_info, "empty_clusters": [int(c) for c in np.flatnonzero(sizes == 0)],
                         "changed_vs_base": int((self.labels_ != base_proba.argmax(1)).sum())}
        self.base_labels_ = base_proba.argmax(1)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.classifier_ is None:
            raise InputError("this ICSR model is not fitted yet")
        return self.classifier_.predict_proba(np.asarray(features, dtype=np.float32)).astype(np.float32)

    def predict_proba_images(self, source: Any, backbone: Any, batch_size: int = 64, device: str = "auto",
                             workers: int | None = None, progress: bool = True) -> np.ndarray:
        """(N, K) probabilities of every image of ``source`` through the fine-tuned backbone and head
        (``mode=end_to_end``); ``backbone`` is the pretrained one the model was fitted from (the
        estimator's). Rows of images that cannot be decoded are all zero."""
        from imgclust.features import resolve_device

        if self.classifier_ is None:
            raise InputError("this ICSR model is not fitted yet")
        dev = resolve_device(device)
        clf = self.classifier_
        w, b, mean, std = (t.to(dev) for t in (clf.weight, clf.bias, clf.mean, clf.std))
        return predict_finetuned_images(backbone, self.backbone_state_, lambda z: torch.softmax(((z - mean) / std) @ w + b, 1),
                                        source, self.n_clusters, size=self.config.image_size, batch_size=batch_size,
                                        device=dev, workers=workers, progress=progress, desc="icsr predict")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The head (``clf.*``) and, for ``mode=end_to_end``, the fine-tuned backbone parameters (``backbone.*``)."""
        assert self.classifier_ is not None
        state = self.classifier_.state_dict("clf.")
        state.update({f"backbone.{k}": v.clone() for k, v in self.backbone_state_.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        clf = LinearClassifier.from_state_dict(state, "clf.")
        if clf.weight.shape[1] != self.n_clusters:
            raise InputError(f"saved ICSR classifier has {clf.weight.shape[1]} clusters, expected {self.n_clusters}")
        if not all(torch.isfinite(t).all() for t in (clf.weight, clf.bias, clf.mean, clf.std)):
            raise InputError("saved ICSR classifier has non-finite values")
        self.classifier_ = clf
        self.backbone_state_ = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        if self.image_level and not self.backbone_state_:
            raise InputError("saved ICSR model has mode=end_to_end but no backbone parameters")
        if not all(torch.isfinite(v).all() for v in self.backbone_state_.values() if v.is_floating_point()):
            raise InputError("saved ICSR backbone parameters have non-finite values")
