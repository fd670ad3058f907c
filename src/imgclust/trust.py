"""A label-free trust score for a clustering, per run and per cluster.

**kNN agreement** (the neighbourhood-consistency idea behind SCAN's and TEMI's training
signal, turned into a check): on the PCA-64, L2-normalised features of a sample of at most
``sample`` images, with :math:`\\mathcal N_{10}(i)` the 10 nearest neighbours of image i,

.. math:: a_i = \\frac{1}{10} \\sum_{j \\in \\mathcal N_{10}(i)} [c_j = c_i]

is the share of its neighbours that share its cluster. A random partition with the same
cluster sizes :math:`p_c = n_c / N` would give :math:`a_i \\approx p_{c_i}`, so the score is
chance-corrected like Cohen's kappa:

.. math:: \\mathrm{trust} = \\frac{\\bar a - \\sum_c p_c^2}{1 - \\sum_c p_c^2}, \\qquad
          \\mathrm{trust}_c = \\frac{\\bar a_c - p_c}{1 - p_c}

(:math:`\\bar a_c` the mean over the members of c). 1: every image's neighbours are in its own
cluster; 0: no better than chance. It judges the clusters against the feature geometry, so a
backbone that confuses two classes is not caught (see the rank correlation with ACC in
``docs/notes/issue-23.md`` for what a value means in practice).

**Head agreement** (when the method has several heads, as TEMI / ICCE): the ANMI of the
final labels to the heads' labellings (ICCE eq. 4), reported beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgclust.errors import InputError


def knn_agreement(x: np.ndarray, labels: np.ndarray, n_neighbors: int = 10) -> np.ndarray:
    """(n,) share of each row's ``n_neighbors`` nearest neighbours (L2-normalised ``x``) with the same label."""
    from imgclust.hierarchy import knn_edges

    lab = np.asarray(labels)
    rows, cols = knn_edges(x, n_neighbors)
    same = np.bincount(rows, weights=(lab[rows] == lab[cols]).astype(np.float64), minlength=len(lab))
    cnt = np.bincount(rows, minlength=len(lab))
    return same / np.maximum(cnt, 1)


def trust_score(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    head_labels: np.ndarray | None = None,
    sample: int = 10000,
    pca_dim: int = 64,
    n_neighbors: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Run-level and per-cluster trust of ``labels`` (N,) for ``features`` (N, D); JSON-able."""
    from imgclust.choosek import prepare_features

    lab = np.asarray(labels).astype(np.int64)
    feats = np.asarray(features)
    if feats.ndim != 2 or len(feats) != len(lab):
        raise InputError(f"trust needs (N, D) features and N labels; got {feats.shape} and {lab.shape}")
    if len(lab) < n_neighbors + 2:
        raise InputError(f"trust needs more than {n_neighbors + 1} images, got {len(lab)}")
    k = int(lab.max()) + 1
    rows, x = prepare_features(feats, sample=sample, pca_dim=pca_dim, seed=seed)
    a = knn_agreement(x, lab[rows], n_neighbors)
    ls = lab[rows]
    p = np.bincount(ls, minlength=k) / len(ls)
    chance = float((p**2).sum())
    run = float((a.mean() - chance) / (1 - chance)) if chance < 1 else 0.0
    per_cluster = []
    for c in range(k):
        m = ls == c
        if not m.any():
            per_cluster.append(None)
            continue
        ac = float(a[m].mean())
        per_cluster.append(round((ac - p[c]) / (1 - p[c]) if p[c] < 1 else 0.0, 4))
    out: dict[str, Any] = {
        "score": round(run, 4),
        "knn_agreement": round(float(a.mean()), 4),
        "chance": round(chance, 4),
        "per_cluster": per_cluster,
        "n_scored": int(len(rows)),
        "n_neighbors": n_neighbors,
        "definition": "chance-corrected share of each image's 10 nearest neighbours (PCA-64 cosine) in its cluster",
    }
    if head_labels is not None:
        from imgclust.consensus import Ensemble, anmi

        h = np.asarray(head_labels)
        if h.ndim == 2 and h.shape[1] == len(lab):
            out["head_agreement"] = round(anmi(Ensemble.from_labels(h), lab), 4)
    return out


def describe(score: float) -> str:
    """A word for a trust value (bands from the benchmark in docs/notes/issue-23.md)."""
    if score >= 0.8:
        return "high"
    if score >= 0.6:
        return "medium"
    return "low"
