"""Label-free selection: the clean clustering beats corrupted and degenerate ones, without labels."""

import numpy as np
import pytest

from imgclust.errors import InputError
from imgclust.select import generalization_score, knn_score, select


@pytest.fixture(scope="module")
def blobs():
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=1500, centers=6, n_features=20, cluster_std=2.5, random_state=0)
    return x.astype(np.float32), y


def corrupt(y, share, k, seed):
    rng = np.random.default_rng(seed)
    out = y.copy()
    flip = rng.random(len(y)) < share
    out[flip] = rng.integers(0, k, flip.sum())
    return out


@pytest.mark.parametrize("criterion", ["generalization", "knn", "anmi", "balanced"])
def test_selector_picks_the_clean_clustering(blobs, criterion):
    x, y = blobs
    degenerate = np.where(np.arange(len(y)) < 10, np.arange(len(y)) % 6, 0)  # almost one cluster
    cands = {"corrupted-40%": corrupt(y, 0.4, 6, 1), "clean": np.roll(np.eye(6, dtype=int), 1, 0)[y].argmax(1),
             "corrupted-20%": corrupt(y, 0.2, 6, 2), "degenerate": degenerate}
    sel = select(cands, x, criterion=criterion)
    assert sel.chosen == "clean"  # label permutation does not matter
    scores = {r["name"]: r[criterion] for r in sel.candidates}
    if criterion != "anmi":
        assert scores["clean"] > scores["corrupted-20%"] > scores["corrupted-40%"] > scores["degenerate"]
        assert abs(scores["degenerate"]) < 0.05  # chance-corrected: predictable but uninformative
    assert sel.spearman_vs_acc is None  # no labels given


def test_labels_only_add_diagnostics_never_change_the_choice(blobs):
    x, y = blobs
    cands = {"a": corrupt(y, 0.3, 6, 3), "b": y, "c": corrupt(y, 0.6, 6, 4)}
    blind = select(cands, x)
    seen = select(cands, x, y_true=corrupt(y, 0.9, 6, 5))  # even misleading labels do not change it
    assert blind.chosen == seen.chosen == "b"
    assert "acc" in seen.candidates[0] and seen.spearman_vs_acc is not None
    with_truth = select(cands, x, y_true=y)
    assert with_truth.spearman_vs_acc == pytest.approx(1.0)


def test_scores_are_deterministic_and_multi_space(blobs):
    x, y = blobs
    a = generalization_score(x, y, seed=0)
    assert a == generalization_score(x, y, seed=0) and a > 0.9
    # a second, useless representation space lowers the (mean) score but keeps the order
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    both = generalization_score([x, noise], y)
    assert 0.3 < both < a
    assert knn_score([x, x], y) == pytest.approx(knn_score(x, y))
    with pytest.raises(InputError):
        select({"a": y}, x, criterion="oracle")
    with pytest.raises(InputError):
        generalization_score(x[:10], y)


def test_generalization_score_on_wide_features_is_the_same_ridge_probe():
    """More dimensions than training rows (raw pixels): the dual form gives the primal ridge's predictions."""
    from imgclust.select import _kappa, generalization_score

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 150)) + np.eye(3)[y] @ rng.normal(size=(3, 150))
    got = generalization_score(x, y, folds=2, seed=0)
    idx = np.random.default_rng(0).permutation(60)
    xs = x[idx]
    xs = (xs - xs.mean(0)) / np.maximum(xs.std(0), 1e-6)
    xs = np.hstack([xs, np.ones((60, 1))])
    ys, fold = y[idx], np.arange(60) % 2
    want = []
    for f in range(2):
        tr, te = fold != f, fold == f
        a = xs[tr].T @ xs[tr] + 1e-3 * tr.sum() * np.eye(xs.shape[1])
        w = np.linalg.solve(a, xs[tr].T @ np.eye(3)[ys[tr]])
        want.append(_kappa(ys[te], (xs[te] @ w).argmax(1), 3))
    assert got == pytest.approx(float(np.mean(want)))
    assert got > 0.5  # separable classes: the probe generalises


def test_knn_graph_is_shared_and_scores_as_the_direct_search(blobs):
    from imgclust.select import knn_graph

    x, y = blobs
    g = knn_graph(x, k_nn=20)  # a wider graph serves k_nn=10 (its first 10 neighbours)
    assert g[0].shape == (len(x), 21)
    for lab in (y, corrupt(y, 0.3, 6, 2)):
        assert knn_score(None, lab, graph=g) == pytest.approx(knn_score(x, lab))
    with pytest.raises(InputError):
        knn_score(None, y[:100], graph=g)
