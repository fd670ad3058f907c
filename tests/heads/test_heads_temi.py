"""Batched heads and the TEMI / ICCE loss pieces on tiny hand-made cases."""

import math

import pytest
import torch

from imgclust.heads import MultiHeadClassifier, ema_update_
from imgclust.losses.temi import (
    agreement_weight,
    cosine_ramp,
    pseudo_label_ce,
    sinkhorn_knopp,
    teacher_log_probs,
    temi_loss,
    update_prior,
)


def reference_temi(s_logits, t_logits, prior, ts=0.1, tt=0.1, beta=0.6, m=0.9):
    """The published formula written out with loops and plain probabilities (no log domain)."""
    h_, _, _, _ = s_logits.shape
    ps = torch.softmax(s_logits / ts, -1)
    pt = torch.softmax(t_logits / tt, -1)
    new_prior = torch.stack([m * prior[h] + (1 - m) * pt[h].reshape(-1, pt.shape[-1]).mean(0) for h in range(h_)])
    w = sum((pt[h, 0] * pt[h, 1]).sum(-1) for h in range(h_)) / h_
    losses = []
    for h in range(h_):
        tot = 0
        for tv, sv in ((0, 1), (1, 0)):
            pmi = (((ps[h, sv] * pt[h, tv]) ** beta) / new_prior[h]).sum(-1).log()
            tot = tot + (w * -pmi).mean()
        losses.append(tot / 2)
    return torch.stack(losses), new_prior


def onehot_logits(labels, k, scale=10.0):
    return scale * torch.nn.functional.one_hot(labels, k).float()


def test_batched_heads_equal_separate_linear_layers():
    g = torch.Generator().manual_seed(0)
    heads = MultiHeadClassifier(12, 5, 7, "none", generator=g)
    x = torch.randn(9, 12)
    out = heads(x)
    assert out.shape == (7, 9, 5)
    for h in range(7):
        lin = torch.nn.Linear(12, 5)
        with torch.no_grad():
            lin.weight.copy_(heads.weight[h].T)
            lin.bias.copy_(heads.bias[h])
        torch.testing.assert_close(out[h], lin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(heads.forward_head(x, h), lin(x), rtol=1e-5, atol=1e-5)
    # same seed, same initialisation
    again = MultiHeadClassifier(12, 5, 7, "none", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.weight, heads.weight)


@pytest.mark.parametrize("norm", ["l2", "standardize", "batchnorm"])
def test_input_normalisations(norm):
    x = torch.randn(64, 6) * 5 + 3
    heads = MultiHeadClassifier(6, 3, 2, norm)
    if norm == "standardize":
        heads.set_standardization(x.mean(0), x.std(0))
    z = heads.normalize(x)
    if norm == "l2":
        torch.testing.assert_close(z.norm(dim=1), torch.ones(64))
    else:
        torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
        torch.testing.assert_close(z.std(0), torch.ones(6), atol=1e-2, rtol=0)


def test_loss_matches_the_reference_formula_and_updates_the_prior_first():
    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 16, 4), torch.randn(3, 2, 16, 4)
    prior = torch.softmax(torch.randn(3, 4), -1)
    out = temi_loss(s, t, prior)
    ref, ref_prior = reference_temi(s, t, prior)
    torch.testing.assert_close(out.head_losses, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.prior, ref_prior)
    torch.testing.assert_close(out.loss, ref.mean(), rtol=1e-4, atol=1e-5)
    assert out.weight.shape == (16,) and not out.prior.requires_grad


def test_perfect_clustering_scores_lower_than_random_or_collapsed():
    k, b = 4, 64
    labels = torch.arange(b) % k  # balanced clusters; each pair (view 0, view 1) shares its label
    perfect = onehot_logits(labels, k).expand(2, 2, b, k)  # (H=2, views, B, K)
    uniform = torch.full((2, k), 1.0 / k)
    good = temi_loss(perfect, perfect, uniform, prior_momentum=0.0).loss
    rnd = torch.randn(2, 2, b, k, generator=torch.Generator().manual_seed(1)) * 10
    random = temi_loss(rnd, rnd.flip(1), uniform, prior_momentum=0.0).loss
    collapsed_logits = onehot_logits(torch.zeros(b, dtype=torch.long), k).expand(2, 2, b, k)
    collapsed = temi_loss(collapsed_logits, collapsed_logits, uniform, prior_momentum=0.0).loss
    # perfect, balanced pairs reach -log K (PMI = log K with weight ~1); collapse scores ~0
    assert good.item() == pytest.approx(-math.log(k), abs=1e-2)
    assert good < random and good < collapsed
    assert collapsed.item() == pytest.approx(0.0, abs=1e-2)


def test_gradients_flow_only_to_the_student_and_ema_moves_the_teacher():
    g = torch.Generator().manual_seed(0)
    student = MultiHeadClassifier(8, 3, 4, "batchnorm", generator=g)
    teacher = MultiHeadClassifier(8, 3, 4, "batchnorm", generator=torch.Generator().manual_seed(1))
    teacher.requires_grad_(False)
    x = torch.randn(2 * 10, 8)
    s = student(x).view(4, 2, 10, 3)
    t = teacher(x).view(4, 2, 10, 3)
    prior = torch.full((4, 3), 1 / 3)
    out = temi_loss(s, t, prior, sinkhorn_iters=3, ce_weight=0.5)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not out.prior.requires_grad and not out.weight.requires_grad
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.9)
    for p0, pt, ps in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * ps.detach())


def test_teacher_argument_receives_no_gradient_even_if_it_requires_one():
    s = torch.randn(2, 2, 8, 3, requires_grad=True)
    t = torch.randn(2, 2, 8, 3, requires_grad=True)
    temi_loss(s, t, torch.full((2, 3), 1 / 3), ce_weight=1.0).loss.backward()
    assert t.grad is None and s.grad is not None


def test_weight_is_teacher_agreement_averaged_over_heads():
    pt = torch.zeros(2, 2, 3, 2)
    pt[0, :, :, 0] = 1.0  # head 0: both views in cluster 0 -> agreement 1
    pt[1, 0, :, 0] = 1.0  # head 1: views disagree -> agreement 0
    pt[1, 1, :, 1] = 1.0
    torch.testing.assert_close(agreement_weight(pt), torch.full((3,), 0.5))
    prior = update_prior(torch.full((2, 2), 0.5), pt, momentum=0.9)
    torch.testing.assert_close(prior, torch.tensor([[0.55, 0.45], [0.5, 0.5]]))


def test_sinkhorn_knopp_balances_clusters_and_keeps_rows_normalised():
    torch.manual_seed(0)
    logits = torch.randn(3, 256, 8) + torch.tensor([2.0, 1, 0, 0, 0, 0, 0, -1])  # imbalanced
    plain = torch.softmax(logits, -1)
    sk = sinkhorn_knopp(logits, 1.0, 3)
    torch.testing.assert_close(sk.sum(-1), torch.ones(3, 256))
    target = 256 / 8
    assert (plain.sum(1) - target).abs().max() > 0.5 * target  # softmax is far from uniform
    assert (sk.sum(1) - target).abs().max() < 0.05 * target  # SK columns near N/K
    sharp = sinkhorn_knopp(logits, 0.1, 3)  # at tau = 0.1 three iterations balance less, still better
    assert (sharp.sum(1) - target).abs().mean() < (torch.softmax(logits / 0.1, -1).sum(1) - target).abs().mean()
    sk = sharp

    # equals the multiplicative algorithm (DINOv2's sinkhorn_knopp_teacher) written out
    q = torch.exp(logits[0] / 0.1).T
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True)
        q /= 8
        q /= q.sum(dim=0, keepdim=True)
        q /= 256
    torch.testing.assert_close(sk[0], (q * 256).T, rtol=1e-4, atol=1e-6)
    # teacher_log_probs applies it per head over both views together
    t = logits.view(3, 2, 128, 8)
    torch.testing.assert_close(teacher_log_probs(t, 0.1, 3).exp().view(3, 256, 8), sk, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(teacher_log_probs(t, 0.1, 0).exp(), torch.softmax(t / 0.1, -1))


def test_cross_entropy_term_uses_the_teacher_argmax_of_the_other_view():
    log_ps = torch.log_softmax(torch.randn(2, 2, 5, 3), -1)
    log_pt = torch.log_softmax(torch.randn(2, 2, 5, 3) * 5, -1)
    other = log_pt.flip(1)
    y = other.argmax(-1)
    manual = torch.stack([-(log_ps[h].gather(-1, y[h][..., None]).squeeze(-1)).mean() for h in range(2)])
    torch.testing.assert_close(pseudo_label_ce(log_ps, other), manual)
    s, t, prior = torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 3), torch.full((2, 3), 1 / 3)
    with_ce = temi_loss(s, t, prior, ce_weight=0.7)
    without = temi_loss(s, t, prior)
    torch.testing.assert_close(with_ce.head_losses, without.head_losses + 0.7 * with_ce.ce)
    assert cosine_ramp(0, 100, 2.0) == 0.0 and cosine_ramp(100, 100, 2.0) == pytest.approx(2.0)
    assert cosine_ramp(50, 100, 2.0) == pytest.approx(1.0)


def test_extreme_logits_give_finite_loss_and_gradients():
    s = (torch.randn(2, 2, 8, 4) * 1000).requires_grad_(True)
    t = torch.randn(2, 2, 8, 4) * 1000
    out = temi_loss(s, t, torch.full((2, 4), 0.25), sinkhorn_iters=3, ce_weight=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()
