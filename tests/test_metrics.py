import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from imgclust.errors import InputError
from imgclust.metrics import (
    ari,
    cluster_acc,
    evaluate,
    hungarian_mapping,
    majority_acc,
    nmi,
)


def test_perfect_clustering_with_renamed_clusters():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([2, 2, 0, 0, 1, 1])
    assert cluster_acc(y, p) == 1.0
    assert nmi(y, p) == pytest.approx(1.0)
    assert ari(y, p) == pytest.approx(1.0)
    assert hungarian_mapping(y, p) == {2: 0, 0: 1, 1: 2}


def test_hand_computed_accuracy():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1])
    # cluster 0 = {0,0,1} -> class 0 (2 right); cluster 1 = {1,2,2} -> class 2 (2 right)
    assert cluster_acc(y, p) == pytest.approx(4 / 6)
    assert majority_acc(y, p) == pytest.approx(4 / 6)


def test_more_clusters_than_classes():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 2, 3])
    assert cluster_acc(y, p) == pytest.approx(0.5)  # one-to-one: two clusters stay unmatched
    assert majority_acc(y, p) == 1.0  # over-clustering: every cluster is pure


def test_fewer_clusters_than_classes():
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.array([0, 0, 0, 0, 0, 0])
    assert cluster_acc(y, p) == pytest.approx(2 / 6)


def test_acc_equals_brute_force_over_permutations():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 4, 60)
        p = rng.integers(0, 4, 60)
        best = max(np.mean(np.array(perm)[p] == y) for perm in itertools.permutations(range(4)))
        assert cluster_acc(y, p) == pytest.approx(best)


def test_nmi_and_ari_match_scikit_learn_and_geometric_differs():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    assert nmi(y, p) == pytest.approx(normalized_mutual_info_score(y, p))
    assert nmi(y, p, "geometric") == pytest.approx(normalized_mutual_info_score(y, p, average_method="geometric"))
    assert nmi(y, p, "geometric") != pytest.approx(nmi(y, p))
    assert ari(y, p) == pytest.approx(adjusted_rand_score(y, p))


def test_unknown_labels_are_ignored():
    y = np.array([0, 0, 1, 1, -1, -1])
    p = np.array([1, 1, 0, 0, 0, 1])
    r = evaluate(y, p)
    assert r["acc"] == 1.0 and r["n_evaluated"] == 4


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(InputError, match="labels but"):
        cluster_acc([0, 1], [0, 1, 1])
    with pytest.raises(InputError, match="no known labels"):
        cluster_acc([-1, -1], [0, 1])
    with pytest.raises(InputError, match="NMI average"):
        nmi([0, 1], [0, 1], "harmonic")
