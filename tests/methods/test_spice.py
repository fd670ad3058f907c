"""SPICE: prototype pseudo-labels, DS-CE, local consistency, FixMatch masking, and the two recipes end to end."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgclust import ImageClusterer
from imgclust.errors import InputError
from imgclust.heads.spice import MultiHeadMLP
from imgclust.losses.spice import (
    cluster_loss,
    double_softmax_ce,
    dsce_bounds,
    prototype_pseudo_labels,
    prototypes,
)
from imgclust.methods import FitContext, get_method
from imgclust.metrics import cluster_acc
from imgclust.refine.fixmatch import fixmatch_loss, local_consistency, select_reliable


# --------------------------------------------------------------------------- pseudo-labels
def _hand_made_pool():
    """3 clusters of 4 points on the unit circle (angles 0, 120, 240 deg +- small spread)."""
    angles = np.concatenate([np.deg2rad(c + np.array([-6, -2, 2, 6])) for c in (0, 120, 240)])
    emb = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    truth = np.repeat(np.arange(3), 4)
    # Predictions: the two central points of each cluster are confident for it; the rest
    # (outer points) are *wrongly* predicted as the next cluster, with low confidence.
    probs = torch.full((12, 3), 0.1)
    for i in range(12):
        c = truth[i]
        if i % 4 in (1, 2):
            probs[i, c] = 0.8
        else:
            probs[i, (c + 1) % 3] = 0.5
            probs[i, c] = 0.4
    return emb, probs[None], truth


def test_prototype_labelling_gives_the_right_samples_the_right_labels():
    emb, probs, truth = _hand_made_pool()
    # n_t = r M / k = 0.5 * 12 / 3 = 2 confident samples per cluster; n = M / k = 4 labelled.
    gamma = prototypes(probs, emb, ratio=0.5)
    assert gamma.shape == (1, 3, 2)
    expected = torch.stack([emb[4 * c + 1:4 * c + 3].mean(0) for c in range(3)])
    assert torch.allclose(gamma[0], expected, atol=1e-6)
    idx, lab = prototype_pseudo_labels(probs, emb, ratio=0.5, overlap=True)
    assert idx.shape == lab.shape == (1, 12)
    for c in range(3):
        chosen = set(idx[0, lab[0] == c].tolist())
        assert chosen == set(range(4 * c, 4 * c + 4))  # the outer, mispredicted points too
    # Labels follow the prototypes, not the (wrong) argmax of the outer points.
    assert (truth[idx[0].numpy()] == lab[0].numpy()).all()


def test_overlap_and_non_overlap_assignment():
    # 2 tight clusters and 1 spread one: with M/k = 4 per cluster, the far prototype's
    # nearest set reaches into a neighbour when overlap is allowed.
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    probs = torch.softmax(torch.randn(4, 30, 5, generator=g) * 3, dim=-1)
    idx_o, _lab_o = prototype_pseudo_labels(probs, emb, overlap=True)
    idx_n, _lab_n = prototype_pseudo_labels(probs, emb, overlap=False, generator=g)
    assert idx_o.shape == idx_n.shape == (4, 30)
    for h in range(4):
        assert len(set(idx_n[h].tolist())) == 30  # every sample labelled exactly once
    assert any(len(set(idx_o[h].tolist())) < 30 for h in range(4))  # overlap happens on random data


# --------------------------------------------------------------------------- losses
def test_dsce_lies_within_the_papers_bounds_and_never_reaches_zero():
    k = 10
    lo, hi = dsce_bounds(k)
    assert math.isclose(lo, math.log(k - 1 + math.e) - 1) and math.isclose(hi, math.log(k - 1 + math.e))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, k, generator=g) * 5
    t = torch.randint(0, k, (5000,), generator=g)
    v = double_softmax_ce(logits, t)
    assert float(v.min()) >= lo - 1e-5 and float(v.max()) <= hi + 1e-5
    # Ideal one-hot prediction of the right class: the lower bound, still > 0 (CE would be 0).
    perfect = torch.full((1, k), -1e4)
    perfect[0, 3] = 1e4
    assert math.isclose(float(double_softmax_ce(perfect, torch.tensor([3]))), lo, rel_tol=1e-5)
    assert float(F.cross_entropy(perfect, torch.tensor([3]))) == 0.0
    wrong = float(double_softmax_ce(perfect, torch.tensor([4])))
    assert math.isclose(wrong, hi, rel_tol=1e-5)
    # The definition: -log softmax(softmax(z))
    p = torch.softmax(logits[:3], -1)
    manual = -torch.log(torch.exp(p) / torch.exp(p).sum(-1, keepdim=True))[torch.arange(3), t[:3]]
    assert torch.allclose(v[:3], manual, atol=1e-6)


def test_ce_and_temperature_ce_variants():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 7, 4, generator=g)
    t = torch.randint(0, 4, (2, 7), generator=g)
    ce = cluster_loss(z, t, "ce")
    assert torch.allclose(ce, F.cross_entropy(z.reshape(-1, 4), t.reshape(-1), reduction="none").view(2, 7))
    tce = cluster_loss(z, t, "tce", temperature=0.2)
    assert torch.allclose(tce, F.cross_entropy(z.reshape(-1, 4) / 0.2, t.reshape(-1), reduction="none").view(2, 7))
    with pytest.raises(InputError):
        cluster_loss(z, t, "focal")


def test_batched_mlp_heads_equal_separate_mlps():
    g = torch.Generator().manual_seed(0)
    heads = MultiHeadMLP(6, 3, 4, hidden=5, generator=g)
    x = torch.randn(9, 6, generator=g)
    out = heads(x)
    per_head_in = torch.randn(4, 9, 6, generator=g)
    out2 = heads(per_head_in)
    for h in range(4):
        ref = torch.relu(x @ heads.w1[h] + heads.b1[h]) @ heads.w2[h] + heads.b2[h]
        assert torch.allclose(out[h], ref, atol=1e-5)
        assert torch.allclose(heads.forward_head(x, h), ref, atol=1e-5)
        ref2 = torch.relu(per_head_in[h] @ heads.w1[h] + heads.b1[h]) @ heads.w2[h] + heads.b2[h]
        assert torch.allclose(out2[h], ref2, atol=1e-5)


# --------------------------------------------------------------------------- local consistency
def test_local_consistency_beta_on_csr_sets():
    labels = np.array([0, 0, 0, 1, 1])
    indptr = np.array([0, 2, 4, 6, 8, 8])
    indices = np.array([1, 2, 0, 3, 0, 1, 4, 0])
    beta = local_consistency(labels, indptr, indices)
    np.testing.assert_allclose(beta, [1.0, 0.5, 1.0, 0.5, 0.0])


def test_select_reliable_keeps_consistent_samples_and_reports_empty_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=np.float32)
    truth = np.repeat(np.arange(3), 40)
    x = centers[truth] + rng.normal(size=(120, 3)).astype(np.float32)
    labels = truth.copy()
    flipped = np.array([3, 50, 90])
    labels[flipped] = (labels[flipped] + 1) % 3  # mislabelled samples sit among the other label
    rel = select_reliable(x, labels, 4, n_neighbors=10, threshold=0.8)
    chosen = set(rel.index.tolist())
    assert not chosen & set(flipped.tolist())  # inconsistent samples are never reliable
    assert len(chosen) >= 100  # the consistent majority is kept
    assert (rel.labels == labels[rel.index]).all()
    assert rel.counts[:3] == [int((labels[rel.index] == c).sum()) for c in range(3)]
    assert rel.counts[3] == 0 and rel.empty_clusters == [3]  # a cluster with none: reported, no crash
    balanced = select_reliable(x, labels, 4, n_neighbors=10, threshold=0.8, balance=True)
    assert len({c for c in balanced.counts if c}) == 1
    strict = select_reliable(x, labels, 4, n_neighbors=10, threshold=0.8,
                             probs=np.eye(4)[labels] * 0.5 + 0.125, min_confidence=0.9)
    assert len(strict.index) == 0  # the confidence criterion alone can exclude everything


# --------------------------------------------------------------------------- FixMatch
def test_fixmatch_masks_low_confidence_pseudo_labels():
    k = 3
    weak = torch.tensor([[10.0, 0, 0], [0.2, 0.1, 0.0], [0, 0, 8.0], [0.0, 0.1, 0.0]])
    conf = torch.softmax(weak, -1).max(-1).values
    strong = torch.randn(4, k, requires_grad=True)
    xl, yl = torch.randn(2, k), torch.tensor([0, 2])
    out = fixmatch_loss(xl, yl, weak, strong, threshold=0.95)
    assert out.mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert (conf[[0, 2]] >= 0.95).all()
    assert out.pseudo_labels.tolist()[0] == 0 and out.pseudo_labels.tolist()[2] == 2
    manual_unsup = (F.cross_entropy(strong[[0, 2]], torch.tensor([0, 2]), reduction="sum") / 4)
    assert torch.allclose(out.unsupervised, manual_unsup.detach(), atol=1e-6)
    assert torch.allclose(out.supervised, F.cross_entropy(xl, yl))
    out.loss.backward()
    assert torch.all(strong.grad[[1, 3]] == 0) and torch.any(strong.grad[[0, 2]] != 0)
    none = fixmatch_loss(xl, yl, weak, strong.detach(), threshold=1.01)
    assert float(none.unsupervised) == 0.0 and float(none.mask.sum()) == 0.0


# --------------------------------------------------------------------------- recipes
FAST = {"epochs": 8, "heads": 4, "hidden": 64, "views": "none", "pool_size": 600}



def test_spice_self_on_digits_beats_chance_by_far_and_selects_by_loss(digits_xy):
    x, y = digits_xy
    m = get_method("spice-self")(10, FAST).fit(x, FitContext(seed=0, progress=False))
    assert cluster_acc(y, m.labels_) > 0.6
    h = m.history_
    assert h["best_head"] == int(np.argmin(h["head_losses"]))
    lo, hi = dsce_bounds(10)
    assert all(lo <= v <= hi for v in h["head_losses"])
    p = m.predict_proba(x[:5])
    assert p.shape == (5, 10) and np.allclose(p.sum(1), 1, atol=1e-5)
    again = get_method("spice-self")(10, FAST).fit(x, FitContext(seed=0, progress=False))
    assert np.array_equal(again.labels_, m.labels_)  # deterministic under the seed


def test_spice_semi_reports_reliable_counts_and_state_round_trips(digits_xy):
    x, y = digits_xy
    opts = {**FAST, "semi_steps": 150, "reliable_neighbors": 20, "reliable_threshold": 0.9}
    m = get_method("spice")(10, opts).fit(x, FitContext(seed=0, progress=False))
    h = m.history_
    assert sum(h["reliable_per_cluster"]) == h["reliable_total"] > 0
    assert len(h["reliable_per_cluster"]) == 10
    assert cluster_acc(y, m.labels_) > 0.6
    m2 = get_method("spice")(10, opts)
    m2.load_state_dict(m.state_dict())
    np.testing.assert_allclose(m2.predict_proba(x[:50]), m.predict_proba(x[:50]), atol=1e-6)


def test_spice_with_no_reliable_sample_keeps_spice_self(digits_xy):
    x, _ = digits_xy
    opts = {**FAST, "epochs": 2, "reliable_threshold": 0.999, "reliable_confidence": 0.999999}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = get_method("spice")(10, opts).fit(x, FitContext(seed=0, progress=False))
    assert m.history_["semi"].startswith("skipped") and m.semi_ is None
    assert any("no reliable sample" in str(x.message) for x in w)
    # Reliable samples in too few clusters: skipped too (FixMatch from scratch would collapse onto them).
    few = get_method("spice")(10, {**FAST, "epochs": 2, "reliable_neighbors": 5, "reliable_threshold": 0.5,
                                   "semi_min_clusters": 1.0, "semi_steps": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        few.fit(x[:200], FitContext(seed=0, progress=False))
    counts = few.history_["reliable_per_cluster"]
    assert (min(counts) == 0) == few.history_["semi"].startswith("skipped")
    assert np.array_equal(m.predict(x), m.self_proba(x).argmax(1))


def test_fit_predict_save_load_through_the_estimator_on_digits(tmp_path):
    opts = {**FAST, "semi_steps": 100, "reliable_neighbors": 20, "reliable_threshold": 0.9}
    est = ImageClusterer(n_clusters=10, method="spice", backbone="pixels", image_size=8, method_options=opts,
                         cache_dir=str(tmp_path / "cache"), progress=False)
    labels = est.fit_predict("digits")
    assert labels.shape == (1797,) and (labels >= 0).all()
    est.save(tmp_path / "model")
    back = ImageClusterer.load(tmp_path / "model")
    assert np.array_equal(back.predict("digits"), labels)


def test_config_validation():
    with pytest.raises(InputError):
        get_method("spice-self")(10, {"loss": "focal"})
    with pytest.raises(InputError):
        get_method("spice")(10, {"semi_mode": "gpu"})
    with pytest.raises(InputError):
        get_method("spice")(10, {"mu": 0})
    with pytest.raises(InputError):
        get_method("spice-self")(10, {"views": "sometimes"})
