"""k-means on L2-normalised features (spherical k-means): the baseline every paper reports.

Uses faiss's k-means (multi-threaded, several restarts, keeps the best by objective).
Confidence of an assignment is the softmax of the cosine similarities to the centroids at
temperature ``temperature`` (so it lies in [1/K, 1] and is comparable across runs).

At scale (issue 20): above ``train_sample`` rows (default 262,144; at least 40 x K, faiss's minimum of 39 per centroid) the
centroids are trained on a seeded uniform sample of that many rows and every row is then
assigned to its nearest centroid in blocks of 65,536 rows, so neither training nor assignment
holds more than a block of normalised features besides the (memory-mapped) input. Lloyd's
centroids from a 262k sample of 1M clustered rows differ from the full-data ones far less than
restarts differ from each other (faiss itself subsamples to 256 x K rows by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
from annotated_types import Ge, Gt

from imgclust.configcheck import option
from imgclust.errors import InputError
from imgclust.methods.base import (
    ClusteringMethod,
    FitContext,
    MethodConfig,
    l2_normalize,
    register_method,
    softmax,
)
from imgclust.progress import progress_bar


@dataclass
class KMeansConfig(MethodConfig):
    n_init: int = option(10, Ge(1))  # restarts; the one with the best objective is kept
    max_iter: int = option(100, Ge(1))
    temperature: float = option(0.05, Gt(0))  # softmax temperature on cosine similarities, for confidences
    normalize: bool = True  # L2-normalise features (spherical k-means)
    train_sample: int = option(262_144, Ge(1))  # issue 20: above this many rows, train on a seeded sample, assign all


@register_method
class KMeans(ClusteringMethod):
    name = "kmeans"
    Config = KMeansConfig
    config: KMeansConfig

    def __init__(self, n_clusters: int, config: KMeansConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.centroids_: np.ndarray | None = None

    def _prep(self, features: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float32)
        if not self.config.normalize:
            return x
        with np.errstate(over="ignore"):
            big = ~np.isfinite(np.einsum("ij,ij->i", x, x))
        if big.any():  # |x|^2 overflows float32 (values > ~1e19): scale those rows first
            x = x.copy()
            x[big] /= np.abs(x[big]).max(axis=1, keepdims=True)
        return l2_normalize(x)

    def fit(self, features: np.ndarray, ctx: FitContext) -> KMeans:
        n_all = len(features)
        sample = max(int(self.config.train_sample), 40 * self.n_clusters)
        if n_all > sample:  # --- issue 20: train on a sample, assign every row in blocks
            rows = np.sort(np.random.default_rng(int(ctx.seed)).choice(n_all, size=sample, replace=False))
            x = self._prep(np.asarray(features[rows]))
        else:
            x = self._prep(features)
        n, d = x.shape
        if n < self.n_clusters:
            raise InputError(f"K={self.n_clusters} is larger than the number of images ({n})")
        # One faiss run per restart (rather than faiss's own nredo) so that a bar can show the
        # restarts going by (issue 24: k-means was silent); the best objective wins, as with nredo.
        best = None
        bar = progress_bar(self.config.n_init, "k-means restarts", unit="run", enable=ctx.progress)
        for r in range(self.config.n_init):
            km = faiss.Kmeans(
                d,
                self.n_clusters,
                niter=self.config.max_iter,
                nredo=1,
                seed=int(ctx.seed) + 1 + r * 1000,  # faiss treats seed 0 specially on some versions
                spherical=self.config.normalize,
                max_points_per_centroid=max(256, n),  # use every point (faiss subsamples by default)
                min_points_per_centroid=1,
                verbose=False,
            )
            km.train(x)
            # spherical: the objective is the summed similarity (higher is better); else the summed distance
            better = best is None or (km.obj[-1] > best[0] if self.config.normalize else km.obj[-1] < best[0])
            if better:
                best = (float(km.obj[-1]), np.asarray(km.centroids, dtype=np.float32).copy(), list(km.obj))
            bar.update(1)
        bar.close()
        assert best is not None
        self.centroids_ = best[1]
        self.history_ = {"objective": [float(v) for v in best[2][-self.config.max_iter:]]}
        if n_all > sample:
            self.history_["trained_on_sample"] = int(sample)
        self.labels_ = self.predict(features)
        # With fewer distinct points than K (duplicates, constant images) faiss keeps
        # coincident centroids and some clusters get no point: reported, not an error.
        sizes = np.bincount(self.labels_, minlength=self.n_clusters)
        self.history_["empty_clusters"] = [int(c) for c in np.flatnonzero(sizes == 0)]
        return self

    def predict(self, features: np.ndarray, block: int = 65_536) -> np.ndarray:
        """Nearest centroid per row, computed in row blocks (no N x D copy of a memmapped input)."""
        n = len(features)
        out = np.empty(n, dtype=np.int64)
        for s in range(0, n, block):
            out[s:s + block] = self.predict_proba(np.asarray(features[s:s + block])).argmax(axis=1)
        return out

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.centroids_ is None:
            raise InputError("this k-means model is not fitted yet")
        x = self._prep(features)
        c = l2_normalize(self.centroids_) if self.config.normalize else self.centroids_
        if self.config.normalize:
            logits = x @ c.T / self.config.temperature
        else:  # negative squared distance, scaled by the mean so the temperature is unit-free
            d2 = (x**2).sum(1, keepdims=True) - 2 * x @ c.T + (c**2).sum(1)[None]
            logits = -d2 / max(float(np.median(d2)), 1e-12) / self.config.temperature
        return softmax(logits.astype(np.float64)).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.centroids_ is not None
        return {"centroids": torch.from_numpy(self.centroids_)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        c = state.get("centroids")
        if not isinstance(c, torch.Tensor) or c.ndim != 2 or not c.is_floating_point() or c.shape[1] < 1:
            raise InputError("saved k-means model has no valid 'centroids' tensor (K x D floats expected)")
        c = c.detach().cpu().numpy().astype(np.float32)
        if c.shape[0] != self.n_clusters:
            raise InputError(f"saved model has {c.shape[0]} centroids, expected {self.n_clusters}")
        if not np.isfinite(c).all():
            raise InputError("saved k-means model has non-finite centroids")
        self.centroids_ = c
