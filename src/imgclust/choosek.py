"""Choosing K without labels: three readable criteria scored over a range of K.

For a sample of at most ``sample`` feature rows, reduced by PCA to ``pca_dim`` dimensions and
L2-normalised (so Euclidean distance is a monotone function of cosine similarity,
:math:`\\|x-y\\|^2 = 2 - 2\\cos(x, y)`), every candidate K gets

* **silhouette** (Rousseeuw 1987): :math:`s(i) = (b_i - a_i) / \\max(a_i, b_i)` with
  :math:`a_i` the mean distance of :math:`x_i` to its own cluster and :math:`b_i` the
  smallest mean distance to another cluster, averaged over the sample, for the lowest-inertia
  k-means partition. Range [-1, 1]; higher = tighter, better separated clusters.
* **stability** (ANMI, the mean pairwise NMI of an ensemble, as ICCE scores its heads): R
  k-means runs, each fitted on a different random 80 % subsample with a different seed, assign
  the whole sample; :math:`\\mathrm{ANMI}(K) = \\frac{2}{R(R-1)}\\sum_{r<s}\\mathrm{NMI}(\\pi_r, \\pi_s)`.
  A K that matches real structure is found again and again; a wrong K splits or merges
  groups differently in every run.
* **eigengap** (von Luxburg 2007, sec. 8.3): on the symmetric kNN graph with weights
  :math:`w_{ij} = \\max(0, \\cos(x_i, x_j))`, the normalised Laplacian
  :math:`L = I - D^{-1/2} W D^{-1/2}` has eigenvalues :math:`0 = \\lambda_1 \\le \\lambda_2 \\le \\dots`;
  a graph with K well-separated groups has K near-zero eigenvalues, then a jump, so
  :math:`\\mathrm{gap}(K) = \\lambda_{K+1} - \\lambda_K`.

**The rule that picks K.** Each criterion's curve is min-max scaled to [0, 1] over the range
(a flat curve scales to 0: it carries no preference), the three are averaged, and the K with
the highest mean wins (the smaller K on a tie). Each criterion's own favourite K is reported
beside it, so a reader can see when they disagree (real image features rarely give one sharp
answer; see the curve in the report).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgclust.errors import InputError
from imgclust.progress import progress_bar

CRITERIA: tuple[str, ...] = ("silhouette", "stability", "eigengap")


def parse_k_range(spec: str | Sequence[int]) -> list[int]:
    """``"2:20"`` (inclusive), ``"2:20:2"`` (step), ``"5,10,20"`` or a list -> sorted distinct K >= 2."""
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if ":" in s:
                parts = [int(p) for p in s.split(":")]
                if len(parts) not in (2, 3):
                    raise ValueError
                lo, hi, step = parts[0], parts[1], parts[2] if len(parts) == 3 else 1
                if step < 1:
                    raise ValueError
                ks = list(range(lo, hi + 1, step))
            else:
                ks = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise InputError(f"K range must look like 2:20, 2:20:2 or 5,10,20; got {spec!r}") from None
    else:
        ks = [int(k) for k in spec]
    ks = sorted(set(ks))
    if len(ks) < 2:
        raise InputError(f"K range needs at least two candidates, got {ks}")
    if ks[0] < 2:
        raise InputError(f"every K in the range must be >= 2, got {ks[0]}")
    return ks


def prepare_features(features: np.ndarray, sample: int = 5000, pca_dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows used, PCA-reduced L2-normalised float32 features of those rows)."""
    from sklearn.decomposition import PCA

    x = np.asarray(features)
    n = len(x)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=sample, replace=False)) if n > sample else np.arange(n)
    x = np.asarray(x[rows], dtype=np.float64)
    dim = min(pca_dim, x.shape[1], len(x) - 1)
    if dim < x.shape[1]:
        x = PCA(n_components=dim, random_state=seed).fit_transform(x)
    else:
        x = x - x.mean(axis=0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return rows, np.ascontiguousarray(x, dtype=np.float32)


def laplacian_spectrum(x: np.ndarray, n_eig: int, n_neighbors: int = 10) -> np.ndarray:
    """The ``n_eig`` smallest eigenvalues of the normalised kNN-graph Laplacian, ascending.

    Neighbours from faiss (exact inner product on the L2-normalised rows); the eigenvalues
    from ARPACK (``scipy.sparse.linalg.eigsh``) as the largest of :math:`D^{-1/2} W D^{-1/2}`,
    :math:`\\lambda = 1 - \\mu`: faster and better conditioned than asking for the smallest
    of L.
    """
    import faiss
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import eigsh

    n = len(x)
    k = min(n_neighbors, n - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sim, nbr = index.search(x, k + 1)
    rows = np.repeat(np.arange(n), k)
    cols = nbr[:, 1:].reshape(-1)
    w = np.maximum(sim[:, 1:].reshape(-1), 0.0).astype(np.float64)
    keep = cols >= 0
    W = sp.csr_matrix((w[keep], (rows[keep], cols[keep])), shape=(n, n))
    W = W.maximum(W.T)  # symmetric: i~j when either is among the other's neighbours
    d = np.asarray(W.sum(axis=1)).reshape(-1)
    dinv = sp.diags(1.0 / np.sqrt(np.maximum(d, 1e-12)))
    A = (dinv @ W @ dinv).tocsr()
    # The spectrum of a graph is the union of its connected components' spectra. Lanczos
    # (ARPACK) finds one copy of a repeated eigenvalue, so a graph of several disconnected
    # groups (exactly the case the eigengap is meant to find) would lose zero eigenvalues:
    # each component is solved on its own instead.
    n_comp, comp = connected_components(W, directed=False)
    vals: list[np.ndarray] = []
    for c in range(n_comp):
        idx = np.flatnonzero(comp == c)
        sub = A[idx][:, idx]
        want = min(n_eig, len(idx))
        if len(idx) <= max(2 * want + 2, 64):  # small: dense and exact
            mu = np.linalg.eigvalsh(sub.toarray())[::-1][:want]
        else:
            v0 = np.random.default_rng(0).standard_normal(len(idx))  # ARPACK's start vector: seeded
            mu = eigsh(sub, k=want, which="LA", return_eigenvectors=False, v0=v0, tol=1e-6)
        vals.append(1.0 - np.asarray(mu))
    return np.sort(np.concatenate(vals))[:n_eig]


def _kmeans_runs(x: np.ndarray, k: int, n_runs: int, seed: int, subsample: float, n_iter: int) -> tuple[list[np.ndarray], list[float]]:
    """R k-means runs (k-means++ seeding, scikit-learn), run r fitted on its own random subsample.

    scikit-learn rather than faiss here: faiss seeds k-means with random points, and a bad
    local optimum would read as instability or a low silhouette that the data does not have.
    """
    from sklearn.cluster import KMeans

    n = len(x)
    labels, inertia = [], []
    for r in range(n_runs):
        rng = np.random.default_rng([seed, k, r])
        sub = rng.choice(n, size=max(k, round(subsample * n)), replace=False)
        km = KMeans(k, init="k-means++", n_init=1, max_iter=n_iter, random_state=int(rng.integers(2**31 - 1)))
        km.fit(x[sub])
        a = km.predict(x)
        labels.append(a.astype(np.int64))
        inertia.append(float(((x - km.cluster_centers_[a]) ** 2).sum()))
    return labels, inertia


def _scaled(v: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    if not np.isfinite(hi - lo) or hi - lo <= 1e-12:
        return np.zeros_like(v)
    return (v - lo) / (hi - lo)


def choose_k(
    features: np.ndarray,
    k_range: str | Sequence[int] = "2:20",
    *,
    sample: int = 5000,
    pca_dim: int = 64,
    n_runs: int = 5,
    subsample: float = 0.8,
    n_neighbors: int = 10,
    n_iter: int = 50,
    seed: int = 0,
    progress: bool = True,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Score every K in ``k_range`` with the three criteria and pick one (see the module doc).

    ``labels`` (optional, -1 = unknown) adds, per K, the Hungarian ACC, NMI and the
    majority-vote (over-clustering) accuracy of the best k-means partition of the sample:
    a check of the pick, never used to make it.

    Returns a JSON-able dict: ``k`` (the pick), ``rule``, ``per_criterion`` (each one's own
    best K), ``candidates`` and one row per K in ``curve``.
    """
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score

    ks = parse_k_range(k_range)
    t0 = time.perf_counter()
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise InputError(f"features must be a 2-D array, got shape {feats.shape}")
    if not (0.1 <= subsample <= 1.0):
        raise InputError(f"subsample must be in [0.1, 1], got {subsample}")
    if n_runs < 2:
        raise InputError(f"stability needs at least 2 k-means runs, got {n_runs}")
    rows, x = prepare_features(feats, sample=sample, pca_dim=pca_dim, seed=seed)
    n = len(x)
    if ks[-1] >= n:
        raise InputError(f"the largest K ({ks[-1]}) must be below the number of images scored ({n})")
    lam = laplacian_spectrum(x, ks[-1] + 1, n_neighbors=n_neighbors)
    y = None if labels is None else np.asarray(labels)[rows]
    sil, stab, gap, ext = [], [], [], []
    bar = progress_bar(len(ks), "choose K", unit="K", enable=progress)
    for k in ks:
        runs, inertia = _kmeans_runs(x, k, n_runs, seed, subsample, n_iter)
        best = runs[int(np.argmin(inertia))]
        s = float(silhouette_score(x, best)) if len(np.unique(best)) > 1 else -1.0
        pairs = [normalized_mutual_info_score(runs[i], runs[j]) for i in range(n_runs) for j in range(i + 1, n_runs)]
        sil.append(s)
        stab.append(float(np.mean(pairs)))
        gap.append(float(lam[k] - lam[k - 1]) if k < len(lam) else float("nan"))
        if y is not None and (y >= 0).any():
            from imgclust.metrics import evaluate

            m = evaluate(y, best)
            ext.append({"acc": m["acc"], "nmi": m["nmi"], "majority_acc": m["majority_acc"]})
        bar.update(1)
    bar.close()
    curves = {"silhouette": np.array(sil), "stability": np.array(stab), "eigengap": np.nan_to_num(np.array(gap), nan=0.0)}
    combined = np.mean([_scaled(curves[c]) for c in CRITERIA], axis=0)
    pick = ks[int(np.argmax(combined))]  # argmax takes the first (smallest K) on a tie
    curve = []
    for i, k in enumerate(ks):
        row: dict[str, Any] = {"k": k, "silhouette": sil[i], "stability": stab[i], "eigengap": gap[i],
                               "score": float(combined[i])}
        if ext:
            row.update(ext[i])
        curve.append(row)
    return {
        "k": int(pick),
        "rule": "argmax over K of the mean of the min-max scaled silhouette, stability (ANMI) and eigengap curves",
        "per_criterion": {c: int(ks[int(np.argmax(curves[c]))]) for c in CRITERIA},
        "candidates": ks,
        "curve": curve,
        "laplacian_eigenvalues": [float(v) for v in lam],
        "settings": {"n_scored": int(n), "n_total": len(feats), "pca_dim": int(x.shape[1]), "n_runs": n_runs,
                     "subsample": subsample, "n_neighbors": n_neighbors, "seed": seed},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def format_curve(result: dict[str, Any]) -> str:
    """The curve as a markdown table, the pick marked with ``*``."""
    has_ext = "majority_acc" in result["curve"][0]
    head = "| K | silhouette | stability (ANMI) | eigengap | score |" + (" ACC | NMI | majority ACC |" if has_ext else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["curve"]:
        mark = "*" if r["k"] == result["k"] else ""
        line = (f"| {r['k']}{mark} | {r['silhouette']:.4f} | {r['stability']:.4f} | {r['eigengap']:.4f} | "
                f"{r['score']:.3f} |")
        if has_ext:
            line += f" {r['acc']:.4f} | {r['nmi']:.4f} | {r['majority_acc']:.4f} |"
        lines.append(line)
    pc = result["per_criterion"]
    lines.append("")
    lines.append(f"picked K = {result['k']} (silhouette alone: {pc['silhouette']}, stability alone: "
                 f"{pc['stability']}, eigengap alone: {pc['eigengap']})")
    return "\n".join(lines)
