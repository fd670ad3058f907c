"""Label-free choice among candidate clusterings (heads, configurations, methods).

The criterion follows TURTLE's guiding principle (Gadetsky, Jiang & Brbić, "Let Go of
Your Labels with Unsupervised Transfer", ICML 2024, sec. 3): the labelling a human would
give is the one that *linear classifiers in the representation space(s) learn and
generalise best* (TURTLE searches for it by bilevel optimisation of a max-margin
objective; here the same principle only *scores* given candidates, which is cheap).

``generalization`` score of labels y on features X (one or several spaces):

1. Split (a seeded random subsample of at most ``max_samples``) images into ``folds`` folds.
2. For every fold, fit a ridge linear classifier (one-hot targets, standardised features,
   closed form ``(X^T X + lambda N I)^-1 X^T Y``) on the other folds, predict the fold.
3. Held-out agreement ``a`` with y, corrected for chance as Cohen's kappa:
   ``(a - p_e) / (1 - p_e)``, ``p_e = sum_k p_k q_k`` (p, q: label and prediction
   frequencies). The correction is TURTLE's entropy regulariser in spirit: a degenerate
   labelling (one giant cluster) is trivially predictable but scores 0.
4. Mean over folds, and over representation spaces when several are given (TURTLE's
   multi-space version sums the per-space losses).

A corrupted labelling (a share of labels shuffled) cannot be learned by a linear map and
scores lower; ``tests/test_select.py`` checks the clean one wins on synthetic data.

Also reported for every candidate: ``knn`` — agreement of each image's label with the
majority of its 10 cosine nearest neighbours, chance-corrected the same way (a local
version; it favours labellings built from the same kNN graph, so it is not the default),
and, when the candidates are many, ``anmi`` — the average NMI to the other candidates
(ICCE's consensus criterion; only meaningful with >= 3 candidates).

When ground-truth labels are given (benchmarks, a user with some labels), :func:`select`
adds each candidate's ACC/NMI and the Spearman rank correlation between the criterion and
ACC over the candidates, so a user can see whether the choice can be trusted.

``balanced`` — the mean of ``generalization`` and ``knn`` (see :func:`select`); ``auto``
uses it from 5,000 images on, where its candidates include UMAP partitions that the
linear probe alone ranks below k-means although they are 10 points more accurate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgclust.errors import InputError

CRITERIA = ("generalization", "knn", "anmi", "balanced")


def _kappa(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    a = float((y == pred).mean())
    p = np.bincount(y, minlength=k) / len(y)
    q = np.bincount(pred, minlength=k) / len(pred)
    pe = float((p * q).sum())
    return 0.0 if pe >= 1.0 - 1e-12 else (a - pe) / (1.0 - pe)


PROBE_MAX_DIM = 2048  # wider spaces (e.g. raw pixels) with more images than this: probe the top 2,048 PCs


def _as_spaces(features: np.ndarray | list[np.ndarray] | tuple[np.ndarray, ...]) -> list[np.ndarray]:
    spaces = list(features) if isinstance(features, (list, tuple)) else [features]
    return [np.ascontiguousarray(s, dtype=np.float32) for s in spaces]


def generalization_score(features: np.ndarray | list[np.ndarray], labels: np.ndarray, *, folds: int = 2,
                         ridge: float = 1e-3, max_samples: int = 20000, seed: int = 0) -> float:
    """Chance-corrected held-out agreement of a ridge linear probe with ``labels`` (see module doc)."""
    y_all = np.asarray(labels).astype(np.int64)
    spaces = _as_spaces(features)
    n = len(y_all)
    if any(len(s) != n for s in spaces):
        raise InputError("features and labels have different numbers of rows")
    if folds < 2 or n < 2 * folds:
        raise InputError(f"need folds >= 2 and at least {2 * folds} images; got folds={folds}, N={n}")
    _, y_all = np.unique(y_all, return_inverse=True)
    k = int(y_all.max()) + 1
    if k < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)[:max_samples]
    y = y_all[idx]
    fold_of = np.arange(len(idx)) % folds
    scores = []
    for s in spaces:
        x = s[idx].astype(np.float64)
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
        if x.shape[1] > PROBE_MAX_DIM and len(x) > PROBE_MAX_DIM:  # both large: the top principal components
            from sklearn.decomposition import PCA

            x = PCA(PROBE_MAX_DIM, svd_solver="randomized", random_state=seed).fit_transform(x)
            x /= np.maximum(x.std(0), 1e-6)
        x = np.hstack([x, np.ones((len(x), 1))])
        onehot = np.eye(k)[y]
        for f in range(folds):
            tr, te = fold_of != f, fold_of == f
            lam = ridge * tr.sum()
            if x.shape[1] <= tr.sum():  # primal: (X'X + lam I) w = X'Y, a (D+1) x (D+1) system
                a = x[tr].T @ x[tr]
                a[np.diag_indices_from(a)] += lam
                pred = x[te] @ np.linalg.solve(a, x[tr].T @ onehot[tr])
            else:  # dual, the same ridge solution: w = X'(XX' + lam I)^-1 Y, an n x n system (wide features)
                g = x[tr] @ x[tr].T
                g[np.diag_indices_from(g)] += lam
                pred = (x[te] @ x[tr].T) @ np.linalg.solve(g, onehot[tr])
            scores.append(_kappa(y[te], pred.argmax(1), k))
    return float(np.mean(scores))


def knn_graph(features: np.ndarray | list[np.ndarray], *, k_nn: int = 10) -> list[np.ndarray]:
    """Per space, the (N, k_nn + 1) cosine nearest neighbours (exact, faiss; column 0 ~ the image itself).

    Computed once and passed to :func:`knn_score` for every candidate: the search (N^2 D) is
    the criterion's whole cost and does not depend on the labels (on 50k x 1,280 features it
    is minutes on a loaded 2-core machine, per candidate before this was shared).
    """
    import faiss

    from imgclust.neighbors import l2_normalize

    out = []
    for s in _as_spaces(features):
        xn = l2_normalize(s)
        index = faiss.IndexFlatIP(xn.shape[1])
        index.add(xn)
        _, nb = index.search(xn, int(min(k_nn + 1, len(xn))))
        out.append(nb)
    return out


def knn_score(features: np.ndarray | list[np.ndarray] | None, labels: np.ndarray, *, k_nn: int = 10,
              graph: list[np.ndarray] | None = None) -> float:
    """Chance-corrected agreement of every label with the majority of its k cosine neighbours.

    ``graph``: :func:`knn_graph` of the same features (then ``features`` is not read; its first
    ``k_nn`` neighbours are used).
    """
    y = np.unique(np.asarray(labels), return_inverse=True)[1]
    k = int(y.max()) + 1
    out = []
    for nb in (graph if graph is not None else knn_graph(features, k_nn=k_nn)):
        if len(nb) != len(y):
            raise InputError("the kNN graph and the labels have different numbers of rows")
        votes = np.zeros((len(y), k))
        for j in range(1, min(nb.shape[1], k_nn + 1)):  # column 0 is (nearly always) the image itself
            np.add.at(votes, (np.arange(len(y)), y[nb[:, j]]), 1.0)
        out.append(_kappa(y, votes.argmax(1), k))
    return float(np.mean(out))


def anmi_scores(candidates: list[np.ndarray]) -> list[float]:
    """Average NMI of each candidate to all the others."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    c = len(candidates)
    m = np.eye(c)
    for i in range(c):
        for j in range(i + 1, c):
            m[i, j] = m[j, i] = nmi(candidates[i], candidates[j])
    return [float((m[i].sum() - 1.0) / max(c - 1, 1)) for i in range(c)]


@dataclass
class Selection:
    chosen: str
    criterion: str
    candidates: list[dict[str, Any]] = field(default_factory=list)  # name, scores (+ acc/nmi when y given)
    spearman_vs_acc: float | None = None  # rank correlation criterion <-> ACC over candidates (labels known)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "criterion": self.criterion, "candidates": self.candidates,
                "spearman_vs_acc": self.spearman_vs_acc}


def select(candidates: dict[str, np.ndarray], features: np.ndarray | list[np.ndarray], *,
           criterion: str = "generalization", y_true: np.ndarray | None = None, seed: int = 0) -> Selection:
    """Score every candidate labelling without labels and pick the best by ``criterion``.

    ``y_true`` (optional) never influences the choice: it only adds each candidate's ACC and
    NMI and the Spearman correlation between the criterion and ACC.
    """
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if not candidates:
        raise InputError("select needs at least one candidate")
    names = list(candidates)
    labs = [np.asarray(candidates[n]) for n in names]
    rows: list[dict[str, Any]] = []
    anmi = anmi_scores(labs) if len(labs) >= 3 else [None] * len(labs)
    graph = knn_graph(features)  # once for all candidates
    for name, lab, an in zip(names, labs, anmi):
        row: dict[str, Any] = {"name": name, "generalization": round(generalization_score(features, lab, seed=seed), 5),
                               "knn": round(knn_score(None, lab, graph=graph), 5),
                               "anmi": None if an is None else round(an, 5)}
        # balanced: the global (linear probe) and the local (kNN vote) criterion averaged. Their biases are
        # opposite — generalization favours linear partitions (k-means), knn graph-built ones (UMAP,
        # spectral) — and on CIFAR-10 test (EfficientNet-Lite0, seed 0) only their mean and knn rank
        # UMAP-64 + k-means (ACC 0.561; gen 0.794, knn 0.887) above k-means (ACC 0.457; gen 0.809, knn 0.827).
        # Not a general ranking: both also put spectral-kmeans (ACC 0.499, knn 0.894) above UMAP.
        row["balanced"] = round((row["generalization"] + row["knn"]) / 2, 5)
        rows.append(row)
    key = [r[criterion] if r[criterion] is not None else -np.inf for r in rows]
    best = int(np.argmax(key))  # ties: the earlier candidate
    rho = None
    if y_true is not None:
        from sklearn.metrics import normalized_mutual_info_score as nmi

        from imgclust.metrics import cluster_acc

        for r, lab in zip(rows, labs):
            r["acc"] = round(float(cluster_acc(np.asarray(y_true), lab)), 5)
            r["nmi"] = round(float(nmi(y_true, lab)), 5)
        if len(rows) >= 3 and all(r[criterion] is not None for r in rows):
            from scipy.stats import spearmanr

            rho = float(spearmanr([r[criterion] for r in rows], [r["acc"] for r in rows]).statistic)
    return Selection(names[best], criterion, rows, rho)


def add_label_diagnostics(selection: dict[str, Any], candidate_labels: dict[str, np.ndarray],
                          y_true: np.ndarray, criterion: str | None = None) -> dict[str, Any]:
    """Add each candidate's ACC/NMI and Spearman(criterion, ACC) to a ``Selection.to_dict()`` (labels known).

    Only for the user's information, after the choice: rows of ``y_true`` < 0 (unlabelled) are ignored.
    """
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from imgclust.metrics import cluster_acc

    y = np.asarray(y_true)
    ok = y >= 0
    crit = criterion or selection.get("criterion", "generalization")
    for row in selection.get("candidates", []):
        lab = candidate_labels.get(row["name"])
        if lab is None or len(lab) != len(y) or not ok.any():
            continue
        row["acc"] = round(float(cluster_acc(y[ok], np.asarray(lab)[ok])), 5)
        row["nmi"] = round(float(nmi(y[ok], np.asarray(lab)[ok])), 5)
    rows = [r for r in selection.get("candidates", []) if "acc" in r and r.get(crit) is not None]
    if len(rows) >= 3:
        from scipy.stats import spearmanr

        selection["spearman_vs_acc"] = float(spearmanr([r[crit] for r in rows], [r["acc"] for r in rows]).statistic)
    else:
        selection["spearman_vs_acc"] = None
        selection["spearman_note"] = "needs >= 3 candidates"
    return selection
