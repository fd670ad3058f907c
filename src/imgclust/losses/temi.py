"""The TEMI loss and ICCE's additions, as pure functions of student and teacher logits.

Notation (one batch of B pairs, H heads, K clusters). A pair is an image x and a random
member x' of its neighbour set; "view" 0 is the images, view 1 their neighbours, so all
tensors of logits are shaped (H, 2, B, K).

Student and teacher probabilities (TEMI, Adaloglou et al. BMVC 2023, sec. 3; temperatures
tau_s = tau_t = 0.1)::

    p_s(k|x) = softmax(s(x) / tau_s)_k          (gradients flow only through this)
    p_t(k|x) = softmax(t(x) / tau_t)_k          (teacher = EMA of the student; no gradient)

Per-head cluster prior, an EMA of the teacher's batch-mean prediction over both views,
updated *before* it is used (momentum m_p = 0.9; reference ``update_ema`` then ``beta_mi``)::

    pi_h <- m_p * pi_h + (1 - m_p) * mean_{v, b} p_t^h(. | x_{v,b})

Weighting by teacher agreement: how likely the pair shares a cluster under the teacher,
averaged over *all heads* (reference ``compute_weight`` sums ``sim_weight`` over heads and
divides by their number), so every head sees the same per-pair weight::

    w(x, x') = (1/H) sum_h sum_k p_t^h(k|x) p_t^h(k|x')

beta-PMI per head, symmetric over both view orders (student on one view, teacher on the
other; the reference skips student and teacher on the same view), beta = 0.6::

    L_h = - 1/2 sum_{(v, u) in {(0,1), (1,0)}} mean_b  w_b * log sum_k
              (p_s^h(k|x_{v,b}) p_t^h(k|x_{u,b}))^beta / pi_h(k)

Note the prior is *not* raised to beta (reference ``beta_mi``). The weight, teacher
probabilities and prior are all detached; only p_s carries gradients. The total loss is the
mean of L_h over heads. Computed here in the log domain (logsumexp of
beta * (log p_s + log p_t) - log pi), which is the same value but never produces
0 * inf = NaN gradients when a probability underflows.

ICCE additions (ICCE paper, sec. 3.1):

* Sinkhorn-Knopp centring of the teacher (Caron et al.; as in DINOv2): the teacher's
  probabilities over the whole batch (both views, per head) are the SK-normalised
  ``exp(t / tau_t)``, 3 iterations, so clusters are used uniformly within a batch;
  see :func:`sinkhorn_knopp`.
* Cross-entropy with the teacher's argmax as pseudo-label: for a pair (x, x'),
  ``y = argmax_k p_t(k|x)`` and ``CE = -log p_s(y|x')``; here over both view orders like
  the TEMI term. The total per head is ``L_h + lambda(t) * CE_h`` with lambda raised from 0
  on a cosine schedule (:func:`cosine_ramp`), because early teacher predictions are
  unreliable.

Data parallel: the two statistics that span the batch — the prior's batch mean and the
Sinkhorn-Knopp row/column marginals — are reduced over ranks with :mod:`imgclust.train.dist`
(P processes with B pairs each compute what one process computes on P x B pairs); the
agreement weight is per pair and needs nothing. In one process the code path is the
single-process one, bit for bit.

Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> s = torch.randn(3, 2, 8, 4, generator=g, requires_grad=True)  # 3 heads, 8 pairs, K = 4
    >>> t = torch.randn(3, 2, 8, 4, generator=g)
    >>> out = temi_loss(s, t, torch.full((3, 4), 0.25), sinkhorn_iters=3, ce_weight=0.5)
    >>> out.head_losses.shape, out.prior.sum(-1).round(decimals=4).tolist()
    (torch.Size([3]), [1.0, 1.0, 1.0])
    >>> out.loss.backward(); s.grad.abs().sum() > 0
    tensor(True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imgclust.train import dist

PRIOR_FLOOR = 1e-12  # pi_k is clamped here before the log/division (reference divides by it as is)


def log_sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iters: int = 3) -> torch.Tensor:
    """Log of the Sinkhorn-Knopp-normalised ``exp(logits / temperature)`` over the rows.

    ``logits`` is (..., N, K): N samples (the batch), K clusters, any leading batch dims
    (heads). Starting from ``Q = exp(logits / T) / sum(exp(logits / T))`` each iteration
    scales every cluster's column to total 1/K, then every sample's row to total 1/N;
    finally rows are multiplied by N so that each sample's row is a distribution over
    clusters (sums to 1) and each cluster's column sums to about N/K. Same algorithm as
    DINOv2's ``sinkhorn_knopp_teacher``, computed in the log domain.
    """
    if int(n_iters) < 0 or not temperature > 0:
        raise ValueError(f"need n_iters >= 0 and temperature > 0; got {n_iters}, {temperature}")
    if dist.world_size() > 1:
        return _log_sinkhorn_knopp_dist(logits, temperature, int(n_iters))
    n, k = logits.shape[-2], logits.shape[-1]
    lq = logits.float() / temperature
    lq = lq - torch.logsumexp(lq.flatten(-2), dim=-1)[..., None, None]
    for _ in range(int(n_iters)):
        lq = lq - torch.logsumexp(lq, dim=-2, keepdim=True) - math.log(k)
        lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True) - math.log(n)
    return lq + math.log(n)


def _global_logsumexp(lq: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """logsumexp over ``dim`` of the rows of every rank (the batch is split across ranks)."""
    m = dist.all_gather_cat(lq.amax(dim=dim, keepdim=True).detach()[None], 0).amax(0)  # global max, for stability
    s = (lq - m).exp().sum(dim=dim, keepdim=True)
    return dist.all_reduce_sum(s).log() + m


def _log_sinkhorn_knopp_dist(logits: torch.Tensor, temperature: float, n_iters: int) -> torch.Tensor:
    """:func:`log_sinkhorn_knopp` with the column sums (over the batch) taken over all ranks."""
    k = logits.shape[-1]
    n = dist.all_reduce_sum(torch.tensor(float(logits.shape[-2]), device=logits.device)).item()
    lq = logits.float() / temperature
    lq = lq - _global_logsumexp(lq, (-2, -1))
    for _ in range(n_iters):
        lq = lq - _global_logsumexp(lq, -2) - math.log(k)
        lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True) - math.log(n)
    return lq + math.log(n)


def sinkhorn_knopp(logits: torch.Tensor, temperature: float = 0.1, n_iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp-centred probabilities (..., N, K); rows sum to 1, columns to ~N/K."""
    return log_sinkhorn_knopp(logits, temperature, n_iters).exp()


def teacher_log_probs(logits: torch.Tensor, temperature: float, sinkhorn_iters: int = 0) -> torch.Tensor:
    """log p_t for teacher logits (H, V, B, K): softmax at ``temperature``, or SK-centred.

    With ``sinkhorn_iters > 0`` the SK normalisation runs per head over all V*B rows of the
    batch (both views together, as DINOv2 centres both global crops together).
    """
    if sinkhorn_iters <= 0:
        return F.log_softmax(logits.float() / temperature, dim=-1)
    h, k = logits.shape[0], logits.shape[-1]
    return log_sinkhorn_knopp(logits.reshape(h, -1, k), temperature, sinkhorn_iters).reshape(logits.shape)


def update_prior(prior: torch.Tensor, teacher_probs: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """pi_h <- m * pi_h + (1 - m) * mean over the batch of p_t^h; prior (H, K), probs (H, ..., K)."""
    batch_mean = teacher_probs.reshape(teacher_probs.shape[0], -1, teacher_probs.shape[-1]).mean(dim=1)
    if dist.world_size() > 1:  # the global batch's mean (equal per-rank batches)
        batch_mean = dist.all_reduce_mean(batch_mean.clone())
    return momentum * prior + (1.0 - momentum) * batch_mean


def agreement_weight(teacher_probs: torch.Tensor) -> torch.Tensor:
    """w_b = (1/H) sum_h sum_k p_t^h(k|x_b) p_t^h(k|x'_b) for teacher probs (H, 2, B, K) -> (B,)."""
    return (teacher_probs[:, 0] * teacher_probs[:, 1]).sum(dim=-1).mean(dim=0)


def pseudo_label_ce(student_log_probs: torch.Tensor, teacher_log_probs_other: torch.Tensor) -> torch.Tensor:
    """ICCE's CE term per head: mean over views and batch of -log p_s(argmax p_t(.|other view)).

    ``student_log_probs`` (H, V, B, K); ``teacher_log_probs_other[:, v]`` is the teacher on the
    view paired with student view v. Returns (H,).
    """
    y = teacher_log_probs_other.argmax(dim=-1, keepdim=True)
    return -student_log_probs.gather(-1, y).squeeze(-1).mean(dim=(1, 2))


def cosine_ramp(step: int, total: int, final: float) -> float:
    """lambda(t) = final * (1 - cos(pi * t / T)) / 2: 0 at the start, ``final`` at the end."""
    if total <= 0:
        return float(final)
    t = min(max(step / total, 0.0), 1.0)
    return float(final) * 0.5 * (1.0 - math.cos(math.pi * t))


@dataclass
class TemiLossOutput:
    loss: torch.Tensor  # scalar, mean over heads of head_losses (backpropagate this)
    head_losses: torch.Tensor  # (H,) TEMI + ce_weight * CE per head (with grad)
    pmi: torch.Tensor  # (H,) the TEMI term alone (detached)
    ce: torch.Tensor  # (H,) the CE term alone (detached; zeros when ce_weight == 0)
    prior: torch.Tensor  # (H, K) the updated cluster prior (carry to the next step)
    weight: torch.Tensor  # (B,) teacher-agreement weights


def temi_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    prior: torch.Tensor,
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.1,
    beta: float = 0.6,
    prior_momentum: float = 0.9,
    sinkhorn_iters: int = 0,
    ce_weight: float = 0.0,
) -> TemiLossOutput:
    """TEMI loss (+ ICCE's SK centring and CE term) for logits (H, 2, B, K); see the module doc.

    ``prior`` (H, K) is the running cluster prior; the returned ``prior`` is its EMA update
    with this batch, already used in this loss. Nothing but ``student_logits`` receives
    gradients.
    """
    if student_logits.dim() != 4 or student_logits.shape[1] != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"expected student and teacher logits (H, 2, B, K), got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if prior.shape != (student_logits.shape[0], student_logits.shape[-1]):
        raise ValueError(f"prior must be (H, K) = {(student_logits.shape[0], student_logits.shape[-1])}; "
                         f"got {tuple(prior.shape)}")
    for name, v in (("student_temp", student_temp), ("teacher_temp", teacher_temp), ("beta", beta)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0; got {v}")
    if not 0.0 <= prior_momentum <= 1.0 or sinkhorn_iters < 0 or ce_weight < 0:
        raise ValueError(f"need prior_momentum in [0, 1], sinkhorn_iters >= 0 and ce_weight >= 0; got "
                         f"{prior_momentum}, {sinkhorn_iters}, {ce_weight}")
    log_ps = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    with torch.no_grad():
        log_pt = teacher_log_probs(teacher_logits.detach(), teacher_temp, sinkhorn_iters)
        pt = log_pt.exp()
        new_prior = update_prior(prior.detach(), pt, prior_momentum)
        weight = agreement_weight(pt)
        log_pt_other = log_pt.flip(1)  # the teacher on the other view of each pair
        log_prior = new_prior.clamp(min=PRIOR_FLOOR).log()[:, None, None, :]
    pmi = torch.logsumexp(beta * (log_ps + log_pt_other) - log_prior, dim=-1)  # (H, 2, B)
    pmi_loss = -(weight * pmi).mean(dim=(1, 2))
    if ce_weight:
        ce = pseudo_label_ce(log_ps, log_pt_other)
        head_losses = pmi_loss + float(ce_weight) * ce
    else:
        ce = torch.zeros_like(pmi_loss)
        head_losses = pmi_loss
    return TemiLossOutput(head_losses.mean(), head_losses, pmi_loss.detach(), ce.detach(), new_prior, weight)
