"""ICBPL: its four losses, the neighbour refresh, fit/predict on digits, persistence, fine-tuning."""

import itertools
import os

import numpy as np
import pytest
import torch

from imgclust import ImageClusterer
from imgclust.errors import InputError
from imgclust.heads.pedcc import build_pedcc
from imgclust.losses.icbpl import (
    aug_cosine_loss,
    icbpl_loss,
    knn_cosine_loss,
    min_cosine_pedcc_loss,
    mmd_loss,
    tile_centroids,
)
from imgclust.methods import FitContext, available_methods, get_method
from imgclust.metrics import cluster_acc
from imgclust.neighbors import fixed_neighbors as _fixed_neighbors
from imgclust.neighbors import neighbor_overlap as _overlap

FAST = {"epochs": 30, "refresh_every": 10}


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Fits without a cache_dir put their PEDCC under $IMGCLUST_CACHE: keep it out of ~/.cache."""
    old = os.environ.get("IMGCLUST_CACHE")
    os.environ["IMGCLUST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("IMGCLUST_CACHE", None)
    else:
        os.environ["IMGCLUST_CACHE"] = old


@pytest.fixture(scope="module")
def fitted(digits_xy):
    x, _ = digits_xy
    return get_method("icbpl")(10, FAST).fit(x, FitContext(seed=0, progress=False))


# ------------------------------------------------------------------------------ losses
def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)
    assert float(mmd_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd_loss(x, x[torch.randperm(64, generator=g)])) == pytest.approx(0.0, abs=1e-6)  # order-free
    y = torch.randn(64, 8, generator=g)
    values = [float(mmd_loss(y, y + s)) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b > a + 1e-4 for a, b in itertools.pairwise(values)), values
    # Same-distribution samples score far lower than shifted ones (a real two-sample statistic).
    y2 = torch.randn(64, 8, generator=g)
    assert float(mmd_loss(y, y2)) < 0.2 * float(mmd_loss(y, y2 + 1.0))
    assert float(mmd_loss(y, y + 1.0, sigma=2.0)) > 0  # a fixed bandwidth works too


def test_mmd_pulls_features_onto_the_pedcc_distribution():
    c = torch.from_numpy(build_pedcc(4, 6))
    target = tile_centroids(c, 40)
    assert target.shape == (40, 6) and torch.equal(target[:4], c) and torch.equal(target[36:], c)
    assert torch.equal(tile_centroids(c, 6)[4:], c[:2])
    collapsed = c[:1].repeat(40, 1)  # everything on one centroid
    assert float(mmd_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd_loss(collapsed, target)) > 0.5


def test_cosine_losses():
    c = torch.from_numpy(build_pedcc(3, 4))
    z = c[[0, 1, 2, 0]]
    assert float(aug_cosine_loss(z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(aug_cosine_loss(z, -z)) == pytest.approx(2.0, abs=1e-6)
    assert float(min_cosine_pedcc_loss(z, c)) == pytest.approx(0.0, abs=1e-6)  # on a centroid: no pull
    assert float(min_cosine_pedcc_loss(-z, c)) == pytest.approx(1 - 0.5, abs=1e-5)  # -c_i is 60 deg from the others
    nb = torch.stack([z, z, -z], dim=1)  # (B, k=3, d): two equal neighbours and an opposite one
    assert float(knn_cosine_loss(z, nb)) == pytest.approx(2.0 / 3, abs=1e-6)
    assert float(knn_cosine_loss(z, z)) == pytest.approx(0.0, abs=1e-6)  # (B, d) = one neighbour each
    out = icbpl_loss(z, z, nb, c, (1.0, 2.0, 3.0, 4.0))
    total = 1 * out.mmd + 2 * out.aug + 3 * out.knn + 4 * out.pedcc
    assert float(out.loss) == pytest.approx(float(total), rel=1e-6)
    off = icbpl_loss(z, z, None, c, (1.0, 0.0, 3.0, 0.0))
    assert float(off.knn) == 0.0 and float(off.aug) == 0.0


# ------------------------------------------------------------------------------ the method
def test_registered_with_the_papers_defaults():
    cls = available_methods()["icbpl"]
    cfg = cls.Config()
    assert (cfg.k, cfg.refresh_every, cfg.batch_size, cfg.lr) == (4, 30, 100, 1e-3)
    assert (cfg.mmd_weight, cfg.aug_weight, cfg.knn_weight, cfg.pedcc_weight) == (9.0, 1.0, 2.0, 2.0)
    assert cfg.finetune == "head"
    for bad in ({"finetune": "some"}, {"aug": "x"}, {"k": 0}, {"temperature": 0}, {"mmd_weight": -1},
                {"mmd_weight": 0, "aug_weight": 0, "knn_weight": 0, "pedcc_weight": 0}, {"image_size": 2}):
        with pytest.raises(InputError):
            cls.Config.from_dict(bad)


def test_clusters_digits_and_predicts_nearest_pedcc_point(fitted, digits_xy):
    x, y = digits_xy
    m = fitted
    assert cluster_acc(y, m.labels_) > 0.6  # chance ~0.1; k-means on pixels ~0.79
    assert len(m.history_["loss"]) == 30 and m.history_["loss"][-1] < m.history_["loss"][0]
    proba = m.predict_proba(x)
    assert proba.shape == (len(x), 10) and np.allclose(proba.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1), m.labels_)
    z = m.transform(x)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal((z @ m.centroids_.numpy().T).argmax(1), m.labels_)  # eq. (8)
    assert min(m.history_["cluster_sizes"]) > 50  # the MMD keeps every cluster populated


def test_neighbor_refresh_changes_the_sets_after_the_encoder_moves(fitted, digits_xy):
    x, _ = digits_xy
    initial = _fixed_neighbors(x, 4, None, 0, False, cached=False)
    assert initial.shape == (len(x), 4)
    assert len(fitted.history_["refresh_overlap"]) == 2  # epochs 10 and 20
    assert fitted.history_["refresh_overlap"][0] < 0.9  # the re-mined sets really differ
    assert _overlap(initial, fitted.neighbors_) < 0.9
    frozen = get_method("icbpl")(10, {"epochs": 3, "refresh_every": 0}).fit(x, FitContext(seed=0, progress=False))
    np.testing.assert_array_equal(frozen.neighbors_, initial)  # no refresh: the pretrained sets stay
    assert frozen.history_["refresh_overlap"] == []


def test_deterministic_under_a_seed(digits_xy):
    x, _ = digits_xy
    opts = {"epochs": 3, "refresh_every": 2}
    a = get_method("icbpl")(10, opts).fit(x, FitContext(seed=5, progress=False))
    b = get_method("icbpl")(10, opts).fit(x, FitContext(seed=5, progress=False))
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.predict_proba(x[:50]), b.predict_proba(x[:50]))
    c = get_method("icbpl")(10, opts).fit(x, FitContext(seed=6, progress=False))
    assert not np.array_equal(a.predict_proba(x[:50]), c.predict_proba(x[:50]))


def test_state_dict_round_trip(fitted, digits_xy):
    x, _ = digits_xy
    state = fitted.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "centroids" in state
    m2 = get_method("icbpl")(10, FAST)
    m2.load_state_dict(state)
    np.testing.assert_array_equal(m2.predict_proba(x), fitted.predict_proba(x))
    with pytest.raises(InputError):
        get_method("icbpl")(9, FAST).load_state_dict(state)
    with pytest.raises(InputError):
        get_method("icbpl")(10, {**FAST, "finetune": "last_blocks"}).load_state_dict(state)  # no backbone tensors


def test_estimator_fit_save_load_predict(tmp_path):
    est = ImageClusterer(n_clusters=10, method="icbpl", backbone="pixels", image_size=8, progress=False,
                         cache_dir=str(tmp_path / "cache"), method_options={"epochs": 15})
    labels = est.fit_predict("digits")
    from sklearn.datasets import load_digits

    y = load_digits().target
    assert cluster_acc(y, labels) > 0.5
    est.save(tmp_path / "model")
    loaded = ImageClusterer.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict("digits"), labels)
    np.testing.assert_array_equal(loaded.predict_proba("digits"), est.predict_proba("digits"))
    assert list((tmp_path / "cache" / "pedcc").glob("pedcc-K10-d60-simplex-*.npy"))  # PEDCC cached per (K, d)


def test_view_bank_of_augmented_images_is_built_once_and_reused(tmp_path):
    opts = {"epochs": 4, "aug": "views", "views": 2}
    est = ImageClusterer(n_clusters=10, method="icbpl", backbone="pixels", image_size=8, progress=False,
                         cache_dir=str(tmp_path), method_options=opts)
    labels = est.fit_predict("digits")
    info = est.model_.history_["view_bank"]
    assert info["cache"] == "written"
    bank = np.load(info["path"])
    assert bank.shape == (2, 1797, 192)
    feats = np.asarray(est.feature_set_.features)
    assert not np.allclose(bank[0], feats) and not np.allclose(bank[0], bank[1])  # real, distinct views
    again = ImageClusterer(n_clusters=10, method="icbpl", backbone="pixels", image_size=8, progress=False,
                           cache_dir=str(tmp_path), method_options=opts)
    np.testing.assert_array_equal(again.fit_predict("digits"), labels)
    assert again.model_.history_["view_bank"]["cache"] == "hit"
    with pytest.raises(InputError, match="needs the images"):
        get_method("icbpl")(10, opts).fit(feats, FitContext(progress=False))


def test_finetuning_last_blocks_predicts_new_images_after_save_and_load(tmp_path):
    """EfficientNet-Lite0 at 32 px on 60 digits: its last two blocks train, and the saved model
    classifies images through the fine-tuned copy (the estimator's image-level path)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images[:60] * 16).clip(0, 255).astype(np.uint8)
    opts = {"finetune": "last_blocks", "epochs": 2, "batch_size": 20, "image_size": 32, "refresh_every": 1}
    est = ImageClusterer(n_clusters=3, method="icbpl", image_size=32, progress=False,
                         cache_dir=str(tmp_path / "cache"), method_options=opts)
    torch.manual_seed(0)
    labels = est.fit_predict(imgs)
    m = est.model_
    assert m.image_level and len(m.history_["refresh_overlap"]) == 1
    tuned = m.state_dict()
    names = [k for k in tuned if k.startswith("backbone.")]
    assert names and all(".net._blocks.14." in f".{k}" or ".net._blocks.15." in f".{k}" or "_conv_head" in k
                         or "_bn1" in k for k in names)
    pre = dict(est.get_backbone().named_parameters())
    changed = [k for k in names if not torch.equal(tuned[k], pre[k[len("backbone."):]])]
    assert changed  # the backbone really moved
    np.testing.assert_array_equal(est.predict(imgs), labels)
    est.save(tmp_path / "model")
    loaded = ImageClusterer.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict(imgs), labels)
    with pytest.raises(InputError, match="needs images"):
        loaded.predict(np.zeros((2, 1280), np.float32))
    with pytest.raises(InputError, match="no parameters to fine-tune"):
        ImageClusterer(n_clusters=3, method="icbpl", backbone="pixels", image_size=8, progress=False,
                       cache_dir=str(tmp_path / "cache"), method_options={"finetune": "all"}).fit(imgs)
