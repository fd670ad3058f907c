"""Self-training on the *confident* pseudo-labels of an ensemble, and kNN label smoothing.

ICCE stage 3 (ICCE paper, sec. 3.3) trains the classifier on every consensus label. When
the consensus combines R independent clusterings (UMAP seeds in ``umap-kmeans?runs=R``),
the images on which all R runs agree with the consensus are a cleaner training set:
SCAN's self-labelling (Van Gansbeke et al., ECCV 2020, sec. 2.3) keeps only confident
samples for the same reason, with a softmax threshold instead of agreement. Here:

1. every run is matched to the consensus by the Hungarian assignment on their
   contingency table (``scipy.optimize.linear_sum_assignment``);
2. an image is *confident* when all R matched runs give it the consensus label;
3. the linear classifier of :func:`imgclust.refine.selftrain.self_train` (its label-free
   grid, held-out pseudo-labels) is trained on the confident images only and labels all.

If fewer than ``min_share`` of the images (or of any cluster's images: at least
``min_per_cluster``) are confident, the whole consensus trains it (the plain recipe).

:func:`knn_smooth` — majority vote of each image's cosine nearest neighbours (faiss,
exact) over the current labels, repeated: a cheap graph refinement, measured in
``docs/notes/issue-18.md`` (session 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgclust.errors import InputError
from imgclust.refine.selftrain import DEFAULT_LRS, DEFAULT_WDS, LinearClassifier, self_train


def align_to(reference: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``labels`` renamed so that they best match ``reference`` (Hungarian on the contingency table)."""
    from scipy.optimize import linear_sum_assignment

    c = np.zeros((k, k), np.int64)
    np.add.at(c, (np.asarray(labels, np.int64), np.asarray(reference, np.int64)), 1)
    rows, cols = linear_sum_assignment(-c)
    m = np.arange(k)
    m[rows] = cols
    return m[np.asarray(labels, np.int64)]


def agreement_mask(run_labels: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """(N,) True where every run (matched to ``reference``) gives the reference label."""
    runs = np.atleast_2d(np.asarray(run_labels))
    if runs.shape[1] != len(reference):
        raise InputError(f"run labels {runs.shape} and reference ({len(reference)},) differ in length")
    ok = np.ones(len(reference), bool)
    for r in runs:
        ok &= align_to(reference, r, k) == reference
    return ok


@dataclass
class ConfidentResult:
    labels: np.ndarray  # (N,) the classifier's labels of every image
    classifier: LinearClassifier
    confident_share: float  # share of images the classifier trained on
    fallback: bool  # True: too few confident images, trained on all


def confident_self_train(features: np.ndarray, run_labels: np.ndarray, consensus_labels: np.ndarray, k: int, *,
                         min_share: float = 0.2, min_per_cluster: int = 10, epochs: int = 30,
                         lrs: tuple[float, ...] = DEFAULT_LRS, weight_decays: tuple[float, ...] = DEFAULT_WDS,
                         seed: int = 0, progress: bool = False) -> ConfidentResult:
    """Self-train on the images where all runs agree with the consensus (module doc)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    y = np.asarray(consensus_labels, np.int64)
    if len(x) != len(y):
        raise InputError(f"features ({len(x)}) and labels ({len(y)}) differ in length")
    ok = agreement_mask(run_labels, y, k)
    per = np.bincount(y[ok], minlength=k)
    present = np.bincount(y, minlength=k) > 0
    fallback = bool(ok.mean() < min_share or (per[present] < min_per_cluster).any())
    if fallback:
        ok = np.ones(len(y), bool)
    st = self_train(x[ok], y[ok], k, lrs=lrs, weight_decays=weight_decays, epochs=epochs, seed=seed,
                    progress=progress)
    lab = st.classifier.predict_proba(x).argmax(1).astype(np.int64)
    return ConfidentResult(lab, st.classifier, float(ok.mean()), fallback)


def knn_smooth(features: np.ndarray | None, labels: np.ndarray, k: int, *, n_neighbors: int = 20,
               iters: int = 2, graph: np.ndarray | None = None) -> np.ndarray:
    """Relabel every image by the majority label of its ``n_neighbors`` cosine neighbours, ``iters`` times.

    ``graph``: precomputed (N, >= n_neighbors + 1) neighbours (:func:`imgclust.select.knn_graph`).
    """
    if graph is None:
        from imgclust.select import knn_graph

        graph = knn_graph(features, k_nn=n_neighbors)[0]
    nb = np.asarray(graph)[:, :n_neighbors + 1]
    lab = np.asarray(labels, np.int64).copy()
    rows = np.repeat(np.arange(len(lab)), nb.shape[1])
    for _ in range(iters):
        votes = np.zeros((len(lab), k))
        np.add.at(votes, (rows, lab[nb.ravel()]), 1.0)  # the image itself votes once (column 0)
        lab = votes.argmax(1)
    return lab
