"""ICSR's weighted label-consistent loss (ICSR paper, Remote Sensing 14(14) 3317, 2022, sec. 3,
Eqs. (8)-(10))::

    L = (1 / B) sum_b w_{g(b)}(t) H(y(weak(x_b)), f(strong(x_b)))

the cross-entropy of the model's prediction on a *strong* view against the pseudo-label from a
*weak* view, each sample weighted by its ranking group's w_i(t) (Eq. 11,
:func:`imgclust.refine.ranking.group_weights`; samples in no group weigh 0). The mean is over
the whole batch, not renormalised by the weights: low-weight samples count less, as in the
paper's Eq. (9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgclust.errors import InputError
from imgclust.losses import _check


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. (9): mean over the batch of ``weights[b] * CE(logits[b], targets[b])``.

    ``logits`` (B, K), B >= 1; ``targets`` (B,) integer pseudo-labels; ``weights`` (B,) >= 0
    (the caller looks each sample's group weight up). Computed in float32 whatever the logits'
    dtype.

    Examples:
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
        >>> round(float(weighted_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))), 4)
        0.3466
    """
    _check.matrix("logits", logits)
    _check.labels("targets", targets, logits.shape[0])
    if not isinstance(weights, torch.Tensor) or weights.shape != (logits.shape[0],):
        raise InputError(f"weights must be a tensor ({logits.shape[0]},); got "
                         f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).mean()
