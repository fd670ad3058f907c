"""Near-duplicates and outliers from the cached features: a pipeline stage after the features.

Both come from one k-nearest-neighbour search (faiss, inner product over centred and
L2-normalised features, i.e. cosine similarity around the mean feature), as fastdup and cleanlab do it (cleanlab's
``near_duplicate`` and ``outlier`` issue types are kNN distances on embeddings too):

* **Near-duplicates**: a pair of images is a near-duplicate when the cosine similarity of their
  features is at least ``dup_threshold`` (0.98) **or**, when thumbnails are given (``cluster``
  always gives them), the cosine similarity of their 16x16 grey, mean-removed thumbnails is at
  least ``thumb_threshold`` (0.985). Candidates are each image's ``k`` nearest neighbours in
  each space; groups are formed by greedy complete linkage (every two images of a group are
  near-duplicates), since connected components chained thousands of plain garments on
  Fashion-MNIST's raw pixels into one group. Why two spaces, measured on CIFAR-10 test with
  1 % injected copies (``benchmarks/duplicates.py``, EfficientNet-Lite0): the features of a
  32-px image re-encoded as JPEG q40 or resized to 20 px and back have cosine 0.54-0.76 with the
  original's (median), below the nearest natural neighbour of 1 % of the images (0.87), so the
  features alone found only the exact copies (recall 0.25, precision 1.0 at 0.98); the
  thumbnails keep such copies at >= 0.978 and natural pairs mostly below (99.9th percentile of
  the nearest-neighbour similarity 0.982): recall 0.74, precision >= 0.937 with both (a lower
  bound: CIFAR-10 test has near-duplicates of its own). Crops of 3 px per side of a 32-px image
  are missed by both.
* **Outliers**: the score of an image is its mean cosine distance to its ``k`` nearest
  neighbours (the kNN distance of cleanlab's ``OutOfDistribution``); images beyond Tukey's
  far-out fence, Q3 + 3 IQR of the scores, are outliers, at most ``max_outlier_fraction`` of
  the images (the highest scores). No labels and no clustering enter either score.

Features wider than :data:`PCA_DIM` are first projected on their 128 principal components
(fitted on at most 20,000 rows): on a loaded 2-core machine the stage took 235 s on
Fashion-MNIST's 60,000 x 784 raw pixels, as long as the k-means it follows; the thresholds
were measured on the projected features. The search is exact (``IndexFlatIP``) up to
:data:`EXACT_MAX_ROWS` images and an IVF index above (as :mod:`imgclust.neighbors` does).
Written into a run directory as ``duplicates.csv`` and ``outliers.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.errors import InputError
from imgclust.neighbors import l2_normalize as l2n
from imgclust.rundir import write_csv

DUP_THRESHOLD = 0.98  # cosine similarity of the centred PCA-128 features; measured (benchmarks/duplicates.py)
OUTLIER_FENCE = 3.0  # Tukey's far-out fence: Q3 + 3 IQR
MAX_OUTLIER_FRACTION = 0.01
KNN = 10
THUMB_SIZE = 16  # grey thumbnails for the pixel-space duplicate search
THUMB_THRESHOLD = 0.985  # cosine of the mean-removed thumbnails; measured (benchmarks/duplicates.py)
KNN_THUMB = 6
PCA_DIM = 128  # features are projected to this many principal components first (speed; see the module doc)
EXACT_MAX_ROWS = 20_000


@dataclass
class Quality:
    """Duplicate groups (lists of row indices, most similar first) and outliers (row indices, worst first)."""

    groups: list[list[int]]
    group_sim: list[float]  # per group: the lowest edge similarity that joined it
    outliers: np.ndarray
    scores: np.ndarray  # (N,) outlier score of every row
    info: dict[str, Any]
    ranked: np.ndarray | None = None  # the max_outlier_fraction most isolated rows, worst first (outliers.csv)


def knn_index(xn: np.ndarray, seed: int = 0) -> Any:
    """A faiss inner-product index over L2-normalised rows: exact up to EXACT_MAX_ROWS, IVF above."""
    import faiss

    n, d = xn.shape
    if n <= EXACT_MAX_ROWS:
        index = faiss.IndexFlatIP(d)
        index.add(xn)
        return index
    nlist = int(2 * math.sqrt(n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.cp.seed = int(seed) + 1
    index.cp.niter = 10
    index.cp.min_points_per_centroid = 1
    index.train(xn[np.sort(rng.choice(n, size=min(n, 32 * nlist), replace=False))])
    index.add(xn)
    index.nprobe = 8
    return index


def find_quality(features: np.ndarray, *, k: int = KNN, dup_threshold: float = DUP_THRESHOLD,
                 outlier_fence: float = OUTLIER_FENCE, max_outlier_fraction: float = MAX_OUTLIER_FRACTION,
                 pca_dim: int | None = PCA_DIM, thumbs: np.ndarray | None = None,
                 thumb_threshold: float = THUMB_THRESHOLD, seed: int = 0, chunk: int = 4096) -> Quality:
    """Near-duplicate groups and outliers of ``features`` (N, D); see the module doc.

    ``thumbs`` (N, T): optional pixel thumbnails (:func:`thumb_vectors`); pairs whose
    thumbnails have cosine >= ``thumb_threshold`` are near-duplicates too."""
    x = np.asarray(features)
    if x.ndim != 2 or len(x) < 2:
        raise InputError(f"duplicates/outliers need at least 2 feature rows, got shape {x.shape}")
    if not -1.0 <= dup_threshold <= 1.0:
        raise InputError(f"the duplicate threshold is a cosine similarity in [-1, 1], got {dup_threshold}")
    if k < 1 or not 0.0 <= max_outlier_fraction <= 1.0:
        raise InputError("k must be >= 1 and the outlier fraction in [0, 1]")
    xc = np.asarray(x, dtype=np.float32) - x.mean(axis=0, dtype=np.float64).astype(np.float32)  # centred: module doc
    if not np.isfinite(xc).all():
        raise InputError("features contain NaN or infinite values")
    if pca_dim and xc.shape[1] > pca_dim and len(xc) > pca_dim:
        from sklearn.decomposition import PCA

        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(len(xc), size=min(len(xc), 20_000), replace=False))
        p = PCA(n_components=pca_dim, svd_solver="randomized", random_state=seed).fit(xc[fit_rows])
        xc = (xc @ p.components_.T.astype(np.float32)).astype(np.float32)  # already centred: no mean to subtract
    xn = l2n(xc)
    n = len(xn)
    kk = min(k, n - 1)
    index = knn_index(xn, seed)
    sims = np.zeros((n, kk), np.float32)
    nbrs = np.zeros((n, kk), np.int64)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(s + chunk, n))
        d, i = index.search(xn[rows], kk + 1)
        is_self = i == rows[:, None]
        is_self[~is_self.any(1), -1] = True  # self missing (ties, IVF): drop the last candidate instead
        first = np.argmax(is_self, 1)
        keep = np.ones_like(is_self)
        keep[np.arange(len(rows)), first] = False
        sims[rows] = d[keep].reshape(len(rows), kk)
        nbrs[rows] = i[keep].reshape(len(rows), kk)
    found = nbrs >= 0
    sims = np.where(found, sims, -1.0)
    # Outliers: mean cosine distance to the k nearest neighbours.
    scores = 1.0 - np.where(found, sims, 0.0).sum(1) / np.maximum(found.sum(1), 1)
    q1, q3 = np.percentile(scores, [25, 75])
    fence = float(q3 + outlier_fence * (q3 - q1))
    cand = np.flatnonzero(scores > fence)
    cap = int(max_outlier_fraction * n)
    order = cand[np.argsort(-scores[cand], kind="stable")][:cap]
    ranked = np.argsort(-scores, kind="stable")[:max(cap, len(order))]  # the most isolated, flagged or not
    # Duplicates: complete-linkage groups over the pairs above the threshold (see the module doc).
    r, c = np.nonzero(found & (sims >= dup_threshold))
    a, b = r, nbrs[r, c]
    spaces = [(xn, dup_threshold)]
    if thumbs is not None:
        tn = l2n(np.asarray(thumbs, dtype=np.float32))
        if tn.shape[0] != n:
            raise InputError(f"thumbnails have {tn.shape[0]} rows, features {n}")
        tindex = knn_index(tn, seed)
        ta, tb = [], []
        for s_ in range(0, n, chunk):
            rows = np.arange(s_, min(s_ + chunk, n))
            d_, i_ = tindex.search(tn[rows], min(KNN_THUMB, n))
            ok = (d_ >= thumb_threshold) & (i_ >= 0) & (i_ != rows[:, None])
            rr, cc = np.nonzero(ok)
            ta.append(rows[rr])
            tb.append(i_[rr, cc])
        a, b = np.concatenate([a, *ta]), np.concatenate([b, *tb])
        spaces.append((tn, thumb_threshold))
    groups, group_sim = _complete_groups(spaces, a, b)
    info = {"k": kk, "pca_dim": xn.shape[1], "dup_threshold": dup_threshold,
            "thumb_threshold": None if thumbs is None else thumb_threshold, "outlier_fence": fence, "outlier_fence_iqr": outlier_fence,
            "max_outlier_fraction": max_outlier_fraction, "n": n, "n_groups": len(groups),
            "n_in_groups": int(sum(len(g_) for g_ in groups)), "n_outliers": len(order)}
    return Quality(groups, group_sim, order, scores.astype(np.float32), info, ranked)


def _complete_groups(spaces: list[tuple[np.ndarray, float]], a: np.ndarray, b: np.ndarray,
                     max_pairs: int = 250_000) -> tuple[list[list[int]], list[float]]:
    """Greedy complete linkage: candidate pairs in order of decreasing similarity join two groups
    only when every pair across them is a near-duplicate (in some space of ``spaces``: rows
    L2-normalised, similarity >= that space's threshold), so groups never chain (A~B, B~C but
    A !~ C stays apart). Hand-written: scipy's complete linkage needs the dense N x N distances;
    only the few candidate pairs matter here. Returns groups (largest first) and each group's
    lowest pairwise similarity in the first space."""
    if len(a) == 0:
        return [], []
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    pairs = np.unique(np.stack([lo[keep], hi[keep]], 1), axis=0)
    if len(pairs) == 0:
        return [], []
    margin = np.max([np.einsum("ij,ij->i", v[pairs[:, 0]], v[pairs[:, 1]]) - t for v, t in spaces], axis=0)
    order = np.argsort(-margin, kind="stable")
    owner: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    low: dict[int, float] = {}
    x0 = spaces[0][0]
    for e in order:
        if margin[e] < 0:
            break
        i, j = int(pairs[e, 0]), int(pairs[e, 1])
        gi, gj = owner.get(i, i), owner.get(j, j)
        if gi == gj:
            continue
        mi, mj = members.get(gi, [i]), members.get(gj, [j])
        if len(mi) * len(mj) > max_pairs:
            continue
        ok = np.zeros((len(mi), len(mj)), bool)
        for v, t in spaces:
            ok |= (v[mi] @ v[mj].T) >= t
        if not ok.all():
            continue
        cross = float((x0[mi] @ x0[mj].T).min())
        if len(mi) < len(mj):
            gi, gj, mi, mj = gj, gi, mj, mi
        members[gi] = mi + mj
        members.pop(gj, None)
        for m in mj:
            owner[m] = gi
        owner[mi[0]] = gi
        low[gi] = min(low.get(gi, 1.0), low.get(gj, 1.0), cross)
    out = sorted(((sorted(m), low[g]) for g, m in members.items() if len(m) >= 2), key=lambda t: (-len(t[0]), t[0][0]))
    return [g for g, _ in out], [round(float(s_), 4) for _, s_ in out]


def thumb_vectors(source: Any, indices: np.ndarray, size: int = THUMB_SIZE, workers: int = 4) -> np.ndarray:
    """(len(indices), size*size) grey thumbnails of source images, each minus its own mean (brightness
    invariant), for near-duplicate search in pixel space. Unreadable images get zeros (no pair)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from imgclust.data.decode import jpeg_draft
    from imgclust.errors import BadImageError

    def one(i: int) -> np.ndarray:
        try:
            with jpeg_draft(2 * size):  # a large JPEG decodes at 1/2-1/8 scale: a 16-px thumbnail needs no more
                im = Image.fromarray(np.ascontiguousarray(source.read(int(i)))).convert("L")
        except (BadImageError, OSError, ValueError):
            return np.zeros(size * size, np.float32)
        v = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
        return v - v.mean()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        out = list(ex.map(one, [int(i) for i in indices]))
    return np.stack(out) if out else np.zeros((0, size * size), np.float32)


def write_quality(run_dir: str | Path, q: Quality, ids: list[str], paths: list[str], clusters: np.ndarray) -> None:
    """``duplicates.csv`` (group, id, path, cluster, group_min_similarity) and ``outliers.csv``
    (rank, id, path, cluster, score, outlier: 1 beyond the fence, 0 only among the most isolated); row indices of ``q`` index ``ids``/``paths``/``clusters``."""
    d = Path(run_dir)
    write_csv(d / "duplicates.csv", ["group", "id", "path", "cluster", "group_min_similarity"],
              [(g, ids[i], paths[i], int(clusters[i]), f"{s:.4f}")
               for g, (rows, s) in enumerate(zip(q.groups, q.group_sim)) for i in rows])
    flagged = set(q.outliers.tolist())
    rows = q.outliers if q.ranked is None else q.ranked
    write_csv(d / "outliers.csv", ["rank", "id", "path", "cluster", "score", "outlier"],
              [(r, ids[i], paths[i], int(clusters[i]), f"{q.scores[i]:.4f}", int(i in flagged)) for r, i in enumerate(rows)])


def read_quality(run_dir: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]]] | None:
    """The rows of ``duplicates.csv`` and ``outliers.csv`` of a run, or None when they are not there."""
    import csv

    d = Path(run_dir)
    if not (d / "duplicates.csv").is_file() or not (d / "outliers.csv").is_file():
        return None
    out = []
    for name in ("duplicates.csv", "outliers.csv"):
        with open(d / name, encoding="utf-8", newline="") as f:
            out.append(list(csv.DictReader(f)))
    return out[0], out[1]
