"""PICI / CC: MAE masking, the PICD / PISD / CLI losses, fit/predict on digits, checkpoint resume."""

import numpy as np
import pytest
import torch

from imgclust import ImageClusterer
from imgclust.backbones.mae import MaskedAutoencoderViT, default_patch_size
from imgclust.errors import InputError
from imgclust.losses.pici import (
    cli_targets,
    cluster_entropy,
    cluster_loss,
    hungarian_align,
    instance_loss,
    pisd_loss,
)
from imgclust.methods import FitContext, get_method

TINY = {"image_size": 16, "vit_size": "tiny", "depth": 1, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4,
        "pretrain_epochs": 1, "train_epochs": 1, "boost_epochs": 1, "batch_size": 40}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    from imgclust.data.base import ArraySource

    d = load_digits()
    imgs = (d.images[:120] * (255 / 16)).astype(np.uint8)
    return ArraySource(imgs, d.target[:120], name="digits120"), d.target[:120]


def _vit(size: int = 16) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(size, 3, "tiny", depth=1, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def test_patch_size_follows_the_image_size():
    assert [default_patch_size(s) for s in (16, 32, 64, 224)] == [2, 4, 8, 16]
    assert _vit(32).num_patches == 64  # 32 px, patch 4 -> 8 x 8
    with pytest.raises(InputError):
        MaskedAutoencoderViT(30, 3, "tiny", patch_size=4)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_masking_keeps_exactly_the_right_number_of_patches(ratio):
    vit = _vit()
    n_patches = vit.num_patches  # 16 px, patch 2: 64
    x = torch.rand(3, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    tokens, mask, ids_restore = vit.forward_encoder(x, ratio, g)
    keep = int(n_patches * (1 - ratio))
    assert tokens.shape == (3, 1 + keep, vit.dim)
    assert mask.shape == (3, n_patches)
    assert mask.sum(dim=1).tolist() == [n_patches - keep] * 3
    assert not torch.equal(mask[0], mask[1])  # a different mask per image
    assert vit.forward_decoder(tokens, ids_restore).shape == (3, n_patches, 2 * 2 * 3)


def test_random_masking_keeps_the_unmasked_tokens_in_place():
    x = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10, 1)
    kept, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, 0.5, torch.Generator().manual_seed(0))
    for b in range(2):
        assert sorted(kept[b, :, 0].tolist()) == sorted(x[b, mask[b] == 0, 0].tolist())
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(10).expand(2, 10))


def test_no_masking_at_inference():
    vit = _vit().eval()
    x = torch.rand(4, 3, 16, 16)
    tokens, mask, _ = vit.forward_encoder(x)
    assert tokens.shape[1] == 1 + vit.num_patches and mask.sum() == 0
    with torch.no_grad():
        torch.manual_seed(1)
        a = vit(x)
        torch.manual_seed(2)
        b = vit(x)
    torch.testing.assert_close(a, b)  # no randomness left at inference
    torch.testing.assert_close(a, tokens[:, 0].detach())


def test_pisd_counts_only_the_masked_patches():
    target = torch.rand(2, 8, 12)
    mask = torch.zeros(2, 8)
    mask[:, :4] = 1
    pred = target.clone()
    pred[:, 4:] += 5.0  # wrong only on visible patches
    assert pisd_loss(pred, target, mask) == 0
    pred[:, :4] += 1.0
    assert pisd_loss(pred, target, mask).item() == pytest.approx(1.0)


def test_instance_loss_is_lower_for_matched_views_than_shuffled():
    g = torch.Generator().manual_seed(0)
    za = torch.randn(64, 128, generator=g)
    zb = za + 0.3 * torch.randn(64, 128, generator=g)
    shuffled = zb[torch.randperm(64, generator=g)]
    assert instance_loss(za, zb, 0.5) < instance_loss(za, shuffled, 0.5) - 1.0


def test_cluster_loss_prefers_distinct_balanced_clusters():
    eye = torch.eye(5).repeat(8, 1)  # 40 samples, confidently and evenly spread over 5 clusters
    collapsed = torch.zeros(40, 5)
    collapsed[:, 0] = 1.0
    assert cluster_entropy(eye, eye).item() == pytest.approx(2 * np.log(5), rel=1e-5)
    assert cluster_entropy(collapsed, collapsed).item() == pytest.approx(0.0, abs=1e-5)
    assert cluster_loss(eye, eye).loss < cluster_loss(collapsed, collapsed).loss


def test_hungarian_alignment_maps_a_permuted_labelling_back_to_identity():
    rng = np.random.default_rng(0)
    anchor = rng.integers(0, 10, 500)
    perm = rng.permutation(10)
    np.testing.assert_array_equal(hungarian_align(perm[anchor], anchor, 10), anchor)
    noisy = perm[anchor].copy()
    noisy[:40] = rng.integers(0, 10, 40)  # a few disagreements do not change the map
    np.testing.assert_array_equal(hungarian_align(noisy, anchor, 10)[40:], anchor[40:])


def test_cli_targets_are_the_kmeans_clusters_named_after_the_cluster_head():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(4, 16, generator=g)
    truth = torch.arange(60) % 4
    z = centres[truth] + 0.1 * torch.randn(60, 16, generator=g)
    head_names = torch.tensor([2, 0, 3, 1])
    c = torch.full((60, 4), 0.1)
    c[torch.arange(60), head_names[truth]] = 0.7
    np.testing.assert_array_equal(cli_targets(z, c, seed=3).numpy(), head_names[truth].numpy())


def test_config_validation():
    for bad in ({"mask_ratio": 0.0}, {"vit_size": "huge"}, {"batch_size": 1}, {"tau_i": 0},
                {"image_size": 30, "patch_size": 4}, {"train_epochs": -1}):
        with pytest.raises(InputError):
            get_method("pici")(10, bad)
    with pytest.raises(InputError):
        get_method("cc")(10, {"encoder": "vgg"})


def _fit(name, opts, src, y, work_dir):
    m = get_method(name)(10, opts)
    ctx = FitContext(seed=0, progress=False, work_dir=work_dir,
                     source=src, rows=np.arange(len(src)), truth=y)
    return m.fit(np.zeros((len(src), 2), np.float32), ctx)


def test_pici_three_stages_checkpoint_and_resume(digits, tmp_path):
    src, y = digits
    fresh = _fit("pici", TINY, src, y, tmp_path / "a")
    stages = fresh.history_["stages"]
    assert [stages[s]["epochs_run"] for s in ("pretrain", "train", "boost")] == [1, 1, 1]
    assert "pisd" in stages["pretrain"] and "instance" not in stages["pretrain"]
    assert {"pisd", "instance", "cluster"} <= set(stages["train"]) and "cli" in stages["boost"]
    assert "pisd" not in stages["boost"]  # the decoder rests while boosting
    assert set(stages["train"]["metrics"]) == {"kmeans", "head"}
    assert stages["boost"]["images_per_s"][0] > 0
    assert fresh.fit_proba_.shape == (120, 10)
    np.testing.assert_allclose(fresh.fit_proba_.sum(axis=1), 1.0, rtol=1e-5)

    # interrupted after two stages, then re-run with the full schedule: resumes, same result
    part = _fit("pici", {**TINY, "boost_epochs": 0}, src, y, tmp_path / "b")
    assert part.history_["stages"]["boost"]["epochs_run"] == 0
    assert list((tmp_path / "b").glob("pici-*-ckpt-*.pt"))
    resumed = _fit("pici", TINY, src, y, tmp_path / "b")
    assert resumed.history_["resumed_from"] == {"done": [1, 1, 0]}
    assert [resumed.history_["stages"][s]["epochs_run"] for s in ("pretrain", "train", "boost")] == [1, 1, 1]
    np.testing.assert_allclose(resumed.fit_proba_, fresh.fit_proba_, atol=1e-5)


def test_pici_batch_kmeans_boosting_and_norm_pix(digits, tmp_path):
    src, y = digits
    m = _fit("pici", {**TINY, "cli_kmeans": "batch", "norm_pix_loss": True, "projector_bn": True, "pretrain_epochs": 0}, src, y, None)
    assert m.history_["stages"]["boost"]["cli"][0] > 0 and m.history_["checkpoint"] is None
    assert "pretrain" not in m.stage_labels_


def test_cc_trains_a_cnn_without_decoder(digits, tmp_path):
    src, y = digits
    m = _fit("cc", {"image_size": 16, "epochs": 2, "batch_size": 40}, src, y, tmp_path)
    st = m.history_["stages"]["train"]
    assert st["epochs_run"] == 2 and "pisd" not in st and st["instance"][1] < st["instance"][0]
    assert m.fit_proba_.shape == (120, 10)


def test_estimator_fit_predict_save_load(digits, tmp_path):
    src, _ = digits
    est = ImageClusterer(n_clusters=10, method="pici", backbone="pixels", image_size=16, progress=False,
                         cache_dir=tmp_path / "cache", method_options={**TINY, "boost_epochs": 0})
    labels = est.fit_predict(src)
    assert labels.shape == (120,) and labels.min() >= 0
    np.testing.assert_array_equal(est.predict(src), labels)  # unmasked inference: deterministic
    est.save(tmp_path / "model")
    loaded = ImageClusterer.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.predict_proba(src), est.predict_proba(src), atol=1e-6)
    with pytest.raises(InputError):
        est.predict(np.zeros((3, 5), np.float32))  # image-level model: not from features
