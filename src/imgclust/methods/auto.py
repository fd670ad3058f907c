"""``auto``: fit several candidate methods/configurations and keep the one chosen without labels.

Issue 18's "choose without labels": every candidate (a registered method with its own
options) is fitted on the same features and seed; their labellings are scored by the
label-free criterion of :mod:`imgclust.select` (default ``generalization``: TURTLE's
principle — the labelling a linear classifier learns and generalises best, held-out and
chance-corrected); the winner's model is kept and predicts new images. Every candidate's
scores land in ``history_["selection"]`` (hence in ``run.json``); when the run has labels,
``imgclust cluster`` adds each candidate's ACC and the Spearman correlation of criterion
and ACC, so a user sees whether the choice can be trusted.

Candidates are written ``method`` or ``method?key=value&key=value`` (values parsed as in
``--option``), e.g. ``spectral-kmeans?runs=3`` or ``temi?head=mlp&heads=2``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from imgclust.errors import InputError
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, get_method, register_method
from imgclust.select import CRITERIA, select

DEFAULT_CANDIDATES = ["kmeans", "spectral-kmeans"]


def parse_candidate(spec: str) -> tuple[str, dict]:
    from imgclust.config import parse_options

    name, _, opts = str(spec).partition("?")
    name = name.strip()
    if not name or name == "auto":
        raise InputError(f"bad auto candidate {spec!r}")
    return name, parse_options([o for o in opts.split("&") if o]) if opts else {}


@dataclass
class AutoConfig(MethodConfig):
    candidates: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    criterion: str = "generalization"  # generalization | knn | anmi (see imgclust.select)
    # Any other option (e.g. ``n_init=20``, as given to the former default ``kmeans``) is
    # forwarded to every candidate that has it; one no candidate has is an error.
    forward: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict | None) -> AutoConfig:
        d = dict(d or {})
        own = {k: d.pop(k) for k in ("candidates", "criterion", "forward") if k in d}
        fwd = {**dict(own.pop("forward", None) or {}), **d}
        return super().from_dict({**own, "forward": fwd})  # type: ignore[return-value]

    def candidate_options(self, spec: str) -> tuple[str, dict]:
        """(method name, options) of a candidate: the forwarded options it has, then its own."""
        from dataclasses import fields

        name, opts = parse_candidate(spec)
        have = {f.name for f in fields(get_method(name).Config)}
        return name, {**{k: v for k, v in self.forward.items() if k in have}, **opts}

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, list) or not self.candidates:
            raise InputError("candidates must be a non-empty list of method names")
        from dataclasses import fields

        used: set[str] = set()
        for c in self.candidates:
            name, opts = self.candidate_options(c)
            get_method(name).Config.from_dict(opts)  # unknown method / option -> one-line error now
            used |= {f.name for f in fields(get_method(name).Config)}
        unknown = sorted(set(self.forward) - used)
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for auto and its candidates {self.candidates}")
        if self.criterion not in CRITERIA:
            raise InputError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")


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

    def fit(self, features: np.ndarray, ctx: FitContext) -> Auto:
        models, seconds, specs, skipped = [], [], [], {}
        for spec in self.config.candidates:
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
        if not models:
            raise InputError(f"no auto candidate could run: {skipped}")
        if len(models) == 1 or len(features) < 8:  # nothing to choose, or too few images to score
            chosen = specs[0]
            sel = {"chosen": chosen, "criterion": self.config.criterion, "spearman_vs_acc": None,
                   "candidates": [{"name": sp, "seconds": s} for sp, s in zip(specs, seconds)],
                   "note": "no choice: one candidate ran, or fewer than 8 images"}
        else:
            sel = select(self.candidate_labels_, features, criterion=self.config.criterion, seed=ctx.seed).to_dict()
            for row, s in zip(sel["candidates"], seconds):
                row["seconds"] = s
        sel["skipped"] = skipped
        self.chosen_index_ = self.config.candidates.index(sel["chosen"])
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
        if idx is None or idx.numel() != 1 or not 0 <= int(idx) < len(self.config.candidates):
            raise InputError("not an auto state: chosen_index missing or out of range")
        self.chosen_index_ = int(idx)
        name, opts = self.config.candidate_options(self.config.candidates[self.chosen_index_])
        m = get_method(name)(self.n_clusters, opts)
        m.load_state_dict({k[len("chosen."):]: v for k, v in state.items() if k.startswith("chosen.")})
        self.chosen_ = m
