"""PEDCC construction: geometry, determinism under a seed, and the per-(K, d) cache."""

import numpy as np
import pytest

from imgclust.errors import InputError
from imgclust.heads.pedcc import (
    build_pedcc,
    load_or_build_pedcc,
    pedcc_stats,
    repulsion_points,
    simplex_points,
)


def _gram(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    return c @ c.T


@pytest.mark.parametrize("k,d", [(2, 1), (3, 2), (10, 9), (10, 60), (20, 128), (100, 99)])
def test_simplex_is_exact_when_d_at_least_k_minus_1(k, d):
    c = build_pedcc(k, d)
    assert c.shape == (k, d) and c.dtype == np.float32
    g = _gram(c)
    np.testing.assert_allclose(np.diag(g), 1.0, atol=1e-6)
    off = g[~np.eye(k, dtype=bool)]
    np.testing.assert_allclose(off, -1.0 / (k - 1), atol=1e-6)  # every pair at the simplex angle
    np.testing.assert_allclose(c.sum(0), 0.0, atol=1e-5)  # centred: the most negative mean cosine possible


def test_paper_recursion_uses_the_last_k_minus_1_coordinates():
    pts = simplex_points(4)
    assert pts.shape == (4, 3)
    np.testing.assert_allclose(pts[-1], [0, 0, 1])  # the newest point is the positive basic point
    c = build_pedcc(4, 6, rotate=False)
    np.testing.assert_array_equal(c[:, :3], 0.0)  # leading zeros, as the paper pads
    r = build_pedcc(4, 6, rotate=True)
    assert np.abs(r[:, :3]).max() > 0.05  # rotation spreads the targets over all coordinates
    np.testing.assert_allclose(_gram(r), _gram(c), atol=1e-6)  # ... and keeps every inner product


@pytest.mark.parametrize("k,d,max_cos", [
    (4, 2, 0.0),  # a square: neighbours at 90 degrees
    (6, 3, 0.0),  # the octahedron
    (12, 3, 1 / np.sqrt(5)),  # the icosahedron, the optimum for 12 points on the sphere
])
def test_repulsion_reaches_the_known_optimal_configurations(k, d, max_cos):
    c = build_pedcc(k, d)  # d < K - 1: the repulsion iteration
    st = pedcc_stats(c)
    assert st["max_cos"] == pytest.approx(max_cos, abs=2e-3)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-6)


def test_repulsion_also_finds_the_simplex_and_spreads_many_points():
    st = pedcc_stats(repulsion_points(10, 20, seed=3))
    assert st["max_cos"] == pytest.approx(-1 / 9, abs=1e-4) and st["min_cos"] == pytest.approx(-1 / 9, abs=1e-4)
    many = pedcc_stats(build_pedcc(40, 8, seed=1))
    random = np.random.default_rng(1).standard_normal((40, 8))
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    assert many["max_cos"] < pedcc_stats(random)["max_cos"] - 0.15  # far better spread than random points
    assert abs(many["mean_cos"] - many["simplex_cos"]) < 1e-3  # balanced: the points sum to ~0


def test_deterministic_under_a_seed_and_seed_matters():
    a, b = build_pedcc(12, 5, seed=7), build_pedcc(12, 5, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, build_pedcc(12, 5, seed=8))
    np.testing.assert_array_equal(build_pedcc(10, 30, seed=2), build_pedcc(10, 30, seed=2))
    assert not np.allclose(build_pedcc(10, 30, seed=2), build_pedcc(10, 30, seed=3))


def test_cache_per_k_and_d(tmp_path):
    c = load_or_build_pedcc(10, 16, cache_dir=tmp_path)
    files = sorted((tmp_path / "pedcc").glob("*.npy"))
    assert [f.name.split("-")[:4] for f in files] == [["pedcc", "K10", "d16", "simplex"]]
    np.save(files[0], c * 0 + np.float32(0.5))  # a tampered cache (rows not unit) is rebuilt, not trusted
    again = load_or_build_pedcc(10, 16, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, c)
    load_or_build_pedcc(10, 5, cache_dir=tmp_path)
    assert len(list((tmp_path / "pedcc").glob("*.npy"))) == 2
    hit = load_or_build_pedcc(10, 5, cache_dir=tmp_path)
    np.testing.assert_array_equal(hit, build_pedcc(10, 5))


def test_bad_arguments():
    with pytest.raises(InputError, match="d >= 9"):
        build_pedcc(10, 5, method="simplex")
    with pytest.raises(InputError, match="auto, simplex, repulsion"):
        build_pedcc(10, 5, method="lattice")
    with pytest.raises(InputError):
        build_pedcc(1, 5)
