"""Neighbours and k-means at scale (issue 20): the approximate index reports a recall that matches
exact search, and k-means trained on a sample then assigned in blocks clusters the digits as well as
full k-means (both scored against the labels; nothing is tuned on them)."""

from __future__ import annotations

import numpy as np
import pytest

from imgclust.errors import InputError
from imgclust.methods.base import FitContext
from imgclust.methods.kmeans import KMeans
from imgclust.metrics import cluster_acc
from imgclust.neighbors import mine_neighbors


def test_ivf_recall_recorded_and_equal_to_the_recall_measured_on_every_row(digits_xy):
    x, _ = digits_xy
    ivf = mine_neighbors(x, k=20, exact_max_rows=500, progress=False)
    exact = mine_neighbors(x, k=20, progress=False)
    assert ivf.info["index"] == "ivf-flat-ip" and exact.info["index"] == "flat-ip"
    assert "recall_at_k" not in exact.info
    full = np.mean([len(np.intersect1d(ivf.neighbors_of(i), exact.neighbors_of(i))) / 20 for i in range(len(x))])
    assert 0.3 < full < 1.0  # approximate: the tiny nlist/nprobe ratio misses some true neighbours
    assert ivf.info["recall_sample"] == 256 and ivf.info["recall_k"] == 20
    assert abs(ivf.info["recall_at_k"] - full) < 0.05


def test_kmeans_on_a_sample_assigns_every_row_like_full_kmeans(digits_xy):
    x, y = digits_xy
    full = KMeans(10, {"n_init": 3}).fit(x, FitContext(seed=0, progress=False))
    sampled = KMeans(10, {"n_init": 3, "train_sample": 600}).fit(x, FitContext(seed=0, progress=False))
    assert "trained_on_sample" not in full.history_
    assert sampled.history_["trained_on_sample"] == 600
    assert sampled.labels_.shape == (len(x),)
    np.testing.assert_array_equal(sampled.labels_, sampled.predict_proba(x).argmax(1))
    a_full, a_sampled = cluster_acc(y, full.labels_), cluster_acc(y, sampled.labels_)
    assert a_sampled > a_full - 0.06  # a third of the rows: about as good (restarts alone move ACC by ~0.05)


def test_blockwise_ivf_from_a_memmap_equals_in_memory_and_fast_index_reports_its_recall(digits_xy, tmp_path, monkeypatch):
    import imgclust.neighbors as nbm

    x, _ = digits_xy
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    a = mine_neighbors(x, k=10, exact_max_rows=500, progress=False, center=True)
    b = mine_neighbors(mm, k=10, exact_max_rows=500, progress=False, center=True)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.info["recall_at_k"] == b.info["recall_at_k"]
    monkeypatch.setattr(nbm, "IVF_FAST_MIN_ROWS", 1000)
    q = mine_neighbors(mm, k=10, exact_max_rows=500, progress=False)
    assert q.info["index"] == "ivf-pq4fs-sq8refine-ip" and 0.3 < q.info["recall_at_k"] <= 1.0
    bad = x.copy()
    bad[1500, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        mine_neighbors(bad, k=10, exact_max_rows=500, progress=False)


def test_fast_index_above_its_threshold_recall_matches_every_row_and_is_deterministic(digits_xy, tmp_path, monkeypatch):
    """Issue 20's large-N index (IVF sqrt(N) + 4-bit PQ fast-scan + SQ8 re-rank), forced on the digits: its
    recorded recall is the recall over every row (within sampling error), two runs give the same sets, and
    it only applies from IVF_FAST_MIN_ROWS: below, the cache key of every existing entry is unchanged."""
    import imgclust.neighbors as nbm

    x, _ = digits_xy
    assert _params(len(x), 500) == _params_main(len(x), 500)  # IVF-flat below the threshold: keys as before
    key_before = nbm.neighbor_cache_key(x, **_params(len(x), 500))
    monkeypatch.setattr(nbm, "IVF_FAST_MIN_ROWS", 1000)
    fast = mine_neighbors(x, k=20, exact_max_rows=500, progress=False)
    again = mine_neighbors(x, k=20, exact_max_rows=500, progress=False)
    exact = mine_neighbors(x, k=20, progress=False)
    info = fast.info
    assert info["index"] == "ivf-pq4fs-sq8refine-ip" and info["nlist"] == int(len(x) ** 0.5) and info["pq_m"] == 16
    assert info["nprobe"] == nbm.FAST_NPROBE and info["k_factor"] == nbm.FAST_K_FACTOR
    assert min(info["build_s"], info["search_s"], info["recall_s"]) >= 0
    np.testing.assert_array_equal(fast.indices, again.indices)
    assert fast.sizes.min() == fast.sizes.max() == 20
    full = np.mean([len(np.intersect1d(fast.neighbors_of(i), exact.neighbors_of(i))) / 20 for i in range(len(x))])
    assert 0.5 < full <= 1.0
    assert abs(info["recall_at_k"] - full) < 0.05
    # the cache key: a "fast" field only where the fast index applies (here, with the threshold lowered)
    assert nbm.neighbor_cache_key(x, **_params(len(x), 500)) != key_before
    assert "fast" not in _params(len(x), 5000) and _params(len(x), 5000) == _params_main(len(x), 5000)


def _params(n, exact_max_rows):
    """The parameters ``_load_or_mine`` hashes into the cache key, read back through a spy."""
    import imgclust.neighbors as nbm

    seen = {}
    real = nbm.neighbor_cache_key

    class Seen(Exception):
        pass

    def spy(features, **params):
        seen.update(params)
        raise Seen

    nbm.neighbor_cache_key = spy
    try:
        nbm._load_or_mine(np.zeros((n, 4), np.float32), "unused", mode="fixed", k=5, threshold=0.3,
                          max_neighbors=1000, exact_max_rows=exact_max_rows, seed=0, progress=False, center=False)
    except Seen:
        pass
    finally:
        nbm.neighbor_cache_key = real
    return seen


def _params_main(n, exact_max_rows):
    """The cache-key parameters before issue 20's large-N index (main at c58ef7f)."""
    return {"mode": "fixed", "k": 5, "max_neighbors": 1000, "threshold": None, "exact_max_rows": exact_max_rows,
            "nprobe": 16, "train": 32, "seed": 0 if n > exact_max_rows else None, "center": False}


@pytest.mark.parametrize("fast", [False, True], ids=["ivf-flat", "ivf-pq-fastscan-refine"])
def test_a_search_killed_midway_resumes_from_its_last_committed_row_and_ends_with_the_same_sets(
        digits_xy, tmp_path, monkeypatch, fast):
    """Issue 20: mining 10M neighbours takes about an hour; a kill must not lose it. The index is read back
    (not rebuilt), only the rows after the last commit are searched again, and the sets equal an
    uninterrupted run's; the cache's partial files go once the final cache is written."""
    import imgclust.neighbors as nbm

    x, _ = digits_xy
    if fast:
        monkeypatch.setattr(nbm, "IVF_FAST_MIN_ROWS", 1000)
    whole = nbm.load_or_mine_neighbors(x, None, k=10, exact_max_rows=500, progress=False)
    monkeypatch.setattr(nbm, "RESUME_FLUSH_ROWS", 512)
    monkeypatch.setattr(nbm, "RESUME_MIN_ROWS", 1000)  # 1M in earnest
    real, calls = nbm._drop_self, {"n": 0}

    def dies_at_the_sixth_chunk(ids, sims, rows):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # stands in for kill -9: nothing after this point runs
        return real(ids, sims, rows)

    monkeypatch.setattr(nbm, "_drop_self", dies_at_the_sixth_chunk)
    monkeypatch.setattr(nbm, "mine_neighbors", _with_chunk(nbm.mine_neighbors, 128))
    with pytest.raises(KeyboardInterrupt):
        nbm.load_or_mine_neighbors(x, tmp_path, k=10, exact_max_rows=500, progress=False)
    partial = next(tmp_path.glob("neighbors-*.partial"))
    import json

    assert json.loads((partial / "done.json").read_text())["done"] == 512  # 4 chunks of 128 committed, the 5th lost
    real_build, built = nbm._build_index, []
    monkeypatch.setattr(nbm, "_build_index", lambda *a: built.append(1) or real_build(*a))
    calls["n"] = -10**9  # no more kills
    resumed = nbm.load_or_mine_neighbors(x, tmp_path, k=10, exact_max_rows=500, progress=False)
    assert not built and resumed.info["resumed_from_row"] == 512
    assert calls["n"] == -10**9 + int(np.ceil((len(x) - 512) / 128)) + 2  # the rest of the rows + the recall sample
    np.testing.assert_array_equal(resumed.indptr, whole.indptr)
    np.testing.assert_array_equal(resumed.indices, whole.indices)
    assert resumed.info["recall_at_k"] == whole.info["recall_at_k"]
    assert not list(tmp_path.glob("neighbors-*.partial")) and len(list(tmp_path.glob("neighbors-*.npz"))) == 1


def _with_chunk(fn, chunk):
    def call(*a, **kw):
        return fn(*a, **{**kw, "chunk": chunk})
    return call
