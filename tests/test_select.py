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


@pytest.mark.parametrize("criterion", ["generalization", "knn", "anmi"])
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
