"""The contract every clustering method (one recipe per paper) fulfils.

A method receives the cached features of the valid images and a :class:`FitContext`
(seed, device, progress, where to cache intermediate results) and learns a model that maps
features to K cluster probabilities. Methods that need more (neighbour sets, augmented
views, the images themselves) take it from the context, so the estimator and the CLI stay
the same for all of them.

Each method declares its options as one dataclass (``Config``) with the paper's defaults,
and its learned state as a flat dict of tensors so it can be saved and re-loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import InitVar, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from imgclust.configcheck import check_fields
from imgclust.errors import InputError
from imgclust.neighbors import l2_normalize  # noqa: F401 - re-exported: methods import it from here

if TYPE_CHECKING:
    from imgclust.backbones.base import Backbone
    from imgclust.data.base import ImageSource


# FitContext's typed fields for what the old ``extras`` dict carried (issue 17), under the same keys.
_EXTRAS_KEYS = ("source", "backbone", "rows", "cache_dir", "batch_size", "precision", "workers",
                "base_proba", "truth", "labels", "certain")


@dataclass
class FitContext:
    """What a method may use besides the features (issue 17: typed fields, no string-keyed dict).

    Set by :meth:`imgclust.api.ImageClusterer.fit` (and the refine / apply-edits jobs). A method
    reads only the fields its :attr:`ClusteringMethod.inputs` declares it needs.
    """

    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    work_dir: Path | None = None  # where a method may cache neighbours, checkpoints, ...
    # -- the images behind the feature rows (None when fitting on precomputed features)
    source: ImageSource | None = None
    backbone: Backbone | None = None
    rows: np.ndarray | None = None  # source index of each feature row (valid images only)
    # -- feature-extraction settings, for methods that extract views or fine-tune the backbone
    cache_dir: str | None = None
    batch_size: int = 64
    precision: str = "fp32"
    workers: int | None = None
    # -- refiners (:mod:`imgclust.refine.base`): the fitted model's probabilities of the rows
    base_proba: np.ndarray | None = None
    # -- true labels of the rows (-1 unknown): diagnostics only (R_sr, per-stage ACC), never training
    truth: np.ndarray | None = None
    # -- apply-edits (:mod:`imgclust.methods.reviewed`): the edited labels and which ones a person set
    labels: np.ndarray | None = None
    certain: np.ndarray | None = None
    # Deprecated (one release): the old string-keyed dict; its keys are copied into the fields above.
    extras: InitVar[dict[str, Any] | None] = None

    def __post_init__(self, extras: dict[str, Any] | None) -> None:
        if extras:
            unknown = sorted(set(extras) - set(_EXTRAS_KEYS))
            if unknown:
                raise TypeError(f"FitContext: unknown extras {unknown}; allowed: {list(_EXTRAS_KEYS)}")
            warnings.warn("FitContext(extras=...) is deprecated: pass the typed fields (source=, rows=, ...)",
                          DeprecationWarning, stacklevel=3)
            for key, value in extras.items():
                setattr(self, key, value)


@dataclass
class MethodConfig:
    """Base of per-method option dataclasses.

    Fields declare their ranges (``heads: int = option(50, Ge(1))``, :mod:`imgclust.configcheck`);
    ``__post_init__`` checks them all. A subclass with rules relating two fields overrides
    ``__post_init__``, calls ``super().__post_init__()`` first, then checks them explicitly.
    """

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MethodConfig:
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for this method; allowed: {sorted(names)}")
        from imgclust.config import check_types

        check_types(cls, d, "method_options")  # wrong types end in one line, not deep in a run
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClusteringMethod(ABC):
    """Learns K clusters from features; predicts probabilities for new features.

    The protocol the estimator (:mod:`imgclust.api`) calls, and nothing else:

    * :attr:`inputs` — what ``fit`` needs besides the feature rows: ``"features"`` (nothing
      more) or ``"images"`` (it reads ``ctx.source`` / ``ctx.rows`` / ``ctx.backbone``);
    * :meth:`fit` (sets ``labels_``), :meth:`predict_proba` on features;
    * :meth:`fit_proba` — the probabilities of the rows it was fitted on;
    * :attr:`image_level` — True when the model classifies *images* (it fine-tuned or learned
      its own network, so cached backbone features no longer describe what it sees): then
      :meth:`fit_proba` is its own pass over the fit images and new images go through
      :meth:`predict_proba_images`;
    * :meth:`state_dict` / :meth:`load_state_dict` — tensors only.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Optional results other stages read (None when a method has none): per-head labels (trust
    # score), candidate labels of a label-free choice (selection diagnostics).
    head_labels_: Any = None
    candidate_labels_: Any = None

    def __init__(self, n_clusters: int, config: MethodConfig | dict | None = None) -> None:
        if n_clusters < 2:
            raise InputError(f"K must be at least 2, got {n_clusters}")
        self.n_clusters = int(n_clusters)
        self.config = config if isinstance(config, MethodConfig) else self.Config.from_dict(config)
        self.labels_: np.ndarray | None = None
        self.fit_proba_: np.ndarray | None = None  # image-level methods: their probabilities of the fit images
        self.history_: dict[str, Any] = {}

    @property
    def inputs(self) -> str:
        """``"features"`` or ``"images"``: what :meth:`fit` needs (override when options decide)."""
        return "images" if self.image_level else "features"

    @property
    def image_level(self) -> bool:
        """True when the fitted model classifies images rather than cached backbone features."""
        return False

    @abstractmethod
    def fit(self, features: np.ndarray, ctx: FitContext) -> ClusteringMethod:
        """Learn from ``features`` (N, D) float32; sets ``labels_``."""

    @abstractmethod
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, K) cluster probabilities; rows sum to 1."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.predict_proba(features).argmax(axis=1)

    def fit_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, K) probabilities of the rows ``fit`` saw (``features`` are those rows)."""
        if not self.image_level:
            return self.predict_proba(features)
        if self.fit_proba_ is None:
            raise InputError(f"{self.name}: not fitted on images in this process (fit_proba_ is empty)")
        return self.fit_proba_

    def predict_proba_images(self, source: Any, backbone: Any, batch_size: int = 64, device: str = "auto",
                             workers: int | None = None, progress: bool = True) -> np.ndarray:
        """(N, K) probabilities of the images of ``source``; only image-level models have it."""
        raise InputError(f"{self.name} classifies backbone features, not images")

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to predict, as tensors (saved with torch.save, loaded weights_only)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


FIT_PROBA_BLOCK = 1 << 20  # issue 20: rows per block of fit_labels above this many rows


def fit_labels(model: ClusteringMethod, features: np.ndarray, block: int = FIT_PROBA_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, max) of ``model.fit_proba(features)`` per row: the fitted rows' labels and confidences.

    Issue 20: above ``block`` rows (and for a model that classifies features, not images) the
    probabilities come ``block`` rows at a time, so the (N, K) float matrix of every row never exists
    (4 GB at 10M rows x K = 100); up to ``block`` rows it is the one call it always was. Blocked, a
    method's probabilities may differ in the last float bits (BLAS blocks a different number of rows:
    k-means' confidences by ~3e-7 on the digits), so a label can differ only on a float-level tie."""
    if len(features) <= block or model.image_level:
        proba = model.fit_proba(features)
        return proba.argmax(axis=1), proba.max(axis=1)
    lab, conf = np.empty(len(features), np.int64), np.empty(len(features), np.float32)
    for s in range(0, len(features), block):
        p = model.fit_proba(features[s:s + block])
        lab[s:s + len(p)], conf[s:s + len(p)] = p.argmax(axis=1), p.max(axis=1)
    return lab, conf


_METHODS: dict[str, type[ClusteringMethod]] = {}


def register_method(cls: type[ClusteringMethod]) -> type[ClusteringMethod]:
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"method name {cls.name!r} missing or registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[ClusteringMethod]:
    from imgclust import methods  # noqa: F401  (imports every recipe module)

    if name not in _METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def available_methods() -> dict[str, type[ClusteringMethod]]:
    from imgclust import methods  # noqa: F401

    return dict(sorted(_METHODS.items()))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
