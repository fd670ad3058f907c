"""ICCE end to end: multi-head clustering -> cluster ensemble -> self-training.

"Image Clustering through Cluster Ensembles" (ICCE paper, Fig. 2):

1. **Stage 1** — ``icce-heads`` (:mod:`imgclust.methods.temi`): H = 50 heads on frozen
   features with adaptive neighbours, BatchNorm, Sinkhorn-Knopp and the CE term.
2. **Stage 2** — the H teacher labellings of the training images are combined by
   :func:`imgclust.consensus.consensus` (CSPA, HGPA, MCLA, HBGF; the candidate with the
   highest ANMI to the heads wins).
3. **Stage 3** — a linear classifier on the same frozen features is trained on the
   consensus labels (:func:`imgclust.refine.selftrain.self_train`, hyper-parameters chosen
   on held-out pseudo-labels). Its predictions are the final clustering of the training
   images (``labels_``) and classify new images (``predict_proba``). One round: ICCE found
   more rounds do not help.

``self_train=false`` stops after stage 2: ``labels_`` is then the consensus itself, and new
images are classified by the best head (the consensus has no model of its own).

History (``history_``) adds ``consensus`` (method chosen, ANMI and seconds of every
candidate, skipped ones) and ``self_training`` (chosen learning rate / weight decay, the
held-out grid, seconds) to stage 1's entries; ``best_head_labels_`` and
``consensus_labels_`` keep the intermediate labellings for evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval, MinLen

from imgclust.configcheck import OneOf, option
from imgclust.consensus import METHODS as CONSENSUS_METHODS
from imgclust.consensus import consensus_once
from imgclust.errors import InputError
from imgclust.methods.base import FitContext, register_method
from imgclust.methods.temi import ICCEHeads, ICCEHeadsConfig
from imgclust.refine.selftrain import DEFAULT_LRS, DEFAULT_WDS, LinearClassifier, self_train


@dataclass
class ICCEConfig(ICCEHeadsConfig):
    """ICCE: stage-1 options (see ``icce-heads``) plus the ensemble and self-training."""

    consensus: list[str] = option(list(CONSENSUS_METHODS), MinLen(1), each=OneOf(CONSENSUS_METHODS))  # candidates
    cspa_max_n: int = option(5000, Ge(1))  # CSPA's N x N similarity only up to this many images
    hgpa_sample: int = option(4000, Ge(1))  # HGPA partitions a sample this large, then extends
    self_train: bool = True
    st_epochs: int = option(30, Ge(1))
    st_batch_size: int = option(256, Ge(1))
    st_lrs: list[float] = option(list(DEFAULT_LRS), MinLen(1), each=Gt(0))
    st_weight_decays: list[float] = option(list(DEFAULT_WDS), MinLen(1), each=Ge(0))
    st_holdout: float = option(0.1, Interval(ge=0, lt=1))  # share of pseudo-labels held out to choose lr / weight decay


@register_method
class ICCE(ICCEHeads):
    """ICCE (all three stages): heads -> consensus -> self-trained linear classifier."""

    name = "icce"
    Config = ICCEConfig
    config: ICCEConfig

    def __init__(self, n_clusters: int, config: ICCEConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.classifier_: LinearClassifier | None = None
        self.best_head_labels_: np.ndarray | None = None
        self.consensus_labels_: np.ndarray | None = None

    def fit(self, features: np.ndarray, ctx: FitContext) -> ICCE:
        cfg = self.config
        super().fit(features, ctx)  # stage 1: sets head_labels_, best_head_, labels_ (best head)
        self.best_head_labels_ = self.labels_.copy()
        t0 = time.perf_counter()
        res = consensus_once(self.head_labels_, self.n_clusters, methods=cfg.consensus, seed=ctx.seed,  # issue 20: rank 0
                        cspa_max_n=cfg.cspa_max_n, hgpa_sample=cfg.hgpa_sample, progress=ctx.progress)
        self.consensus_labels_ = res.labels
        self.history_["consensus"] = {**res.summary(), "n_clusters": int(res.labels.max()) + 1}
        self.history_["consensus_s"] = round(time.perf_counter() - t0, 3)
        if not cfg.self_train:
            self.labels_ = res.labels.astype(np.int64)
            return self
        st = self_train(features, res.labels, self.n_clusters, lrs=tuple(cfg.st_lrs),
                        weight_decays=tuple(cfg.st_weight_decays), epochs=cfg.st_epochs,
                        batch_size=cfg.st_batch_size, holdout=cfg.st_holdout, seed=ctx.seed, progress=ctx.progress)
        self.classifier_ = st.classifier
        self.labels_ = self.predict(features).astype(np.int64)
        self.history_["self_training"] = {"lr": st.lr, "weight_decay": st.weight_decay, "grid": st.grid,
                                          "seconds": round(st.seconds, 3),
                                          "agreement_with_consensus": float((self.labels_ == res.labels).mean())}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.classifier_ is None:
            return super().predict_proba(features)
        return self.classifier_.predict_proba(features).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.classifier_ is not None:
            state.update(self.classifier_.state_dict("clf."))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if "clf.weight" in state:
            clf = LinearClassifier.from_state_dict(state, "clf.")
            if clf.weight.shape[1] != self.n_clusters:
                raise InputError(f"saved classifier has {clf.weight.shape[1]} classes, expected {self.n_clusters}")
            if clf.weight.shape[0] != self.teacher_.in_dim:
                raise InputError("saved classifier and heads expect different feature dimensions")
            self.classifier_ = clf
        elif self.config.self_train:
            raise InputError("this icce model was saved without its self-trained classifier (clf.* tensors)")
