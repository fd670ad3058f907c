"""Several backbones at once: cached per backbone, combined by a fixed per-image rule."""

import numpy as np
import pytest

from imgclust import ImageClusterer
from imgclust.backbones import build_backbone
from imgclust.data import digits as bundled
from imgclust.errors import InputError
from imgclust.features import extract_features
from imgclust.metrics import cluster_acc
from imgclust.multibackbone import combine_spaces, split_names

COMBO = "efficientnet-lite0,pixels"


def test_combination_rule_is_equal_weight_cosine():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 7)) * 100, rng.normal(size=(50, 3))
    z = combine_spaces([a, b])
    assert z.shape == (50, 10) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(z[:, :7], axis=1), np.sqrt(0.5), rtol=1e-5)  # equal weight per space

    def cos(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T

    np.testing.assert_allclose(z @ z.T, (cos(a) + cos(b)) / 2, atol=1e-5)
    assert np.array_equal(z, combine_spaces([a, b]))  # deterministic
    assert split_names(" efficientnet-lite0, pixels ") == ["efficientnet-lite0", "pixels"]
    with pytest.raises(InputError):
        split_names("pixels,pixels")
    with pytest.raises(InputError):
        combine_spaces([a, b[:10]])


def test_combined_backbones_are_cached_separately_and_combined_deterministically(tmp_path):
    cache = tmp_path / "cache"
    src = bundled()
    est = ImageClusterer(n_clusters=10, backbone=COMBO, image_size=32, cache_dir=str(cache), progress=False)
    est.fit("digits")
    entries = sorted(p.name for p in (cache / "features").iterdir() if p.is_dir())
    assert len(entries) == 2  # one cache entry per backbone, nothing for the combination
    # each backbone alone reads its own entry back (no re-extraction) and the combination is the rule
    per = [extract_features(src, build_backbone(n, image_size=32), cache_dir=cache, progress=False)
           for n in COMBO.split(",")]
    assert all(fs.from_cache for fs in per)
    combined = est.feature_set_.features
    np.testing.assert_array_equal(combined, combine_spaces([fs.features for fs in per]))
    assert est.feature_set_.from_cache is False and combined.shape[1] == 1280 + 3 * 32 * 32
    again = ImageClusterer(n_clusters=10, backbone=COMBO, image_size=32, cache_dir=str(cache), progress=False)
    again.fit("digits")
    assert again.feature_set_.from_cache
    np.testing.assert_array_equal(again.labels_, est.labels_)
    assert cluster_acc(src.labels, est.labels_) > 0.6
    # save / load / predict new images through both backbones
    est.save(tmp_path / "model")
    loaded = ImageClusterer.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict(src.images[:40]), est.labels_[:40])
    with pytest.raises(InputError):
        ImageClusterer(backbone=COMBO, backbone_weights="x.pth", progress=False)._backbone()
