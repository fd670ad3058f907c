"""Unknown K (imgclust.hierarchy), ``imgclust recut`` (imgclust.recut) and the trust score (imgclust.trust)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from imgclust.errors import InputError
from imgclust.hierarchy import MergeTree, agglomerate, build_hierarchy, elbow_votes, pool_votes, resolution_persistence
from imgclust.metrics import cluster_acc
from imgclust.trust import trust_score


def cli(*args, tmp_path):
    env = dict(os.environ, IMGCLUST_CACHE=str(tmp_path / "cache"), IMGCLUST_QUIET="1", OMP_NUM_THREADS="1",
               IMGCLUST_REPORT_MAP="pca")
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def unequal_blobs():
    """6 groups of very unequal sizes (900 down to 40 images)."""
    sizes = [900, 500, 300, 150, 80, 40]
    x, y = make_blobs(n_samples=sizes, n_features=16, cluster_std=1.5, center_box=(-10, 10), random_state=3)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def blob_tree(unequal_blobs):
    return build_hierarchy(unequal_blobs[0], "2:12", seed=0)


def test_finds_the_groups_of_unequal_size(unequal_blobs, blob_tree):
    x, y = unequal_blobs
    assert blob_tree.k == 6 and blob_tree.candidates[0] == 6, (blob_tree.candidates, blob_tree.persistence)
    assert cluster_acc(y, blob_tree.cut(6)) > 0.99  # the small groups are not swallowed by the big ones
    assert blob_tree.n_leaves == 36  # 3 x the top of the range


def test_votes_pick_the_median_and_are_all_marked(blob_tree):
    v = blob_tree.info["votes"]
    pooled = sorted(k for vt in blob_tree.info["votes_all_trees"] for k in vt.values())
    assert len(pooled) == 9 and blob_tree.k == pooled[4]  # the median of 3 trees x 3 votes
    assert set(v.values()) <= set(blob_tree.candidates) and len(blob_tree.candidates) <= 3
    # a hand-made modularity curve: rises steeply to K=5, creeps up to its maximum at K=9
    ks = list(range(2, 13))
    mod = dict(zip(ks, [0.40, 0.60, 0.70, 0.800, 0.803, 0.806, 0.808, 0.810, 0.809, 0.805, 0.80]))
    persist = {k: (0.6 if k == 7 else 0.4 if k == 9 else 0.0) for k in ks}
    # 97 % of the way from 0.40 to 0.81 is 0.7977: first reached at K=5
    assert elbow_votes(mod, persist, ks) == {"modularity_argmax": 9, "gain_97": 5, "most_persistent": 7}
    assert elbow_votes(mod, persist, ks, gain_share=0.99)["gain_97"] == 7  # 0.8059 first reached at K=7


def test_pooled_votes_of_several_trees_mark_every_modularity_maximum():
    ks = list(range(2, 21))
    persist = {k: (0.5 if k == 6 else 0.3 if k == 16 else 0.0) for k in ks}
    # CIFAR-10 train's three trees (seeds 0-2): the argmax wanders along a plateau (9, 10, 10)
    trees = [{"modularity_argmax": 9, "gain_97": 7, "most_persistent": 6},
             {"modularity_argmax": 10, "gain_97": 6, "most_persistent": 7},
             {"modularity_argmax": 10, "gain_97": 6, "most_persistent": 8}]
    assert pool_votes(trees, persist, ks) == (7, [7, 10, 9])  # median of 6,6,6,7,7,8,9,10,10; both maxima
    # one tree: its distinct votes, topped up by persistence
    assert pool_votes(trees[:1], persist, ks) == (7, [7, 9, 6])
    assert pool_votes([{"modularity_argmax": 8, "gain_97": 6, "most_persistent": 8}], persist, ks) == (8, [8, 6, 16])


def test_cuts_are_nested_and_numbered_by_size(blob_tree):
    prev = None
    for k in range(2, 15):
        c = blob_tree.cut(k)
        assert len(np.unique(c)) == k
        sizes = np.bincount(c)
        assert (np.diff(sizes) <= 0).all()  # cluster 0 is the biggest
        if prev is not None:  # every cluster at K lies inside one cluster at K - 1
            pairs = np.unique(np.stack([c, prev]), axis=1)
            assert len(np.unique(pairs[0])) == pairs.shape[1]
        prev = c


def test_round_trip_and_validation(blob_tree):
    d = json.loads(json.dumps(blob_tree.to_dict()))
    back = MergeTree.from_dict(d)
    for k in (2, 6, 11):
        assert np.array_equal(back.cut(k), blob_tree.cut(k))
    bad = dict(d, merges=d["merges"][:-1])
    with pytest.raises(InputError, match="tree"):
        MergeTree.from_dict(bad)
    with pytest.raises(InputError, match="format"):
        MergeTree.from_dict(dict(d, format=99))
    with pytest.raises(InputError, match="between 1 and"):
        blob_tree.cut(blob_tree.n_leaves + 1)


def test_agglomerate_two_cliques():
    """Two 4-cliques joined by one edge: merges stay inside the cliques first; Q(2) is the textbook value."""
    e = np.zeros((8, 8))
    for g in (range(4), range(4, 8)):
        for i in g:
            for j in g:
                if i != j:
                    e[i, j] = 1
    e[3, 4] = e[4, 3] = 1
    merges, gains, inner, expect = agglomerate(e)
    first6 = merges[:6]
    assert all((a < 4) == (b < 4) for a, b in first6)
    # 13 edges; each side: 6 internal edges and degree sum 13, so Q = 12/13 - 2 (13/26)^2
    assert inner[2] - expect[2] == pytest.approx(12 / 13 - 2 * (13 / 26) ** 2)
    assert inner[1] - expect[1] == pytest.approx(0.0)
    p = resolution_persistence(inner, expect, range(1, 9))
    assert max(p, key=p.get) == 2


def test_trust_separates_good_from_bad(unequal_blobs):
    x, y = unequal_blobs
    good = trust_score(x, y)
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flip = rng.random(len(y)) < 0.3
    noisy[flip] = rng.integers(0, 6, flip.sum())
    bad = trust_score(x, noisy)
    rand = trust_score(x, rng.permutation(y))
    assert good["score"] > 0.95 and bad["score"] < good["score"] - 0.2
    assert abs(rand["score"]) < 0.05  # chance-corrected: a random partition scores ~0
    assert len(good["per_cluster"]) == 6 and min(good["per_cluster"]) > 0.9
    with pytest.raises(InputError):
        trust_score(x, y[:-1])


def test_cluster_auto_then_recut(tmp_path, digits_xy):
    """--k auto writes the tree and the trust score; recut equals a fresh cut of the merge tree."""
    run, run2 = tmp_path / "run", tmp_path / "run10"
    r = cli("cluster", "digits", "--k", "auto", "--k-range", "4:12", "--backbone", "pixels", "--image-size", "8", "--out", run, "-q",
            tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "plausible K (merge tree)" in r.stdout and "trust (no labels)" in r.stdout
    summary = json.loads((run / "run.json").read_text())
    k = summary["k_selection"]["k"]
    assert 7 <= k <= 15 and len(summary["cluster_sizes"]) == k
    assert summary["trust"]["score"] > 0.5 and len(summary["trust"]["per_cluster"]) == k
    h = json.loads((run / "hierarchy.json").read_text())
    assert h["k"] == k and h["candidates"][0] == k and len(h["leaves"]) == 1797
    assert 'id="hierarchy"' in (run / "report.html").read_text()

    r = cli("recut", run, "--k", "10", "--out", run2, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    got = np.loadtxt(run2 / "assignments.csv", delimiter=",", skiprows=1, usecols=2, dtype=np.int64)
    # the fresh fit: the same features (pixels of the 8x8 digits), the same settings
    from imgclust.api import ImageClusterer

    est = ImageClusterer(n_clusters=2, backbone="pixels", image_size=8, cache_dir=str(tmp_path / "cache"), progress=False)
    feats, valid, _, _ = est.features("digits")
    fresh = build_hierarchy(np.asarray(feats)[valid], "4:12", seed=0)
    assert np.array_equal(got, fresh.cut(10))
    s2 = json.loads((run2 / "run.json").read_text())
    assert s2["recut"]["k"] == 10 and len(s2["cluster_sizes"]) == 10 and s2["trust"] is not None
    assert s2["metrics"]["acc"] == pytest.approx(cluster_acc(digits_xy[1], got))
    assert not (run2 / "model").exists()
    # bad input: one line, status 2
    for args, msg in [((run2.parent / "nope", "--k", "3"), "not a complete run"), ((run, "--k", "1000"), "between 2"),
                      ((run, "--k", "4", "--out", run), None)]:
        extra = () if "--out" in args else ("--out", tmp_path / "x")
        r = cli("recut", *args, *extra, tmp_path=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        if msg:
            assert msg in r.stderr


def test_recut_refuses_a_run_without_tree(tmp_path):
    run = tmp_path / "run"
    r = cli("cluster", "digits", "--k", "5", "--backbone", "pixels", "--image-size", "8", "--out", run, "-q",
            "--no-report", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "run.json").read_text())["trust"]["score"] > 0
    r = cli("recut", run, "--k", "3", "--out", tmp_path / "r3", tmp_path=tmp_path)
    assert r.returncode == 2 and "only runs made with --k auto" in r.stderr


def test_report_dendrogram_is_a_valid_linkage(blob_tree):
    from scipy.cluster.hierarchy import fcluster, is_valid_linkage

    from imgclust.report.hierarchy_view import dendrogram_svg, linkage_matrix

    d = blob_tree.to_dict()
    z = linkage_matrix(d["merges"], d["n_leaves"])
    assert is_valid_linkage(z)
    # scipy's cut of the same linkage groups the leaves exactly as the tree's own cut
    for k in (2, 6, 9):
        ours = blob_tree.leaf_map(k)
        theirs = fcluster(z, k, criterion="maxclust")
        assert len(np.unique(np.stack([ours, theirs]), axis=1)[0]) == k
    svg = dendrogram_svg(d)
    assert svg.startswith("<svg") and "K = 6 (this run)" in svg
