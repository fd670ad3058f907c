"""What every method recipe does around its step function (``methods/spice.py``, ``methods/icbpl.py``):
run the method's epochs in the shared loop (:func:`imgclust.train.loop.run_loop`) with its per-fit
checkpoint ``<work_dir>/<name>-ckpt-<key>.pt`` (off with ``checkpoint=false`` or without a work
directory), and the cluster-size record of a fit's labels.

Generic and duck-typed, so this lower layer never imports ``methods/``: a method is anything with
``name``, ``n_clusters`` and a ``config`` with ``epochs``, ``lr``, ``checkpoint`` and ``to_dict()``;
a fit context anything with ``work_dir``, ``seed`` and ``progress``. The checkpoint key is the one
the methods built by hand before (name, K, seed, options, data digest, extra parts), so existing
checkpoints still resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclust.train.checkpoint import Checkpoint, data_digest
from imgclust.train.loop import LoopResult, LoopSpec, run_loop


def run_epochs(method: Any, ctx: Any, data: np.ndarray, model: nn.Module, step: Callable[[Any, Any], Any],
               batches: Callable[[int], Iterable[Any]], *, optimizer: torch.optim.Optimizer,
               generator: torch.Generator, state: dict[str, Any], label: str | None = None,
               on_epoch_end: Callable[..., Any] | None = None, **key: Any) -> tuple[LoopResult, dict[str, Any]]:
    """``method.config.epochs`` epochs of ``batches`` / ``step`` (progress labelled ``label``, default the
    method's name), checkpointed under the fit's work dir; ``key`` adds parts to the checkpoint key.
    Returns the loop's result and its history entries (``epoch_s``, ``resumed_from_epoch``, ``checkpoint``)."""
    cfg = method.config
    ckpt = Checkpoint.in_dir(ctx.work_dir if cfg.checkpoint else None, method.name, k=method.n_clusters,
                             seed=int(ctx.seed), opts=cfg.to_dict(), data=data_digest(data), **key)
    spec = LoopSpec(cfg.epochs, label or method.name, option="lr", option_value=cfg.lr, progress=ctx.progress)
    res = run_loop(model, step, batches, spec, optimizer=optimizer, on_epoch_end=on_epoch_end, generators=[generator],
                   state=state, checkpoint=ckpt)
    return res, {"epoch_s": res.epoch_s, "resumed_from_epoch": res.resumed_from,
                 "resumed_at_step": res.resumed_at_step,
                 "checkpoint": None if ckpt.path is None else str(ckpt.path)}


def cluster_sizes(labels: np.ndarray, n_clusters: int) -> dict[str, list[int]]:
    """History entries ``cluster_sizes`` (images per cluster) and ``empty_clusters`` of a labelling.

    Example::

        >>> cluster_sizes(np.array([0, 0, 2]), 4)
        {'cluster_sizes': [2, 0, 1, 0], 'empty_clusters': [1, 3]}
    """
    sizes = np.bincount(np.asarray(labels), minlength=n_clusters)
    return {"cluster_sizes": sizes.tolist(), "empty_clusters": [int(c) for c in np.flatnonzero(sizes == 0)]}


__all__ = ["cluster_sizes", "run_epochs"]
