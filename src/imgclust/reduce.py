"""Manifold stage: UMAP or a kNN-graph spectral embedding of cached features, cached itself.

Between features and method (``source -> features -> [reduce] -> neighbours -> method``).
Two reducers, both computed once per (features, parameters, seed) and cached as
``<cache>/reduced-<key>.npy`` beside the feature-cache entry (key = SHA-256 of the
feature bytes' digest + parameters + seed), so every method and seed that asks again
reads them back:

* ``umap:D`` — UMAP (McInnes et al. 2018, umap-learn) to D dimensions, cosine metric,
  ``n_neighbors=30``, ``min_dist=0``: the N2D recipe (McConville et al., ICPR 2020, sec.
  3: "UMAP ... min_dist 0 ... n_neighbors set to the number of clusters x ~" — N2D uses
  a small neighbourhood on autoencoder codes; 30 is the value the issue's baseline used,
  0.571 / 0.532 ACC on CIFAR-10 test for seeds 0 / 1). Seeded, hence single-threaded
  (umap-learn's rule); the first call in a process spends ~40 s compiling (numba).
* ``spectral:D`` — Laplacian eigenmaps (Belkin & Niyogi 2003) of the symmetrised cosine
  kNN graph (faiss, :func:`imgclust.neighbors.mine_neighbors`, k=15, weights = cosine
  similarity clipped at 0) through :func:`sklearn.manifold.spectral_embedding`
  (normalised Laplacian, first trivial eigenvector dropped); rows L2-normalised as Ng,
  Jordan & Weiss (2001) so k-means on them is spectral clustering. Cheaper than UMAP
  (one sparse eigensolve, no SGD layout).

New images (not seen in fitting) get the weighted mean of the embeddings of their
``k=10`` most cosine-similar fitted images (:func:`extend`, a kNN regression; UMAP's own
``transform`` needs the pickled model, which we never load). The model keeps a fixed
subsample of anchors for that.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.errors import InputError

REDUCERS = ("none", "umap", "spectral")
REDUCE_FORMAT = 1


@dataclass(frozen=True)
class ReduceSpec:
    """Parsed ``--reduce`` value: ``none``, ``umap:D`` or ``spectral:D`` (+ fixed parameters)."""

    kind: str = "none"
    dim: int = 10
    n_neighbors: int = 30  # umap (spectral uses graph_k)
    min_dist: float = 0.0
    metric: str = "cosine"
    graph_k: int = 15
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, value: str | None | ReduceSpec) -> ReduceSpec:
        if isinstance(value, ReduceSpec):
            return value
        if value is None or str(value).strip().lower() in ("", "none", "off", "false"):
            return cls("none")
        kind, _, dim = str(value).strip().lower().partition(":")
        if kind not in REDUCERS[1:]:
            raise InputError(f"--reduce must be none, umap:D or spectral:D; got {value!r}")
        try:
            d = int(dim) if dim else 10
        except ValueError:
            raise InputError(f"--reduce {kind}:D needs an integer D; got {value!r}") from None
        if d < 1:
            raise InputError(f"--reduce dimension must be >= 1; got {d}")
        return cls(kind, d)

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.dim}"

    def key_params(self) -> dict[str, Any]:
        if self.kind == "umap":
            return {"kind": "umap", "dim": self.dim, "n_neighbors": self.n_neighbors, "min_dist": self.min_dist,
                    "metric": self.metric}
        return {"kind": self.kind, "dim": self.dim, "graph_k": self.graph_k}


def reduce_cache_key(features: np.ndarray, spec: ReduceSpec, seed: int) -> str:
    from imgclust.neighbors import features_digest

    h = hashlib.sha256()
    h.update(json.dumps({"format": REDUCE_FORMAT, **spec.key_params(), "seed": int(seed)}, sort_keys=True).encode())
    h.update(features_digest(features).encode())
    return h.hexdigest()[:24]


def _umap(x: np.ndarray, spec: ReduceSpec, seed: int) -> np.ndarray:
    import warnings

    import umap

    n_nb = int(min(spec.n_neighbors, len(x) - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by setting random_state" etc.
        r = umap.UMAP(n_components=spec.dim, n_neighbors=max(n_nb, 2), min_dist=spec.min_dist, metric=spec.metric,
                      random_state=int(seed), init="spectral" if len(x) > spec.dim + 1 else "random")
        return np.asarray(r.fit_transform(x), dtype=np.float32)


def _spectral(x: np.ndarray, spec: ReduceSpec, seed: int, progress: bool) -> np.ndarray:
    import scipy.sparse as sp
    from sklearn.manifold import spectral_embedding

    from imgclust.neighbors import l2_normalize, mine_neighbors

    n = len(x)
    if n <= spec.dim + 1:
        raise InputError(f"{n} images are too few for a {spec.dim}-d spectral embedding")
    k = int(min(spec.graph_k, n - 1))
    nb = mine_neighbors(x, mode="fixed", k=k, seed=seed, progress=progress)
    rows = np.repeat(np.arange(n), np.diff(nb.indptr))
    xn = l2_normalize(x)
    sim = np.clip(np.einsum("ij,ij->i", xn[rows], xn[nb.indices]), 0.0, None) + 1e-6
    a = sp.csr_matrix((sim, (rows, nb.indices)), shape=(n, n))
    a = a.maximum(a.T).tocsr()
    z = spectral_embedding(a, n_components=spec.dim, norm_laplacian=True, drop_first=True, random_state=int(seed),
                           # lobpcg below 5 (dim + 1) nodes is scikit-learn's dense eigh (arpack needs k < N)
                           eigen_solver="arpack" if 5 * (spec.dim + 1) < n < 20000 else "lobpcg")
    return l2_normalize(np.asarray(z, dtype=np.float32))


def reduce_features(features: np.ndarray, spec: ReduceSpec | str, *, seed: int = 0,
                    cache_dir: str | Path | None = None, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """(reduced features (N, D) float32, info) — cached as ``<cache_dir>/reduced-<key>.npy``."""
    spec = ReduceSpec.parse(spec)
    x = np.ascontiguousarray(features, dtype=np.float32)
    if spec.kind == "none":
        return x, {"reduce": "none"}
    if len(x) < 4:
        raise InputError(f"--reduce {spec} needs at least 4 images; got {len(x)}")
    if spec.dim >= x.shape[1]:
        raise InputError(f"--reduce {spec}: D must be below the feature dimension ({x.shape[1]})")
    info: dict[str, Any] = {"reduce": str(spec), **spec.key_params(), "seed": int(seed)}
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"reduced-{reduce_cache_key(x, spec, seed)}.npy"
        if path.is_file():
            try:
                z = np.load(path, allow_pickle=False)
                if z.shape == (len(x), spec.dim) and np.isfinite(z).all():
                    return z.astype(np.float32), {**info, "cache": "hit", "seconds": 0.0}
            except (OSError, ValueError):
                pass  # unreadable: recompute and overwrite
    t0 = time.perf_counter()
    from imgclust.progress import progress_bar

    with progress_bar(1, f"reduce {spec} of {len(x)} x {x.shape[1]} features", unit="step", enable=progress) as bar:
        z = _umap(x, spec, seed) if spec.kind == "umap" else _spectral(x, spec, seed, progress)
        bar.update(1)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    if not np.isfinite(z).all():
        raise InputError(f"--reduce {spec} produced non-finite coordinates (duplicate-heavy data?); try --reduce none")
    if path is not None:
        from imgclust.rundir import atomic_open

        try:
            with atomic_open(path, "wb") as f:
                np.save(f, z)
            info["cache"] = "written"
        except OSError as e:
            info["cache"] = f"not written: {e.strerror or e}"
    else:
        info["cache"] = "none"
    return z, info


def extend(anchor_x: np.ndarray, anchor_z: np.ndarray, new_x: np.ndarray, k: int = 10) -> np.ndarray:
    """Out-of-sample embedding: similarity-weighted mean of the k most cosine-similar anchors' z."""
    import faiss

    from imgclust.neighbors import l2_normalize

    a = l2_normalize(anchor_x)
    q = l2_normalize(np.asarray(new_x, dtype=np.float32))
    k = int(min(k, len(a)))
    index = faiss.IndexFlatIP(a.shape[1])
    index.add(a)
    sim, idx = index.search(q, k)
    w = np.clip(sim, 0.0, None) + 1e-6
    w /= w.sum(1, keepdims=True)
    return np.einsum("nk,nkd->nd", w, anchor_z[idx]).astype(np.float32)
