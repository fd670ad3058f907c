"""Near-duplicates and outliers (imgclust.duplicates) on digits with injected copies."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from imgclust.duplicates import find_quality, read_quality, write_quality
from imgclust.errors import InputError


@pytest.fixture(scope="module")
def digits_with_copies():
    """Digits 8x8 (64-d pixels) minus its own exact repeats, plus 1 % copies: exact, +-1 grey level, one pixel shift."""
    x, _ = load_digits(return_X_y=True)
    x = np.unique(x, axis=0).astype(np.float32)  # the set has a few exact repeats of its own
    rng = np.random.default_rng(0)
    orig = rng.choice(len(x), size=18, replace=False)
    copies = []
    for j, i in enumerate(orig):
        img = x[i].reshape(8, 8).copy()
        if j % 3 == 1:
            img = np.clip(img + rng.integers(-1, 2, img.shape), 0, 16)  # re-quantised
        elif j % 3 == 2:
            img = np.roll(img, 1, axis=1) * 0.15 + img * 0.85  # a slightly blurred copy
        copies.append(img.ravel())
    return np.concatenate([x, np.asarray(copies, np.float32)]), orig, len(x)


def test_injected_copies_are_found(digits_with_copies):
    x, orig, n = digits_with_copies
    q = find_quality(x, dup_threshold=0.96)
    group_of = {r: g for g, rows in enumerate(q.groups) for r in rows}
    found = sum(1 for j, i in enumerate(orig) if group_of.get(int(i), -1) == group_of.get(n + j, -2))
    assert found == len(orig)  # every original sits in one group with its copy
    assert q.info["n_in_groups"] < 0.2 * len(x)  # and most images are in no group
    exact = find_quality(x, dup_threshold=0.9999)
    assert all(len(g) >= 2 for g in exact.groups)
    assert {int(orig[0]), n} in [set(g) for g in exact.groups]  # copy 0 is exact: similarity 1


def test_outlier_is_flagged_and_capped(digits_with_copies):
    x, _, _ = digits_with_copies
    rng = np.random.default_rng(1)
    odd = rng.uniform(0, 16, size=(2, 64)).astype(np.float32)  # noise images: no digit near them
    q = find_quality(np.concatenate([x, odd]), max_outlier_fraction=0.01)
    assert {len(x), len(x) + 1} <= set(q.outliers.tolist())
    assert len(q.outliers) <= int(0.01 * (len(x) + 2))
    assert (np.diff(q.scores[q.outliers]) <= 0).all()  # worst first


def test_write_and_read(tmp_path, digits_with_copies):
    x, _, _ = digits_with_copies
    q = find_quality(x)
    ids = [f"img{i}" for i in range(len(x))]
    write_quality(tmp_path, q, ids, [""] * len(x), np.zeros(len(x), int))
    dups, outs = read_quality(tmp_path)
    assert len(dups) == q.info["n_in_groups"] and len(outs) == max(int(0.01 * len(x)), q.info["n_outliers"])
    assert sum(r["outlier"] == "1" for r in outs) == q.info["n_outliers"]
    assert [float(r["score"]) for r in outs] == sorted((float(r["score"]) for r in outs), reverse=True)
    assert read_quality(tmp_path / "nope") is None


def test_bad_input():
    with pytest.raises(InputError):
        find_quality(np.zeros((1, 4), np.float32))
    with pytest.raises(InputError):
        find_quality(np.full((5, 4), np.nan, np.float32))
    with pytest.raises(InputError):
        find_quality(np.ones((5, 4), np.float32), dup_threshold=2.0)


def test_thumbnails_find_copies_the_features_miss():
    from imgclust.data import ArraySource
    from imgclust.duplicates import thumb_vectors

    x, _ = load_digits(return_X_y=True)
    imgs = (np.unique(x, axis=0)[:300] * 15).astype(np.uint8).reshape(-1, 8, 8)
    copies = np.clip(imgs[:5].astype(int) + 2, 0, 255).astype(np.uint8)  # brighter copies
    allimgs = np.concatenate([imgs, copies])
    th = thumb_vectors(ArraySource(allimgs), np.arange(len(allimgs)))
    assert th.shape == (305, 256) and np.allclose(th.mean(1), 0, atol=1e-3)
    feats = np.random.default_rng(0).normal(size=(305, 32)).astype(np.float32)  # features see no duplicate
    assert find_quality(feats).groups == []
    q = find_quality(feats, thumbs=th, thumb_threshold=0.985)
    pairs = {frozenset(g) for g in q.groups if len(g) == 2}
    assert {frozenset((i, 300 + i)) for i in range(5)} <= pairs
