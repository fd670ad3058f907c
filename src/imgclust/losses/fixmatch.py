"""FixMatch's loss (Sohn et al. 2020, eq. 4 there; SPICE paper sec. 3.3, Eq. 6), as SPICE-Semi uses it::

    L = (1 / B) sum_b H(l_b, p(alpha(x_b)))
        + lambda_u (1 / (mu B)) sum_b 1(max q_b >= tau) H(argmax q_b, p(A(u_b)))

with q_b = p(alpha(u_b)) (no gradient), x_b labelled samples, u_b unlabelled ones, alpha the
weak and A the strong augmentation (mu = 7, tau = 0.95 in FixMatch). ``temperature`` sharpens
(< 1) or flattens q before the threshold; 1 is FixMatch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imgclust.errors import InputError
from imgclust.losses import _check


@dataclass
class FixMatchLossOutput:
    """:func:`fixmatch_loss`'s result: the loss to backpropagate and its detached parts."""

    loss: torch.Tensor  # scalar (backpropagate this)
    supervised: torch.Tensor  # scalar, detached
    unsupervised: torch.Tensor  # scalar, detached
    mask: torch.Tensor  # (mu B,) float, 1 where the weak prediction is confident enough
    pseudo_labels: torch.Tensor  # (mu B,) argmax of the weak predictions


def fixmatch_loss(
    logits_x: torch.Tensor,
    targets_x: torch.Tensor,
    logits_u_weak: torch.Tensor,
    logits_u_strong: torch.Tensor,
    *,
    threshold: float = 0.95,
    unsup_weight: float = 1.0,
    temperature: float = 1.0,
) -> FixMatchLossOutput:
    """Eq. (6): CE on the labelled weak views + masked CE of strong views on weak pseudo-labels.

    The pseudo-labels and mask come from ``logits_u_weak`` without gradient; the
    unsupervised term is averaged over all mu B unlabelled samples (masked ones count as 0),
    as in FixMatch. ``logits_x`` (B, K) with integer ``targets_x`` (B,); ``logits_u_weak`` and
    ``logits_u_strong`` (U, K); ``threshold`` >= 0 (above 1 masks every sample),
    ``unsup_weight`` >= 0, ``temperature`` > 0.

    Examples:
        >>> lx, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> weak = torch.tensor([[9.0, 0.0], [0.1, 0.0]])  # only the first is confident
        >>> out = fixmatch_loss(lx, y, weak, torch.zeros(2, 2), threshold=0.95)
        >>> out.mask.tolist(), round(float(out.unsupervised), 4)  # log 2 / 2
        ([1.0, 0.0], 0.3466)
    """
    _check.matrix("logits_x", logits_x, min_rows=0)
    _check.labels("targets_x", targets_x, logits_x.shape[0])
    _check.matrix("logits_u_weak", logits_u_weak, cols=logits_x.shape[1])
    _check.matrix("logits_u_strong", logits_u_strong, rows=logits_u_weak.shape[0], cols=logits_x.shape[1])
    _check.non_negative("threshold", threshold)
    _check.non_negative("unsup_weight", unsup_weight)
    _check.positive("temperature", temperature)
    if logits_x.shape[0] == 0:
        raise InputError("fixmatch_loss needs at least one labelled sample")
    sup = F.cross_entropy(logits_x.float(), targets_x.long())
    with torch.no_grad():
        q = torch.softmax(logits_u_weak.detach().float() / temperature, dim=-1)
        conf, pseudo = q.max(dim=-1)
        mask = (conf >= threshold).float()
    unsup = (F.cross_entropy(logits_u_strong.float(), pseudo, reduction="none") * mask).mean()
    return FixMatchLossOutput(sup + unsup_weight * unsup, sup.detach(), unsup.detach(), mask, pseudo)
