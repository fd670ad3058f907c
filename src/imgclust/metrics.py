"""Clustering metrics: Hungarian accuracy, NMI, ARI and majority-vote (over-clustering) accuracy.

Labels equal to -1 are "unknown" and are ignored, so a partly labelled set can be scored on
its labelled part. The cluster count may differ from the class count.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from imgclust.errors import InputError


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise InputError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    keep = y_true >= 0
    if not keep.any():
        raise InputError("no known labels (all are -1) to evaluate against")
    return y_true[keep].astype(np.int64), y_pred[keep].astype(np.int64)


def hungarian_mapping(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """The one-to-one cluster -> class map maximising agreement (scipy's linear_sum_assignment).

    With more clusters than classes, the unmatched clusters are absent from the map (their
    samples count as errors in :func:`cluster_acc`).
    """
    y_true, y_pred = _check(y_true, y_pred)
    classes, t = np.unique(y_true, return_inverse=True)
    clusters, p = np.unique(y_pred, return_inverse=True)
    c = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(c, (p, t), 1)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return {int(clusters[r]): int(classes[k]) for r, k in zip(rows, cols)}


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unsupervised clustering accuracy: best one-to-one matching of clusters to classes."""
    y_true, y_pred = _check(y_true, y_pred)
    m = hungarian_mapping(y_true, y_pred)
    mapped = np.array([m.get(int(c), -1) for c in y_pred])
    return float((mapped == y_true).mean())


def majority_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Over-clustering accuracy: each cluster takes the majority class of its members."""
    y_true, y_pred = _check(y_true, y_pred)
    c = contingency_matrix(y_pred, y_true)  # clusters x classes
    return float(c.max(axis=1).sum() / len(y_true))


def nmi(y_true: np.ndarray, y_pred: np.ndarray, average: str = "arithmetic") -> float:
    """Normalised mutual information; ``average="geometric"`` matches SPICE's reporting."""
    if average not in ("arithmetic", "geometric", "min", "max"):
        raise InputError(f"NMI average must be arithmetic, geometric, min or max, got {average!r}")
    y_true, y_pred = _check(y_true, y_pred)
    return float(normalized_mutual_info_score(y_true, y_pred, average_method=average))


def ari(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = _check(y_true, y_pred)
    return float(adjusted_rand_score(y_true, y_pred))


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, nmi_average: str = "arithmetic") -> dict[str, float | int]:
    """All metrics at once, on the samples whose label is known (>= 0)."""
    yt, yp = _check(y_true, y_pred)
    return {
        "acc": cluster_acc(yt, yp),
        "nmi": nmi(yt, yp, nmi_average),
        "ari": ari(yt, yp),
        "majority_acc": majority_acc(yt, yp),
        "n_evaluated": int(len(yt)),
        "n_classes": int(len(np.unique(yt))),
        "n_clusters": int(len(np.unique(yp))),
    }
