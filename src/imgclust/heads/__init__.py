"""Clustering heads on frozen features: many heads as one batched module.

* :mod:`imgclust.heads.multihead` — H linear heads (weight tensor (H, D, K)) behind one
  shared input normalisation, evaluated with a single einsum; the teacher's EMA update.
* :mod:`imgclust.heads.mlp` / :mod:`imgclust.heads.spice` — H MLP heads as stacked weights.

Their losses are pure functions in :mod:`imgclust.losses` (one module per paper).
"""

from imgclust.heads.multihead import NORMS, MultiHeadClassifier, ema_update_

__all__ = ["NORMS", "MultiHeadClassifier", "ema_update_"]
