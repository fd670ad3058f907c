"""Confident self-training (runs agreeing with the consensus) and kNN smoothing, on synthetic blobs."""

from __future__ import annotations

import numpy as np
import pytest

from imgclust.errors import InputError
from imgclust.metrics import cluster_acc
from imgclust.refine.confident import agreement_mask, align_to, confident_self_train, knn_smooth
from imgclust.refine.selftrain import self_train


def _blobs(seed: int = 0):
    """6 tight blobs in 16-d, 5 classes: blob 5 sits beside blob 4 and belongs to class 4."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, 16)) * 6.0
    centers = np.vstack([centers, centers[4] + 1.5 * (centers[4] - centers[:4].mean(0)) / 4])
    blob = np.repeat(np.arange(6), 150)
    x = (centers[blob] + rng.normal(size=(len(blob), 16)) * 0.5).astype(np.float32)
    truth = np.minimum(blob, 4)
    return x, truth, blob


def test_align_and_agreement_mask():
    ref = np.repeat(np.arange(4), 25)
    perm = np.array([2, 0, 3, 1])
    assert np.array_equal(align_to(ref, perm[ref], 4), ref)
    noisy = perm[ref].copy()
    noisy[:5] = perm[1]  # 5 images of cluster 0 moved to cluster 1
    ok = agreement_mask(np.stack([perm[ref], noisy]), ref, 4)
    assert not ok[:5].any() and ok[5:].all()
    with pytest.raises(InputError):
        agreement_mask(np.stack([ref[:10]]), ref, 4)


def test_confident_self_train_ignores_the_structured_mistake_all_runs_do_not_share():
    x, truth, blob = _blobs()
    cons = truth.copy()
    cons[blob == 5] = 3  # the consensus put the side blob in the wrong class ...
    runs = np.stack([cons, np.roll(np.arange(5), 1)[truth], truth])  # ... which two of three runs do not
    res = confident_self_train(x, runs, cons, 5, seed=0)
    assert not res.fallback
    assert res.confident_share == pytest.approx(750 / 900)
    plain = self_train(x, cons, 5, seed=0).classifier.predict_proba(x).argmax(1)
    acc_conf, acc_plain = cluster_acc(truth, res.labels), cluster_acc(truth, plain)
    assert acc_plain < 0.9  # the plain recipe learns the consensus' mistake (separable blobs)
    assert acc_conf > acc_plain + 0.1
    # nothing agrees: too few confident images -> the plain recipe on every image
    res2 = confident_self_train(x, np.stack([np.roll(cons, 450)]), cons, 5, seed=0, min_share=0.9)
    assert res2.fallback and res2.confident_share == 1.0


def test_knn_smooth_removes_scattered_label_noise():
    x, truth, _ = _blobs(1)
    rng = np.random.default_rng(0)
    noisy = truth.copy()
    flip = rng.random(len(noisy)) < 0.1
    noisy[flip] = rng.integers(0, 5, flip.sum())
    sm = knn_smooth(x, noisy, 5, n_neighbors=10, iters=2)
    assert cluster_acc(truth, noisy) < 0.95
    assert cluster_acc(truth, sm) > 0.99
