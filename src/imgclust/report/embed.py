"""2-D maps of the features for the report: UMAP (umap-learn), t-SNE (scikit-learn) or PCA.

The features are first reduced by PCA to at most 50 dimensions and L2-normalised (cosine
geometry, as the clustering sees it; both UMAP and t-SNE are also much faster in 50-d).
``method="auto"`` takes PCA for maps of fewer than :data:`AUTO_NONLINEAR_MIN` points, else
UMAP when umap-learn is installed, else scikit-learn's Barnes-Hut t-SNE for up to 5,000
points, else PCA. Why PCA for small maps: the first UMAP call in a process compiles numba
code (25-40 s on a slow CPU) and scikit-learn's t-SNE takes 5 s even for 100 points, so a
run of a few hundred images (seconds) would spend most of its time drawing its map; ask
for ``umap``/``tsne`` explicitly (``imgclust report RUN --map umap``) to get one anyway.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from imgclust.errors import InputError

MAP_METHODS: tuple[str, ...] = ("auto", "umap", "tsne", "pca")
AUTO_NONLINEAR_MIN = 2000  # "auto" draws smaller maps with PCA (see the module doc)


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def resolve_method(method: str, n: int) -> str:
    if method not in MAP_METHODS:
        raise InputError(f"unknown map method {method!r}; use one of: {', '.join(MAP_METHODS)}")
    if method == "auto":
        if n < AUTO_NONLINEAR_MIN:
            return "pca"
        if umap_available():
            return "umap"
        return "tsne" if n <= 5000 else "pca"
    if method == "umap" and not umap_available():
        raise InputError("the UMAP map needs umap-learn: pip install umap-learn (or --map tsne / --map pca)")
    return method


def embed_2d(features: np.ndarray, method: str = "auto", seed: int = 0, progress: bool = False) -> tuple[np.ndarray, str]:
    """(n, 2) coordinates scaled to [0, 1] and the method actually used; ``progress``: UMAP's epoch bar."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    if n < 3:
        return np.full((n, 2), 0.5, dtype=np.float32), "none"
    used = resolve_method(method, n)
    dim = min(50, x.shape[1], n - 1)
    x = PCA(n_components=dim, random_state=seed).fit_transform(x - x.mean(axis=0)).astype(np.float32)
    if used == "pca":
        y = x[:, :2] if x.shape[1] >= 2 else np.c_[x, np.zeros(n)]
    else:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if used == "umap":
            import sys
            import warnings

            import umap

            from imgclust.progress import progress_enabled

            bar = {"disable": not progress_enabled(progress), "file": sys.stderr, "desc": "report map: UMAP epochs"}
            with warnings.catch_warnings():  # "n_jobs overridden by random_state": determinism wins
                warnings.simplefilter("ignore")
                y = umap.UMAP(n_neighbors=min(15, n - 1), min_dist=0.1, metric="euclidean", random_state=seed,
                              n_jobs=1, tqdm_kwds=bar).fit_transform(x)
        else:
            from sklearn.manifold import TSNE

            y = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca", random_state=seed,
                     metric="euclidean").fit_transform(x)
    y = np.asarray(y, dtype=np.float64)
    lo, hi = y.min(axis=0), y.max(axis=0)
    y = (y - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
    return y.astype(np.float32), used
