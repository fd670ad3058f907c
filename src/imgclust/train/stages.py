"""Bookkeeping of multi-stage training (PICI's pre-train / train / boost, CC's one stage): per-stage
seeds, per-stage checkpoints and the label-free (or, with ground truth, scored) evaluation
after a stage. Generic: a method lists its stages as ``(name, epochs)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.train.checkpoint import Checkpoint


def derive_seed(*parts: int) -> int:
    """A 56-bit seed from a tuple of integers (run seed, stage, epoch, step, ...), independent of batching."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def stage_checkpoint(work_dir: str | Path | None, name: str, stages: list[tuple[str, int]], index: int, *,
                     k: int, seed: int, opts: dict[str, Any], data: str) -> Checkpoint | None:
    """Stage ``index``'s checkpoint ``<work_dir>/<name>-<stage>-ckpt-<key>.pt`` (None without a work dir).

    ``opts`` should leave out the epoch counts: the stage's own count is not in the fingerprint (a
    re-run with more epochs of a stage continues it), the earlier stages' counts are (a stage that
    starts from another network starts over)."""
    if work_dir is None:
        return None
    return Checkpoint.in_dir(Path(work_dir), f"{name}-{stages[index][0]}", k=k, seed=int(seed), opts=opts, data=data,
                             before=[e for _, e in stages[:index]])


def evaluate_stage(features: np.ndarray, proba: np.ndarray | None, n_clusters: int, seed: int,
                   truth: Any = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """After a stage: k-means (3 inits) on the encoder ``features`` and, when the stage has a cluster
    head, its argmax of ``proba``; returns the labels and history entries (``metrics`` ACC / NMI /
    ARI per labelling only when ``truth`` is given — diagnostics, never used to choose anything;
    ``head_clusters_used``)."""
    from sklearn.cluster import KMeans

    labels = {"kmeans": KMeans(n_clusters, n_init=3, random_state=seed).fit_predict(features).astype(np.int64)}
    if proba is not None:
        labels["head"] = proba.argmax(axis=1).astype(np.int64)
    record: dict[str, Any] = {}
    if truth is not None:
        from imgclust.metrics import evaluate

        y = np.asarray(truth)
        record["metrics"] = {name: {m: round(float(v), 4) for m, v in evaluate(y, lab).items() if m in ("acc", "nmi", "ari")}
                             for name, lab in labels.items()}
    if "head" in labels:
        record["head_clusters_used"] = int(len(np.unique(labels["head"])))
    return labels, record


__all__ = ["derive_seed", "evaluate_stage", "stage_checkpoint"]
