"""Streaming self-training (issue 20): batches standardised on the fly from a memory map.

Same classifier as from an in-memory array (bit for bit), held-out scores in blocks equal to
one block, and no N x D copy of the features in anonymous memory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from imgclust.refine.selftrain import self_train


def _noisy_digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    return x.astype(np.float32), np.where(rng.random(len(y)) < 0.3, rng.integers(0, 10, len(y)), y)


def test_memmap_and_blocked_holdout_equal_in_memory(tmp_path) -> None:
    x, noisy = _noisy_digits()
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ref = self_train(x, noisy, 10, epochs=3, seed=1)
    mm = self_train(xm, noisy, 10, epochs=3, seed=1)
    assert torch.equal(ref.classifier.weight, mm.classifier.weight) and ref.grid == mm.grid
    blocked = self_train(xm, noisy, 10, epochs=3, seed=1, chunk=50)  # 180 held-out rows in 4 blocks
    assert torch.equal(ref.classifier.weight, blocked.classifier.weight) and (ref.lr, ref.weight_decay) == (
        blocked.lr, blocked.weight_decay)
    for a, b in zip(ref.grid, blocked.grid):
        assert a["holdout_acc"] == pytest.approx(b["holdout_acc"], abs=1e-6)
        assert a["holdout_loss"] == pytest.approx(b["holdout_loss"], rel=1e-5)
    clf = ref.classifier
    assert np.array_equal(clf.predict(xm, chunk=100), clf.logits(x).argmax(1))
    assert (clf.predict(x) == noisy).mean() > 0.6  # it learned the (noisy) pseudo-labels


def test_no_feature_copy_in_memory(tmp_path, anon_growth_mb) -> None:
    """300k x 64 float32 (73 MB) memory-mapped: the run's anonymous memory grows by far less
    (a standardised copy, as before issue 20, grew it by ~130 MB)."""
    n, d = 300_000, 64
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((n, d), dtype=np.float32))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = rng.integers(0, 5, n)
    _, grew = anon_growth_mb(lambda: self_train(x, y, 5, lrs=(0.01,), weight_decays=(0.0,), epochs=1,
                                                batch_size=1024, seed=0))
    assert grew < 0.5 * n * d * 4 / 2**20
