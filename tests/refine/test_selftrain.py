"""Self-training a linear classifier on noisy pseudo-labels, choosing lr without true labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from imgclust.errors import InputError
from imgclust.refine.selftrain import LinearClassifier, self_train


def test_self_training_cleans_noisy_pseudo_labels() -> None:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(y)) < 0.3, rng.integers(0, 10, len(y)), y)
    assert (noisy == y).mean() < 0.76
    res = self_train(x, noisy, 10, seed=0, epochs=20)
    pred = res.classifier.predict_proba(x).argmax(1)
    assert (pred == y).mean() > 0.9  # better than the labels it was trained on
    assert len(res.grid) == 8 and res.lr in {g["lr"] for g in res.grid}
    chosen = max(res.grid, key=lambda g: (g["holdout_acc"], -g["holdout_loss"]))
    assert (chosen["lr"], chosen["weight_decay"]) == (res.lr, res.weight_decay)
    # Deterministic under a seed; state round trip.
    again = self_train(x, noisy, 10, seed=0, epochs=20)
    torch.testing.assert_close(again.classifier.weight, res.classifier.weight)
    clf = LinearClassifier.from_state_dict(res.classifier.state_dict("c."), "c.")
    np.testing.assert_array_equal(clf.predict_proba(x).argmax(1), pred)


def test_sample_weights_ignore_zero_weight_samples() -> None:
    x, y = load_digits(return_X_y=True)
    wrong = (y + 1) % 10
    half = np.arange(len(y)) % 2 == 0
    labels = np.where(half, y, wrong)  # every odd sample mislabelled
    res = self_train(x, labels, 10, weights=half.astype(np.float32), lrs=(0.1,), weight_decays=(0.0,), epochs=20)
    assert (res.classifier.predict_proba(x).argmax(1) == y).mean() > 0.9


def test_self_train_errors() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(InputError, match="pseudo-labels must lie"):
        self_train(x, np.full(20, 5), 3)
    with pytest.raises(InputError, match="weights"):
        self_train(x, np.zeros(20, int), 3, weights=-np.ones(20))
    with pytest.raises(InputError, match="holdout"):
        self_train(x, np.zeros(20, int), 3, holdout=1.0)
