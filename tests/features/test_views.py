"""The view bank (cached, deterministic, resumable) and the on-the-fly / identity view providers."""

import json
import warnings

import numpy as np
import pytest
import torch

from imgclust.backbones import build_backbone
from imgclust.backbones.base import Backbone, Preprocess
from imgclust.data.base import ArraySource
from imgclust.errors import InputError
from imgclust.methods import FitContext, get_method
from imgclust.views import BankViews, OnlineViews, build_view_bank, make_feature_views


@pytest.fixture(scope="module")
def digits_source():
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images[:60] * (255 / 16)).astype(np.uint8)
    return ArraySource(imgs, d.target[:60], name="digits60")


@pytest.fixture(scope="module")
def pixels():
    return build_backbone("pixels", image_size=8)


def _base(source, backbone):
    from imgclust.features import extract_features

    return np.asarray(extract_features(source, backbone, use_cache=False, progress=False).features)


def test_bank_shapes_cache_and_determinism(tmp_path, digits_source, pixels):
    bank = build_view_bank(digits_source, pixels, tmp_path, n_views=2, seed=0, progress=False, chunk_rows=16)
    assert bank.n_views == 2 and all(a.shape == (60, 192) for a in bank.weak + bank.strong)
    assert sorted(bank.info["computed"]) == ["strong-0", "strong-1", "weak-0", "weak-1"]
    base = _base(digits_source, pixels)
    for a in bank.weak + bank.strong:
        assert not np.allclose(a, base)  # views are augmented
    assert not np.allclose(bank.weak[0], bank.weak[1])
    again = build_view_bank(digits_source, pixels, tmp_path, n_views=2, seed=0, progress=False)
    assert sorted(again.info["cached"]) == sorted(bank.info["computed"]) and not again.info["computed"]
    # View v of an image does not depend on V; another directory recomputes identical views.
    one = build_view_bank(digits_source, pixels, tmp_path / "other", n_views=1, seed=0, progress=False)
    np.testing.assert_array_equal(one.weak[0], bank.weak[0])
    np.testing.assert_array_equal(one.strong[0], bank.strong[0])
    other_seed = build_view_bank(digits_source, pixels, None, n_views=1, seed=1, progress=False)
    assert not np.allclose(other_seed.weak[0], bank.weak[0])
    assert bank.path is not None and bank.path.parent == tmp_path


def test_bank_resumes_an_interrupted_view(tmp_path, digits_source, pixels):
    bank = build_view_bank(digits_source, pixels, tmp_path, n_views=1, seed=0, progress=False, chunk_rows=16, batch_size=16)
    want = np.array(bank.strong[0])
    entry = bank.path / "strong-0"
    # Simulate a run killed after two chunks: no meta.json, progress claims 32 rows, the rest garbage.
    (entry / "meta.json").unlink()
    prog = json.loads((entry / "progress.json").read_text())
    prog["chunks"], prog["done"] = prog["chunks"][:2], prog["chunks"][1][1]
    (entry / "progress.json").write_text(json.dumps(prog))
    mm = np.load(entry / "features.npy", mmap_mode="r+")
    mm[32:] = -1.0
    mm.flush()
    del mm
    again = build_view_bank(digits_source, pixels, tmp_path, n_views=1, seed=0, progress=False, chunk_rows=16, batch_size=16)
    assert "strong-0" in again.info["computed"] and "weak-0" in again.info["cached"]
    np.testing.assert_array_equal(np.asarray(again.strong[0]), want)


def test_bank_views_sample_one_of_the_stored_views(tmp_path, digits_source, pixels):
    rows = np.arange(0, 60, 2)
    base = torch.from_numpy(_base(digits_source, pixels)[rows])
    ctx = FitContext(seed=0, progress=False, work_dir=tmp_path,
                     source=digits_source, backbone=pixels, rows=rows)
    views = make_feature_views(base, ctx, mode="bank", n_views=2)
    assert isinstance(views, BankViews)
    bank = build_view_bank(digits_source, pixels, tmp_path, n_views=2, seed=0, progress=False)
    idx = torch.arange(len(rows))
    s = views.sample("weak", idx, torch.Generator().manual_seed(0)).numpy()
    for i, r in enumerate(rows):
        assert any(np.allclose(s[i], v[r], atol=0.05) for v in bank.weak)  # float16 in RAM


def test_online_views_are_fresh_and_seeded(digits_source, pixels):
    rows = np.arange(60)
    base = torch.from_numpy(_base(digits_source, pixels))
    ov = OnlineViews(base, digits_source, pixels, rows, spec=__import__("imgclust.data.augment").data.augment.AugmentSpec(),
                     image_size=None)
    idx = torch.arange(10)
    a = ov.sample("strong", idx, torch.Generator().manual_seed(0))
    b = ov.sample("strong", idx, torch.Generator().manual_seed(0))
    assert a.shape == (10, 192) and torch.equal(a, b)
    assert not torch.allclose(a, base[:10])


def test_auto_mode_without_images_warns_and_uses_plain_features():
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        v = make_feature_views(x, FitContext(progress=False), mode="auto")
    assert v.mode == "none" and any("views=none" in str(m.message) for m in w)
    assert torch.equal(v.sample("strong", torch.tensor([3, 1]), torch.Generator()), torch.from_numpy(x[[3, 1]]))
    with pytest.raises(InputError):
        make_feature_views(x, FitContext(progress=False), mode="bank")


def test_views_refuse_pca_reduced_features(digits_source, pixels):
    ctx = FitContext(progress=False, source=digits_source, backbone=pixels, rows=np.arange(60))
    with pytest.raises(InputError, match="PCA"):
        make_feature_views(np.zeros((60, 10), np.float32), ctx, mode="bank")


class TinyCNN(Backbone):
    """A small trainable conv net standing in for a backbone (end-to-end FixMatch on a CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.dim, self.weights_id = "tiny-cnn", 16, "random"
        self.preprocess = Preprocess(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.requires_grad_(False)

    def forward(self, x):
        return self.net(x)


def test_spice_bank_mode_and_end_to_end_mode_run_on_a_cpu(tmp_path, digits_source):
    cnn = TinyCNN()
    from imgclust.features import extract_features

    feats = np.asarray(extract_features(digits_source, cnn, use_cache=False, progress=False).features)
    ctx = FitContext(seed=0, progress=False, work_dir=tmp_path,
                     source=digits_source, backbone=cnn, rows=np.arange(60))
    opts = {"epochs": 2, "heads": 2, "hidden": 8, "pool_size": 60, "n_views": 1, "semi_steps": 5,
            "semi_batch_size": 8, "mu": 2, "reliable_neighbors": 5, "reliable_threshold": 0.5, "distill_epochs": 2,
            "semi_min_clusters": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = get_method("spice")(10, {**opts, "views": "bank"}).fit(feats, ctx)
        e2e = get_method("spice")(10, {**opts, "views": "bank", "semi_mode": "end_to_end"}).fit(feats, ctx)
    assert head.history_["views"]["mode"] == "bank" and (tmp_path / f"views-{head.history_['views']['key']}").is_dir()
    for m in (head, e2e):
        assert m.semi_ is not None and m.history_["semi"]["steps"] == 5  # FixMatch really ran
        assert m.predict_proba(feats).shape == (60, 10)
    assert 0.0 <= e2e.history_["semi"]["distilled_agreement"] <= 1.0
    assert not any(p.requires_grad for p in cnn.parameters())  # the shared backbone stays frozen
