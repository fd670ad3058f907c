"""The model of a reviewed run (``imgclust apply-edits``): self-training on the edited labels.

Not a clustering method one picks with ``--method``: ``apply-edits`` fits it on the run's
cached features with the labels after the human edits (:mod:`imgclust.refine.edits`) and
saves it as the new run's ``model/``, so ``imgclust predict`` reflects the corrections.

* A linear classifier is self-trained (:func:`imgclust.refine.selftrain.self_train`, ICCE
  stage 3: learning rate and weight decay chosen on held-out pseudo-labels, no ground truth)
  on every image not marked as an outlier, with the edited labels as targets. Images the user
  moved are *certain* labels: their cross-entropy weighs ``certain_weight`` (default 20) times
  an ordinary pseudo-label's.
* A linear head cannot be forced to honour a handful of corrected images against thousands
  of neighbours (digits, raw pixels, K=10, 4 moved images: the self-trained classifier alone
  put 3 of 4 in their new cluster; ``history_["classifier_agrees_on_certain"]`` records it for
  every apply), so the corrected images are also kept as a *memory*: an image
  whose L2-normalised features have cosine similarity >= ``memory_similarity`` (0.999: the
  same image, or an exact/re-encoded copy of it) with a corrected one gets the corrected
  cluster. Every other image goes through the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval

from imgclust.configcheck import option
from imgclust.errors import InputError
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, l2_normalize, register_method
from imgclust.refine.selftrain import LinearClassifier, self_train


@dataclass
class ReviewedConfig(MethodConfig):
    certain_weight: float = option(20.0, Gt(0))
    epochs: int = option(30, Ge(1))
    memory: bool = True
    memory_similarity: float = option(0.999, Interval(ge=-1, le=1))  # a cosine similarity


@register_method
class Reviewed(ClusteringMethod):
    """A linear classifier self-trained on human-edited labels, plus a memory of the corrected images (made by apply-edits)."""

    name = "reviewed"
    Config = ReviewedConfig
    config: ReviewedConfig

    def __init__(self, n_clusters: int, config: ReviewedConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.classifier_: LinearClassifier | None = None
        self.memory_x_ = np.zeros((0, 0), np.float32)
        self.memory_y_ = np.zeros(0, np.int64)

    def fit(self, features: np.ndarray, ctx: FitContext) -> Reviewed:
        """``ctx.labels`` (N,) edited labels, ``ctx.certain`` (N,) bool (moved by the user)."""
        if ctx.labels is None:
            raise InputError("the 'reviewed' method is fitted by `imgclust apply-edits`, not by `cluster`")
        x = np.ascontiguousarray(features, dtype=np.float32)
        y = np.asarray(ctx.labels, dtype=np.int64)
        certain = np.asarray(np.zeros(len(y), bool) if ctx.certain is None else ctx.certain, dtype=bool)
        w = np.where(certain, float(self.config.certain_weight), 1.0).astype(np.float32)
        st = self_train(x, y, self.n_clusters, weights=w, epochs=int(self.config.epochs), seed=ctx.seed,
                        progress=ctx.progress)
        self.classifier_ = st.classifier
        if self.config.memory and certain.any():
            self.memory_x_ = l2_normalize(x[certain])
            self.memory_y_ = y[certain]
        clf_pred = st.classifier.predict_proba(x).argmax(1)
        self.history_ = {"self_training": {"lr": st.lr, "weight_decay": st.weight_decay, "grid": st.grid,
                                           "seconds": round(st.seconds, 3)},
                         "n_certain": int(certain.sum()),
                         "classifier_agrees_with_edits": round(float((clf_pred == y).mean()), 4),
                         "classifier_agrees_on_certain": None if not certain.any()
                         else round(float((clf_pred[certain] == y[certain]).mean()), 4)}
        self.labels_ = self.predict(x)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.classifier_ is None:
            raise InputError("this reviewed model is not fitted yet")
        x = np.asarray(features, dtype=np.float32)
        p = self.classifier_.predict_proba(x).astype(np.float32)
        if len(self.memory_y_) and len(x):
            sims = l2_normalize(x) @ self.memory_x_.T
            best = sims.argmax(1)
            hit = sims[np.arange(len(x)), best] >= float(self.config.memory_similarity)
            if hit.any():
                p[hit] = 0.0
                p[np.flatnonzero(hit), self.memory_y_[best[hit]]] = 1.0
        return p

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.classifier_ is not None
        state = self.classifier_.state_dict("clf.")
        state["memory.x"] = torch.from_numpy(np.ascontiguousarray(self.memory_x_, dtype=np.float32))
        state["memory.y"] = torch.from_numpy(np.ascontiguousarray(self.memory_y_, dtype=np.int64))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        clf = LinearClassifier.from_state_dict(state, "clf.")
        if clf.weight.shape[1] != self.n_clusters:
            raise InputError(f"saved classifier has {clf.weight.shape[1]} clusters, expected {self.n_clusters}")
        if not all(torch.isfinite(t).all() for t in (clf.weight, clf.bias, clf.mean, clf.std)):
            raise InputError("saved classifier has non-finite values")
        mx, my = state.get("memory.x"), state.get("memory.y")
        if mx is None or my is None:
            raise InputError("saved reviewed model has no memory tensors")
        mx_np, my_np = mx.float().numpy(), my.long().numpy()
        if len(my_np) and (mx_np.ndim != 2 or mx_np.shape != (len(my_np), clf.weight.shape[0])
                           or my_np.min() < 0 or my_np.max() >= self.n_clusters or not np.isfinite(mx_np).all()):
            raise InputError("saved reviewed model has an inconsistent memory")
        self.classifier_ = clf
        self.memory_x_, self.memory_y_ = mx_np, my_np
