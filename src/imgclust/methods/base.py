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

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from imgclust.errors import InputError
from imgclust.neighbors import l2_normalize  # noqa: F401 - re-exported: methods import it from here


@dataclass
class FitContext:
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    work_dir: Path | None = None  # where a method may cache neighbours, checkpoints, ...
    # Set by ImageClusterer.fit: "source" (ImageSource or None for precomputed features),
    # "backbone" (Backbone or None), "rows" (source index of each feature row), "cache_dir",
    # "batch_size", "precision", "workers" (feature-extraction settings, to extract views).
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """Base of per-method option dataclasses."""

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
    """Learns K clusters from features; predicts probabilities for new features."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, n_clusters: int, config: MethodConfig | dict | None = None) -> None:
        if n_clusters < 2:
            raise InputError(f"K must be at least 2, got {n_clusters}")
        self.n_clusters = int(n_clusters)
        self.config = config if isinstance(config, MethodConfig) else self.Config.from_dict(config)
        self.labels_: np.ndarray | None = None
        self.history_: dict[str, Any] = {}

    @abstractmethod
    def fit(self, features: np.ndarray, ctx: FitContext) -> ClusteringMethod:
        """Learn from ``features`` (N, D) float32; sets ``labels_``."""

    @abstractmethod
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, K) cluster probabilities; rows sum to 1."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.predict_proba(features).argmax(axis=1)

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to predict, as tensors (saved with torch.save, loaded weights_only)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


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
