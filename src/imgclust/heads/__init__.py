"""Clustering heads on frozen features: many heads as one batched module, and their losses.

* :mod:`imgclust.heads.multihead` — H linear heads (weight tensor (H, D, K)) behind one
  shared input normalisation, evaluated with a single einsum; the teacher's EMA update.
* :mod:`imgclust.heads.temi` — the TEMI loss (Adaloglou et al., BMVC 2023) and ICCE's
  additions (Sinkhorn-Knopp centring of the teacher, the pseudo-label cross-entropy term),
  as pure functions of logits.
"""

from imgclust.heads.multihead import NORMS, MultiHeadClassifier, ema_update_
from imgclust.heads.temi import (
    TemiLossOutput,
    agreement_weight,
    cosine_ramp,
    log_sinkhorn_knopp,
    pseudo_label_ce,
    sinkhorn_knopp,
    teacher_log_probs,
    temi_loss,
    update_prior,
)

__all__ = [
    "NORMS",
    "MultiHeadClassifier",
    "TemiLossOutput",
    "agreement_weight",
    "cosine_ramp",
    "ema_update_",
    "log_sinkhorn_knopp",
    "pseudo_label_ce",
    "sinkhorn_knopp",
    "teacher_log_probs",
    "temi_loss",
    "update_prior",
]
