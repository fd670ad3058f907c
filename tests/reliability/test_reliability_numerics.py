"""Numerics: NaN/inf features, duplicate and constant images, too few images, K larger than
the number of distinct images, empty clusters - reported, never a crash."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from imgclust import ImageClusterer
from imgclust.api import cluster
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig
from imgclust.errors import InputError
from imgclust.methods import FitContext, get_method


@pytest.fixture(scope="module")
def digits_x():
    x, y = load_digits(return_X_y=True)
    return x[:600].astype(np.float32), y[:600]


def _run(tmp_path, path, k, **source):
    cfg = RunConfig(k=k, method="kmeans", source=SourceConfig(path=str(path), **source),
                    backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(tmp_path / "cache")))
    return cluster(cfg, tmp_path / "run", progress=False)


def test_non_finite_feature_rows_are_dropped_with_label_minus_one(digits_x):
    x, _ = digits_x
    bad = x.copy()
    bad[3, 5] = np.nan
    bad[10, 0] = np.inf
    bad[20, :] = -np.inf
    m = ImageClusterer(n_clusters=10, method_options={"n_init": 2}, progress=False).fit(bad)
    assert (m.labels_[[3, 10, 20]] == -1).all() and (np.delete(m.labels_, [3, 10, 20]) >= 0).all()
    assert [(i, r) for i, _, r in m.skipped_] == [(i, "non-finite features (NaN or inf)") for i in (3, 10, 20)]
    # the other rows are clustered exactly as if the bad rows were not there
    clean = ImageClusterer(n_clusters=10, method_options={"n_init": 2}, progress=False).fit(np.delete(x, [3, 10, 20], axis=0))
    np.testing.assert_array_equal(np.delete(m.labels_, [3, 10, 20]), clean.labels_)
    pred = m.predict(bad[:25])
    assert pred[3] == -1 and pred[10] == -1 and pred[20] == -1 and (pred[:3] >= 0).all()


def test_all_rows_non_finite_is_a_clear_error(digits_x):
    x, _ = digits_x
    with pytest.raises(InputError, match="larger than the number of readable images"):
        ImageClusterer(n_clusters=3, progress=False).fit(np.full((20, 8), np.nan, np.float32))
    with pytest.raises(InputError, match="expecting 64 features"):
        ImageClusterer(n_clusters=3, method_options={"n_init": 1}, progress=False).fit(x).predict(x[:, :10])


def test_huge_finite_features_do_not_overflow(digits_x):
    x, y = digits_x
    from sklearn.metrics import adjusted_rand_score

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow RuntimeWarning
        labels = get_method("kmeans")(10, {"n_init": 2}).fit(x * 1e30, FitContext()).labels_
    ref = get_method("kmeans")(10, {"n_init": 2}).fit(x, FitContext()).labels_
    assert adjusted_rand_score(ref, labels) > 0.99  # spherical k-means is scale-free


def _save_images(root, arrays):
    root.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(root / f"{i:03d}.png")


def test_k_larger_than_distinct_images_finishes_and_reports_empty_clusters(tmp_path, capsys):
    rng = np.random.default_rng(0)
    distinct = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    _save_images(tmp_path / "dups", [distinct[i % 3] for i in range(30)])  # 3 images, 10 copies each
    summary = _run(tmp_path, tmp_path / "dups", k=5)
    assert summary["n_clustered"] == 30 and summary["n_distinct_features"] == 3
    assert len(summary["empty_clusters"]) == 2 and sorted(summary["cluster_sizes"]) == [0, 0, 10, 10, 10]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["empty_clusters"] == summary["empty_clusters"]
    assert run["method_history"]["empty_clusters"] == summary["empty_clusters"]
    # copies of one image always share a cluster
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "assignments.csv")))
    by_image = {}
    for r in rows:
        by_image.setdefault(int(r["id"][:3]) % 3, set()).add(r["cluster"])
    assert all(len(v) == 1 for v in by_image.values()) and len(set.union(*by_image.values())) == 3
    from imgclust.cli import _print_summary

    _print_summary(summary, tmp_path / "run")
    assert "warning: 2 of 5 clusters are empty (only 3 distinct images)" in capsys.readouterr().out


def test_constant_all_black_images(tmp_path):
    black = np.zeros((8, 8, 3), np.uint8)
    _save_images(tmp_path / "black", [black] * 12)
    summary = _run(tmp_path, tmp_path / "black", k=3)  # zero feature vectors: nothing to normalise
    assert summary["n_clustered"] == 12 and summary["n_distinct_features"] == 1
    assert sorted(summary["cluster_sizes"]) == [0, 0, 12] and len(summary["empty_clusters"]) == 2
    model = ImageClusterer.load(tmp_path / "run" / "model", cache_dir=str(tmp_path / "cache"))
    proba = model.predict_proba(np.stack([black] * 2))
    assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1)


def test_mostly_constant_images_still_give_k_clusters(tmp_path):
    x = (load_digits().images * 255 / 16).astype(np.uint8)
    imgs = [np.repeat(x[i][:, :, None], 3, axis=2) for i in range(40)] + [np.zeros((8, 8, 3), np.uint8)] * 60
    _save_images(tmp_path / "mix", imgs)
    summary = _run(tmp_path, tmp_path / "mix", k=4)
    assert summary["empty_clusters"] == [] and summary["n_distinct_features"] is None
    assert min(summary["cluster_sizes"]) > 0


def test_fewer_readable_images_than_k_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(1)
    _save_images(tmp_path / "few", [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)])
    (tmp_path / "few" / "bad1.png").write_bytes(b"")
    (tmp_path / "few" / "bad2.png").write_bytes(b"junk")
    with pytest.raises(InputError, match=r"K=6 is larger than the number of readable images \(5\)"):
        _run(tmp_path, tmp_path / "few", k=6)
    assert not (tmp_path / "run" / "assignments.csv").exists()
    with pytest.raises(InputError, match=r"K=8 is larger than the number of images \(7\)"):
        _run(tmp_path, tmp_path / "few", k=8)
