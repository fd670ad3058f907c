"""``auto``: fit several candidate methods/configurations and keep the one chosen without labels.

Issue 18's "choose without labels": every candidate (a registered method with its own
options) is fitted on the same features and seed; their labellings are scored by the
label-free criterion of :mod:`imgclust.select` (default ``generalization``: TURTLE's
principle — the labelling a linear classifier learns and generalises best, held-out and
chance-corrected); the winner's model is kept and predicts new images. Every candidate's
scores land in ``history_["selection"]`` (hence in ``run.json``); when the run has labels,
``imgclust cluster`` adds each candidate's ACC and the Spearman correlation of criterion
and ACC, so a user sees whether the choice can be trusted.

The candidate set depends on the data size unless ``candidates=[...]`` is given:
below ``large_from`` (5,000) images ``kmeans`` vs ``spectral-kmeans`` (seconds; UMAP's
~40 s numba compile would dominate, and on digits spectral is as good as UMAP: 0.899 vs
0.883 ACC); from 5,000 on ``kmeans`` vs ``umap-kmeans?runs=3&power=0.5&centre=true`` (UMAP on the full-width
features with 3 seeds combined by consensus, then self-trained on the original features),
chosen by the ``balanced`` criterion (mean of the linear-probe ``generalization`` and the
local ``knn``). Sessions 2-3 used UMAP on the top 64 principal components (``pca=64``, ~2x
cheaper); session 4 measured both on CIFAR-10 *train* (50k, seed 0, with self-training):
full width 0.596 / 0.479 ACC/NMI vs 0.583 / 0.457, so full width is the default.
On CIFAR-10 test (fitted on the same 10k images, seed 0) the linear probe alone prefers
k-means' linear partition (0.809 vs 0.794 for UMAP-64 + k-means, which is 10 points more
accurate), even after self-training (0.806); the mean ranks this pair right (0.818 vs
0.840) but would rank spectral-kmeans above UMAP, hence spectral is not in the large set.
Re-checked on the CIFAR-10 *train* split (50k, session 3): the linear probe again ranks
k-means + UMAP variants in the reverse order of ACC (Spearman -1.0), ``knn``/``balanced`` put
every UMAP labelling above k-means (0.859-0.868 vs 0.839) but do not order UMAP variants by
ACC — so ``balanced`` decides "UMAP or k-means", and the UMAP settings are a design choice
made on train labels. Session 6 changed the UMAP's input to the signed square root of the
features, centred (``power=0.5&centre=true``, :func:`imgclust.methods.manifold.embedding_input`):
CIFAR-10 train, one seed, no self-training, 0.609 / 0.490 vs 0.596 / 0.481; Fashion-MNIST
train 0.695 / 0.719 vs 0.693 / 0.717. Numbers: ``docs/notes/issue-18.md``.

Candidates are written ``method`` or ``method?key=value&key=value`` (values parsed as in
``--option``), e.g. ``spectral-kmeans?runs=3`` or ``temi?head=mlp&heads=2``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from annotated_types import Ge, MinLen

from imgclust.configcheck import OneOf, option
from imgclust.errors import InputError
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, get_method, register_method
from imgclust.select import CRITERIA, select

DEFAULT_CANDIDATES = ["kmeans", "spectral-kmeans"]  # fewer than LARGE_FROM images
# From LARGE_FROM images on (issue 18; chosen on CIFAR-10 *train*, see docs/notes/issue-18.md):
# UMAP on the full-width features with 3 seeds combined by consensus and self-trained on the
# original features (session 4: 0.596 train ACC vs 0.58 for the former UMAP-on-64-PCs
# candidate). Below, UMAP's ~40 s numba compile dominates and spectral is as good (digits).
# Session 6: the UMAP's input is the signed square root of the features, centred (manifold.embedding_input;
# CIFAR-10 train, 1 seed: 0.609 / 0.490 vs 0.596 / 0.481 ACC / NMI on the features as they are).
LARGE_CANDIDATES = ["kmeans", "umap-kmeans?runs=3&power=0.5&centre=true"]
LARGE_FROM = 5000
# Former large candidates: kept in the pool (never fitted unless pinned) so that a saved model's
# index (``AutoConfig.pool()``) still names the candidate it was fitted with.
FORMER_CANDIDATES = ["umap-kmeans?runs=3&pca=64", "umap-kmeans?runs=3"]


def parse_candidate(spec: str) -> tuple[str, dict]:
    from imgclust.config import parse_options

    name, _, opts = str(spec).partition("?")
    name = name.strip()
    if not name or name == "auto":
        raise InputError(f"bad auto candidate {spec!r}")
    return name, parse_options([o for o in opts.split("&") if o]) if opts else {}


@dataclass
class AutoConfig(MethodConfig):
    # None (default): chosen by data size — DEFAULT_CANDIDATES below ``large_from`` images,
    # LARGE_CANDIDATES from there on; a list: exactly these.
    candidates: list[str] | None = option(None, MinLen(1))
    large_from: int = option(LARGE_FROM, Ge(1))
    # generalization | knn | anmi | balanced (see imgclust.select); None (default): by data size —
    # generalization below ``large_from`` images, balanced from there on (module doc)
    criterion: str | None = option(None, OneOf(CRITERIA))
    # Any other option (e.g. ``n_init=20``, as given to the former default ``kmeans``) is
    # forwarded to every candidate that has it; one no candidate has is an error.
    forward: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict | None) -> AutoConfig:
        d = dict(d or {})
        own = {k: d.pop(k) for k in ("candidates", "criterion", "forward", "large_from") if k in d}
        fwd = {**dict(own.pop("forward", None) or {}), **d}
        return super().from_dict({**own, "forward": fwd})  # type: ignore[return-value]

    def candidate_options(self, spec: str) -> tuple[str, dict]:
        """(method name, options) of a candidate: the forwarded options it has, then its own."""
        from dataclasses import fields

        name, opts = parse_candidate(spec)
        have = {f.name for f in fields(get_method(name).Config)}
        return name, {**{k: v for k, v in self.forward.items() if k in have}, **opts}

    def pool(self) -> list[str]:
        """Every candidate this configuration can fit, in a fixed order (saved models index it)."""
        if self.candidates is not None:
            return list(self.candidates)
        known = DEFAULT_CANDIDATES + FORMER_CANDIDATES  # fixed prefix: saved models keep their index
        return known + [c for c in LARGE_CANDIDATES if c not in known]

    def for_size(self, n: int) -> list[str]:
        """The candidates fitted on ``n`` images."""
        if self.candidates is not None:
            return list(self.candidates)
        return list(LARGE_CANDIDATES if n >= self.large_from else DEFAULT_CANDIDATES)

    def criterion_for_size(self, n: int) -> str:
        if self.criterion is not None:
            return self.criterion
        return "balanced" if self.candidates is None and n >= self.large_from else "generalization"

    def __post_init__(self) -> None:
        super().__post_init__()  # the ranges declared above (imgclust.configcheck)
        from dataclasses import fields

        used: set[str] = set()
        for c in self.pool():
            name, opts = self.candidate_options(c)
            get_method(name).Config.from_dict(opts)  # unknown method / option -> one-line error now
            used |= {f.name for f in fields(get_method(name).Config)}
        unknown = sorted(set(self.forward) - used)
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for auto and its candidates {self.pool()}")


@register_method
class Auto(ClusteringMethod):
    """Fit every candidate, score the labellings without labels, keep the best."""

    name = "auto"
    Config = AutoConfig
    config: AutoConfig

    def __init__(self, n_clusters: int, config: AutoConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.chosen_: ClusteringMethod | None = None
        self.chosen_index_: int = -1
        self.candidate_labels_: dict[str, np.ndarray] = {}
        self.candidate_models_: dict[str, ClusteringMethod] = {}  # fitted this session (not saved): benchmarks

    def fit(self, features: np.ndarray, ctx: FitContext) -> Auto:
        models, seconds, specs, skipped = [], [], [], {}
        for spec in self.config.for_size(len(features)):
            name, opts = self.config.candidate_options(spec)
            t0 = time.perf_counter()
            try:
                m = get_method(name)(self.n_clusters, opts).fit(features, ctx)
            except InputError as e:  # e.g. too few images for a graph: the other candidates still run
                skipped[spec] = str(e)
                continue
            seconds.append(round(time.perf_counter() - t0, 3))
            models.append(m)
            specs.append(spec)
            self.candidate_labels_[spec] = np.asarray(m.labels_)
            self.candidate_models_[spec] = m
        if not models:
            raise InputError(f"no auto candidate could run: {skipped}")
        if len(models) == 1 or len(features) < 8:  # nothing to choose, or too few images to score
            chosen = specs[0]
            sel = {"chosen": chosen, "criterion": self.config.criterion_for_size(len(features)),
                   "spearman_vs_acc": None,
                   "candidates": [{"name": sp, "seconds": s} for sp, s in zip(specs, seconds)],
                   "note": "no choice: one candidate ran, or fewer than 8 images"}
        else:
            sel = select(self.candidate_labels_, features, criterion=self.config.criterion_for_size(len(features)),
                         seed=ctx.seed).to_dict()
            for row, s in zip(sel["candidates"], seconds):
                row["seconds"] = s
        sel["skipped"] = skipped
        self.chosen_index_ = self.config.pool().index(sel["chosen"])
        self.chosen_ = models[specs.index(sel["chosen"])]
        self.labels_ = np.asarray(self.chosen_.labels_)
        self.history_ = {"selection": sel, "chosen_history": self.chosen_.history_}
        return self

    def _check(self) -> ClusteringMethod:
        if self.chosen_ is None:
            raise InputError("this auto model is not fitted yet")
        return self.chosen_

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self._check().predict_proba(features)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"chosen.{k}": v for k, v in self._check().state_dict().items()}
        state["chosen_index"] = torch.tensor(self.chosen_index_)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        idx = state.get("chosen_index")
        if idx is None or idx.numel() != 1 or not 0 <= int(idx) < len(self.config.pool()):
            raise InputError("not an auto state: chosen_index missing or out of range")
        self.chosen_index_ = int(idx)
        name, opts = self.config.candidate_options(self.config.pool()[self.chosen_index_])
        m = get_method(name)(self.n_clusters, opts)
        m.load_state_dict({k[len("chosen."):]: v for k, v in state.items() if k.startswith("chosen.")})
        self.chosen_ = m
