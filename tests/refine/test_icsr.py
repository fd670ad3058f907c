"""ICSR: sample ranking inside clusters (Algorithm 1), the weight schedule (Eq. 11), and refining a model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from imgclust.errors import InputError
from imgclust.refine.icsr import ICSRConfig, NoiseViews, percents_at, schedule_t, train_icsr
from imgclust.refine.ranking import group_weights, k_values, m_scores, rank_samples, success_rate, vote_groups
from imgclust.run import refine_model


def _signal_and_noise(metric: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One cluster: 240 dense "signal" points around one centre, 60 "noise" points scattered widely."""
    rng = np.random.default_rng(seed)
    d = 8
    centre = np.full(d, 3.0)
    signal = centre + 0.3 * rng.normal(size=(240, d))
    noise = rng.uniform(-6, 6, size=(60, d))
    if metric == "kl":  # probability vectors: peaked on class 0 vs spread over the classes
        signal = np.abs(rng.normal(size=(240, d))) * 0.05
        signal[:, 0] += 1.0
        noise = rng.dirichlet(np.ones(d), size=60)
        signal /= signal.sum(1, keepdims=True)
    x = np.concatenate([signal, noise]).astype(np.float32)
    is_signal = np.r_[np.ones(240, bool), np.zeros(60, bool)]
    perm = rng.permutation(len(x))
    return x[perm], is_signal[perm]


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "kl"])
def test_dense_signal_ranks_in_the_first_groups(metric: str) -> None:
    x, is_signal = _signal_and_noise(metric)
    r = rank_samples(x, np.zeros(len(x), np.int64), 1, metric=metric)
    assert r.n_groups == 5 and r.n_lists[0] == len(k_values(300))
    # groups 1-3 hold the top 55 % = 165 samples: all signal
    assert is_signal[r.group <= 2].all() and (r.group <= 2).sum() == 165
    # the noise ends in the last groups (4, 5, or none): ranked behind the signal
    assert (r.group[~is_signal] >= 3).mean() >= 0.9
    assert r.order[~is_signal].min() > np.sort(r.order[is_signal])[int(0.7 * 240)]
    # R_sr(p) (Eq. 15): 1.0 at the top, never above it and not below the purity
    truth = np.where(is_signal, 0, 1)
    sr = success_rate(r, np.zeros(len(x)), truth, 1)
    assert sr["mean_rsr"]["20"] == 1.0 and sr["mean_rsr"]["60"] == 1.0
    assert sr["mean_purity"] == pytest.approx(0.8) and sr["mean_rsr"]["80"] >= 0.8


def test_random_ranking_gives_purity_not_signal() -> None:
    """A check that the test above can fail: with noise as dense as the signal, the top is not clean."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    truth = (np.arange(300) >= 240).astype(int)  # "signal" is an arbitrary 80 %
    r = rank_samples(x, np.zeros(300, np.int64), 1)
    assert success_rate(r, np.zeros(300), truth, 1)["mean_rsr"]["20"] < 0.95


def test_m_scores_match_brute_force_and_blocks() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 5))
    ks = np.array([3, 8, 12])
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    near = np.sort(d, 1)
    want = np.stack([near[:, :k].mean(1) + near[:, (k - 1) // 2] for k in ks], 1)  # mean + lower median
    got_one = m_scores(x, ks, block_rows=1000).numpy()
    got_blocks = m_scores(x, ks, block_rows=4).numpy()
    np.testing.assert_allclose(got_one, want, rtol=1e-10)
    np.testing.assert_allclose(got_blocks, got_one, rtol=0, atol=0)
    cos = m_scores(x, ks, metric="cosine").numpy()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dc = 1 - xn @ xn.T
    np.fill_diagonal(dc, np.inf)
    nc = np.sort(dc, 1)
    np.testing.assert_allclose(cos[:, 0], nc[:, :3].mean(1) + nc[:, 1], atol=1e-10)


def test_k_values_and_vote_group_sizes() -> None:
    np.testing.assert_array_equal(k_values(300), np.arange(100, 201, 5))  # N_c/3 .. 2N_c/3, step 5
    assert len(k_values(1)) == 0 and list(k_values(2)) == [1]
    scores = torch.from_numpy(np.random.default_rng(0).random((101, 7)))
    group, order = vote_groups(scores, [15, 35, 55, 75, 95])
    # group j = the ceil(p_j N) most-voted samples minus earlier groups (the top sets need not nest)
    sizes = np.bincount(group, minlength=6)
    assert sizes[0] == 16
    assert (np.cumsum(sizes[:5]) >= [16, 36, 56, 76, 96]).all() and sizes[5] <= 5
    assert sorted(order.tolist()) == list(range(101))
    assert (np.diff(group[np.argsort(order)]) >= 0).all()  # the order follows the groups
    g1, _ = vote_groups(torch.zeros((1, 0)), [15, 95])  # a one-sample cluster is trusted
    assert g1.tolist() == [0]


def test_weight_schedule_is_eq_11() -> None:
    m, beta0 = 5, 0.02
    for t in (0, 1, 10, 100, 239):
        w = group_weights(m, t, beta0)
        assert w[-1] == 0.0 and len(w) == m + 1  # samples in no group
        w = w[:m]
        assert w[0] == 1.0
        assert (np.diff(w) < 0).all()  # strictly decreasing in i
        assert (w <= 1.0).all() and (w > 0).all()
        i = np.arange(1, m + 1)
        np.testing.assert_allclose(w, 1 - ((i - 1) / m) ** ((1 + t) * beta0))
    ws = np.array([group_weights(m, t, beta0)[:m] for t in range(0, 300, 7)])
    assert (ws[:, 0] == 1).all() and (np.diff(ws[:, 1:], axis=0) > 0).all()  # increasing in t (i > 1)
    assert (ws <= 1).all()
    with pytest.raises(InputError):
        group_weights(5, 0, 0.0)


def test_schedule_is_stretched_to_the_papers_240_epochs() -> None:
    cfg = ICSRConfig(epochs=60)
    assert schedule_t(cfg, 0) == 0 and schedule_t(cfg, 59) == 236
    assert percents_at(cfg, 0) == [15, 35, 55, 75, 95]
    assert percents_at(cfg, 59) == [19, 39, 59, 79, 99]  # +1 point per 50 paper epochs
    assert schedule_t(ICSRConfig(epochs=240), 100) == 100  # schedule_epochs = epochs: Eq. 11 literally


def test_config_validation() -> None:
    with pytest.raises(InputError, match="metric"):
        ICSRConfig(metric="manhattan")
    with pytest.raises(InputError, match="percents"):
        ICSRConfig(percents=[50, 20])
    with pytest.raises(InputError, match="views"):
        ICSRConfig(views="mixup")
    with pytest.raises(InputError, match="k_start"):
        ICSRConfig(k_start=0.8, k_stop=0.5)
    with pytest.raises(InputError, match="mode"):
        ICSRConfig(mode="gpu")
    with pytest.raises(InputError, match="finetune"):
        ICSRConfig(finetune="head")
    with pytest.raises(InputError, match="e2e_epochs"):
        ICSRConfig(e2e_epochs=0)
    with pytest.raises(InputError, match="clip_grad"):
        ICSRConfig(clip_grad=-1.0)


def test_noise_views_weak_is_identity_strong_is_perturbed() -> None:
    x = torch.randn(50, 6) * 3 + 1
    v = NoiseViews(x, noise_std=0.5, dropout=0.2)
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(10)
    assert torch.equal(v.sample("weak", idx, g), x[:10])
    s = v.sample("strong", idx, g)
    assert s.shape == (10, 6) and not torch.allclose(s, x[:10])


def test_train_icsr_deterministic_and_records_diagnostics() -> None:
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(y)) < 0.25, rng.integers(0, 10, len(y)), y)
    p0 = np.eye(10, dtype=np.float32)[noisy]
    cfg = ICSRConfig(epochs=12, first_refresh=4, rank_every=4, views="none", rank_on="features")
    a = train_icsr(x, p0, 10, cfg, truth=y, seed=3)
    b = train_icsr(x, p0, 10, cfg, truth=y, seed=3)
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight)
    h = a.history
    assert [r["epoch"] for r in h["rankings"]] == [0, 4, 8]
    assert len(h["loss"]) == 12 and h["weights"][0][0] == 1.0
    first = h["rsr_first"]["mean_rsr"]
    assert first["20"] > h["rsr_first"]["mean_purity"] + 0.05  # the top of each cluster is cleaner
    # trained on 75 %-correct labels, weighted by the ranking: the head is more accurate than its labels
    assert (a.classifier.predict_proba(x).argmax(1) == y).mean() > 0.85


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from imgclust.api import cluster
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig

    root = tmp_path_factory.mktemp("icsr")
    cfg = RunConfig(k=10, method="kmeans", source=SourceConfig(path="digits"),
                    backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(root / "cache")), report=False)
    base = cluster(cfg, root / "base", progress=False)
    ref = refine_model(root / "base", None, root / "refined", progress=False)
    return {"root": root, "base": base, "refined": ref}


def test_refine_digits_keeps_or_improves_kmeans_and_predicts(digits_run: dict) -> None:
    from imgclust.api import ImageClusterer

    root, base, ref = digits_run["root"], digits_run["base"], digits_run["refined"]
    m = ref["metrics"]
    assert m["base"]["acc"] == pytest.approx(base["metrics"]["acc"])  # the saved base model, re-applied
    assert m["acc"] >= m["base"]["acc"]
    assert ref["config"]["method"] == "icsr" and ref["config"]["method_options"]["base"] == "kmeans"
    diag = json.loads((root / "refined" / "icsr.json").read_text())
    after = diag["rsr_after"]["mean_rsr"]
    assert after["20"] >= after["80"] and after["20"] > diag["rsr_after"]["mean_purity"]
    with open(root / "refined" / "assignments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1797 and {"cluster", "base_cluster", "label"} <= set(rows[0])
    est = ImageClusterer.load(root / "refined" / "model", progress=False)
    assert est.method == "icsr"
    pred = est.predict("digits")
    np.testing.assert_array_equal(pred, [int(r["cluster"]) for r in rows])


def test_refine_cli_and_cluster_method(digits_run: dict) -> None:
    from typer.testing import CliRunner

    from imgclust.api import ImageClusterer
    from imgclust.cli import app

    root = digits_run["root"]
    res = CliRunner().invoke(app, ["refine", str(root / "base"), "digits", "--out", str(root / "cli"), "-q",
                                   "--option", "epochs=4", "--option", "first_refresh=2"])
    assert res.exit_code == 0, res.output
    assert "ACC" in res.output and "->" in res.output and (root / "cli" / "model" / "model.json").is_file()
    bad = CliRunner().invoke(app, ["refine", str(root / "base"), "--out", str(root / "bad"), "-q",
                                   "--option", "metric=l1"])
    assert bad.exit_code != 0
    # `cluster --method icsr`: base method fitted, then refined, in one fit
    x = load_digits().data.astype(np.float32)
    est = ImageClusterer(n_clusters=10, method="icsr", method_options={"epochs": 4, "first_refresh": 2},
                         progress=False).fit(x)
    assert est.labels_.shape == (1797,) and est.model_.history_["base"]["method"] == "kmeans"


def test_icsr_with_the_view_bank(tmp_path) -> None:
    """views=bank: weak views give the pseudo-labels, strong views are trained on (augmented images)."""
    from imgclust.api import ImageClusterer

    opts = {"views": "bank", "n_views": 1, "epochs": 3, "first_refresh": 1}
    est = ImageClusterer(n_clusters=10, method="icsr", backbone="pixels", image_size=8, method_options=opts,
                         cache_dir=str(tmp_path), progress=False).fit("digits")
    h = est.model_.history_
    assert h["views"]["mode"] == "bank" and h["views"]["n_views"] == 1
    assert len(h["rankings"]) == 3 and "rsr_last" in h  # digits' labels reach the diagnostics
    with pytest.raises(InputError, match="PCA"):
        ImageClusterer(n_clusters=10, method="icsr", backbone="pixels", image_size=8, method_options=opts, pca=16,
                       cache_dir=str(tmp_path), progress=False).fit("digits")


# --------------------------------------------------------------------------- end-to-end mode
E2E = {"mode": "end_to_end", "finetune": "last_blocks", "epochs": 15, "e2e_epochs": 2, "e2e_batch_size": 30,
       "min_steps": 0, "k_step": 3}


def _digit_images(n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images[:n] * 16).clip(0, 255).astype(np.uint8), d.target[:n]


def test_end_to_end_tunes_the_backbone_and_predicts_images_after_save_and_load(tmp_path) -> None:
    """EfficientNet-Lite0 at 32 px on 90 digits (CPU): the head stage, then the last two blocks and
    the head train on augmented images; the saved model classifies images through the tuned copy."""
    import warnings

    from imgclust import ImageClusterer

    imgs, _ = _digit_images()
    est = ImageClusterer(n_clusters=5, method="icsr", image_size=32, progress=False, cache_dir=str(tmp_path / "c"),
                         method_options=E2E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "slow on a CPU"
        labels = est.fit_predict(imgs)
    m = est.model_
    h = m.history_
    assert m.image_level and len(h["loss"]) == 2 and all(np.isfinite(h["loss"]))
    assert h["finetune"] == "last_blocks" and h["image_size"] == 32 and h["finetune_params"] > 0
    assert len(h["head_stage"]["loss"]) == 15  # the head stage ran first
    assert [r["epoch"] for r in h["rankings"]] == [0, 1]  # ranked at the start and re-ranked after epoch 1
    tuned = m.state_dict()
    names = [k for k in tuned if k.startswith("backbone.")]
    assert names and all("_blocks.14." in k or "_blocks.15." in k or "_conv_head" in k or "_bn1" in k for k in names)
    pre = dict(est.get_backbone().named_parameters())
    assert any(not torch.equal(tuned[k], pre[k[len("backbone."):]]) for k in names)  # the backbone really moved
    assert not any(p.requires_grad for p in est.get_backbone().parameters())  # the estimator's stays frozen
    np.testing.assert_array_equal(labels, m.fit_proba_.argmax(1))
    np.testing.assert_array_equal(est.predict(imgs), labels)  # through the tuned network, not the frozen features
    est.save(tmp_path / "model")
    loaded = ImageClusterer.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.predict_proba(imgs), est.predict_proba(imgs), atol=1e-5)
    with pytest.raises(InputError, match="needs images"):
        loaded.predict(np.zeros((2, 1280), np.float32))
    state = {k: v for k, v in tuned.items() if not k.startswith("backbone.")}
    with pytest.raises(InputError, match="no backbone parameters"):
        type(m)(5, m.config.to_dict()).load_state_dict(state)


def test_end_to_end_resumes_from_its_checkpoint(tmp_path, monkeypatch) -> None:
    """Killed after the first end-to-end epoch, a re-run resumes from the checkpoint and ends where
    an uninterrupted run ends."""
    import warnings

    from imgclust import ImageClusterer
    from imgclust.train.checkpoint import Checkpoint

    imgs, _ = _digit_images(60)
    opts = {**E2E, "epochs": 5}

    def run(cache: str) -> ImageClusterer:
        est = ImageClusterer(n_clusters=3, method="icsr", image_size=32, progress=False, cache_dir=cache,
                             method_options=opts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(imgs)
        return est

    whole = run(str(tmp_path / "a"))
    save = Checkpoint.save

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "b"))
    monkeypatch.setattr(Checkpoint, "save", save)
    assert list((tmp_path / "b").rglob("icsr-e2e-ckpt-*.pt"))
    resumed = run(str(tmp_path / "b"))
    assert resumed.model_.history_["resumed_at"] == 1 and "resumed_at" not in whole.model_.history_
    assert resumed.model_.history_["loss"] == whole.model_.history_["loss"]
    for k, v in whole.model_.state_dict().items():
        torch.testing.assert_close(resumed.model_.state_dict()[k], v)
    np.testing.assert_array_equal(resumed.labels_, whole.labels_)


def test_end_to_end_needs_images_and_trainable_backbone(tmp_path) -> None:
    from imgclust import ImageClusterer
    from imgclust.methods import FitContext, get_method

    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    with pytest.raises(InputError, match="needs the images"):
        get_method("icsr")(3, {**E2E, "epochs": 2}).fit(x, FitContext(progress=False))
    imgs, _ = _digit_images(40)
    with pytest.raises(InputError, match="no parameters to fine-tune"):
        ImageClusterer(n_clusters=3, method="icsr", backbone="pixels", image_size=8, progress=False,
                       cache_dir=str(tmp_path), method_options={**E2E, "epochs": 2}).fit(imgs)


def test_refine_a_model_that_classifies_images(tmp_path) -> None:
    """A from-scratch network (cc, image-level) is refined too: its own predictions of the images are
    the base clusters; ICSR's head is trained on the estimator's features."""
    from imgclust import ImageClusterer
    from imgclust.run import refine_estimator

    imgs, y = _digit_images(120)
    est = ImageClusterer(n_clusters=10, method="cc", backbone="pixels", image_size=16, progress=False,
                         cache_dir=str(tmp_path), method_options={"image_size": 16, "epochs": 2, "batch_size": 40})
    base = est.fit_predict(imgs)
    new = refine_estimator(est, imgs, {"epochs": 5}, truth=y)
    np.testing.assert_array_equal(new.base_labels_, base)
    assert new.method == "icsr" and not new.model_.image_level
    assert new.model_.history_["base"]["method"] == "cc" and "rsr_first" in new.model_.history_
    np.testing.assert_array_equal(new.predict(imgs), new.labels_)
    with pytest.raises(InputError, match="refine it on images"):
        refine_estimator(est, np.zeros((5, 768), np.float32))


def test_refine_cli_end_to_end_writes_a_model_that_predict_uses(tmp_path) -> None:
    """`imgclust refine RUN --option mode=end_to_end` (CPU, 32 px, 90 digits): the run's assignments
    are the tuned network's, and `imgclust predict` on the refined model reproduces them."""
    from typer.testing import CliRunner

    from imgclust.api import cluster
    from imgclust.cli import app
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig

    cfg = RunConfig(k=5, method="kmeans", source=SourceConfig(path="digits", limit=90),
                    backbone=BackboneConfig(name="efficientnet-lite0", image_size=32),
                    features=FeatureConfig(cache_dir=str(tmp_path / "cache")), report=False)
    cluster(cfg, tmp_path / "base", progress=False)
    opts = [f"{k}={v}" for k, v in {**E2E, "epochs": 5}.items()]
    res = CliRunner().invoke(app, ["refine", str(tmp_path / "base"), "--out", str(tmp_path / "e2e"), "-q",
                                   "--device", "cpu", *sum((["--option", o] for o in opts), [])])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "e2e" / "run.json").read_text())
    assert run["config"]["method_options"]["mode"] == "end_to_end" and run["n_clustered"] == 90
    diag = json.loads((tmp_path / "e2e" / "icsr.json").read_text())
    assert diag["history"]["finetune_params"] > 0 and diag["rsr_after"] is not None
    with open(tmp_path / "e2e" / "assignments.csv", newline="") as f:
        rows = {r["id"]: int(r["cluster"]) for r in csv.DictReader(f)}
    pred = CliRunner().invoke(app, ["predict", str(tmp_path / "e2e"), "digits", "-q",
                                    "--out", str(tmp_path / "pred.csv")])
    assert pred.exit_code == 0, pred.output
    with open(tmp_path / "pred.csv", newline="") as f:
        got = {r["id"]: int(r["cluster"]) for r in csv.DictReader(f)}
    assert len(got) == 1797 and all(got[i] == c for i, c in rows.items())
