"""Neighbour mining: fixed and adaptive sets, self exclusion, duplicates, small N, cache."""

import numpy as np
import pytest
import torch

from imgclust.errors import InputError
from imgclust.neighbors import load_or_mine_neighbors, mine_neighbors, sample_neighbors


def unit_circle(degrees):
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def brute_force_topk(x, k):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_fixed_k_matches_brute_force_and_excludes_self():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32) * rng.uniform(0.5, 3, size=(300, 1)).astype(np.float32)
    nb = mine_neighbors(x, "fixed", k=7, progress=False)
    assert nb.indptr.tolist() == list(range(0, 301 * 7, 7))
    got = nb.indices.reshape(300, 7)
    np.testing.assert_array_equal(got, brute_force_topk(x, 7))
    assert not (got == np.arange(300)[:, None]).any()


def test_adaptive_takes_everything_within_the_distance_and_at_least_k():
    # Point 0 at 0 deg: cos(10..40 deg) >= 0.7 (distance <= 0.3), cos(50 deg) = 0.64 is not.
    # Point at 180 deg is far from all: it falls back to its k = 2 closest.
    x = unit_circle([0, 10, 20, 30, 40, 50, 60, 180])
    nb = mine_neighbors(x, "adaptive", k=2, threshold=0.3, progress=False)
    assert sorted(nb.neighbors_of(0).tolist()) == [1, 2, 3, 4]
    assert nb.neighbors_of(0).tolist() == [1, 2, 3, 4]  # best first
    assert nb.neighbors_of(7).tolist() == [6, 5]  # min count, the 2 closest (cos 120 > cos 130)
    assert sorted(nb.neighbors_of(3).tolist()) == [0, 1, 2, 4, 5, 6]  # 30 deg: 0..60 all within 30 deg
    for i in range(len(x)):
        assert i not in nb.neighbors_of(i).tolist()
        assert len(nb.neighbors_of(i)) >= 2
    # threshold 0 keeps only the minimum count; a cap bounds the set size
    assert nb.info["mode"] == "adaptive" and nb.info["min_similarity"] == pytest.approx(0.7)
    assert (mine_neighbors(x, "adaptive", k=2, threshold=0.0, progress=False).sizes == 2).all()
    capped = mine_neighbors(x, "adaptive", k=2, threshold=2.0, max_neighbors=3, progress=False)
    assert (capped.sizes == 3).all()


def test_duplicates_are_neighbours_and_self_is_excluded_by_index():
    x = np.repeat(unit_circle([0, 90, 200]), 3, axis=0)  # three copies of three points
    nb = mine_neighbors(x, "fixed", k=2, progress=False)
    for i in range(9):
        got = set(nb.neighbors_of(i).tolist())
        assert got == {j for j in range(3 * (i // 3), 3 * (i // 3) + 3)} - {i}
    ad = mine_neighbors(x, "adaptive", k=1, threshold=0.3, progress=False)
    assert all(set(ad.neighbors_of(i).tolist()) == {j for j in range(3 * (i // 3), 3 * (i // 3) + 3)} - {i}
               for i in range(9))


def test_fewer_images_than_k_gives_all_others_and_one_image_an_empty_set():
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    for mode in ("fixed", "adaptive"):
        nb = mine_neighbors(x, mode, k=50, progress=False)
        assert nb.info["k_effective"] == 4
        for i in range(5):
            assert sorted(nb.neighbors_of(i).tolist()) == sorted(set(range(5)) - {i})
    one = mine_neighbors(x[:1], "fixed", k=3, progress=False)
    assert one.sizes.tolist() == [0]
    ip, ix = one.torch_view()
    assert sample_neighbors(ip, ix, torch.tensor([0])).tolist() == [0]  # paired with itself


def test_sampling_draws_members_uniformly_and_deterministically():
    x = unit_circle([0, 10, 20, 30, 40, 50, 60, 180])
    nb = mine_neighbors(x, "adaptive", k=2, threshold=0.3, progress=False)
    ip, ix = nb.torch_view()
    rows = torch.arange(8).repeat(2000)
    a = sample_neighbors(ip, ix, rows, torch.Generator().manual_seed(5))
    b = sample_neighbors(ip, ix, rows, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    for i in range(8):
        drawn = a[rows == i].numpy()
        members = nb.neighbors_of(i)
        assert set(drawn.tolist()) == set(members.tolist())
        counts = np.bincount(drawn, minlength=8)[members]
        assert counts.min() > 0.6 * counts.mean()


def test_approximate_index_above_the_size_threshold_has_high_recall():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    x = (centers[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float32)
    exact = mine_neighbors(x, "fixed", k=10, progress=False)
    approx = mine_neighbors(x, "fixed", k=10, exact_max_rows=1000, progress=False)
    assert approx.info["index"] == "ivf-flat-ip" and exact.info["index"] == "flat-ip"
    assert not (approx.indices.reshape(-1, 10) == np.arange(3000)[:, None]).any()
    a, e = approx.indices.reshape(-1, 10), exact.indices.reshape(-1, 10)
    recall = np.mean([len(set(a[i]) & set(e[i])) / 10 for i in range(3000)])
    assert recall > 0.9


def test_cache_is_written_once_reused_and_keyed_by_features_and_params(tmp_path):
    x = np.random.default_rng(2).normal(size=(200, 8)).astype(np.float32)
    first = load_or_mine_neighbors(x, tmp_path, mode="adaptive", k=5, threshold=0.5, progress=False)
    assert first.info["cache"] == "written"
    files = sorted(tmp_path.glob("neighbors-*.npz"))
    assert len(files) == 1
    again = load_or_mine_neighbors(x, tmp_path, mode="adaptive", k=5, threshold=0.5, progress=False)
    assert again.info["cache"] == "hit"
    np.testing.assert_array_equal(again.indptr, first.indptr)
    np.testing.assert_array_equal(again.indices, first.indices)
    load_or_mine_neighbors(x, tmp_path, mode="adaptive", k=5, threshold=0.4, progress=False)
    load_or_mine_neighbors(x * 2 + 1, tmp_path, mode="adaptive", k=5, threshold=0.5, progress=False)
    assert len(list(tmp_path.glob("neighbors-*.npz"))) == 3
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert load_or_mine_neighbors(x, None, k=5, progress=False).info["cache"] == "none"


def test_bad_arguments_raise_input_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(InputError, match="allowed: fixed, adaptive"):
        mine_neighbors(x, "mutual")
    with pytest.raises(InputError, match="k"):
        mine_neighbors(x, k=0)
    with pytest.raises(InputError, match="NaN"):
        mine_neighbors(np.full((4, 3), np.nan, np.float32))


def test_centring_makes_the_absolute_threshold_meaningful_on_non_negative_features():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)  # pixel intensities >= 0: every pair has a high cosine
    raw = mine_neighbors(x, "adaptive", k=10, threshold=0.3, progress=False)
    cen = mine_neighbors(x, "adaptive", k=10, threshold=0.3, center=True, progress=False)

    def purity(nb):
        return (y[np.repeat(np.arange(len(nb)), nb.sizes)] == y[nb.indices]).mean()

    assert raw.info["mean_size"] > 300 and purity(raw) < 0.5
    assert 10 <= cen.info["mean_size"] < 100 and purity(cen) > 0.9
    assert cen.info["center"] and not raw.info["center"]
