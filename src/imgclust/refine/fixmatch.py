"""SPICE-Semi: reliable labels by local consistency, then FixMatch on them (SPICE paper, sec. 3.3).

Local consistency, Eq. (5). For sample i with cluster label l_i and the set N(i) of its
n_s nearest neighbours (cosine similarity of the frozen features, self excluded;
n_s = 100)::

    beta_i = (1 / n_s) sum_{j in N(i)} 1(l_j = l_i)

and (x_i, l_i) is *reliable* when beta_i > tau_c (tau_c = 0.95). The reference code also
demands a confident prediction (``score_th``, max p_i > 0.99, not in the paper) and then
cuts every cluster down to the size of the smallest one (which crashes, or selects nothing,
when a cluster has no reliable sample). Both are options here (``min_confidence``,
``balance``), off in :func:`select_reliable` (the paper's rule); the ``spice`` recipe
balances by default. Clusters without any reliable sample are reported and the others used.

FixMatch, Eq. (6) (Sohn et al. 2020; mu = 7, tau = 0.95)::

    L = (1 / B) sum_b H(l_b, p(alpha(x_b)))
        + lambda_u (1 / (mu B)) sum_b 1(max q_b >= tau) H(argmax q_b, p(A(u_b)))

with q_b = p(alpha(u_b)) (no gradient), x_b reliable samples with their labels, u_b any
sample (the labelled ones included), alpha the weak and A the strong augmentation. The
model used for prediction is the exponential moving average of the trained weights
(momentum 0.999, warmed up as min(0.999, (1 + t) / (10 + t)) at step t, as TensorFlow's
``ExponentialMovingAverage(num_updates=t)`` that FixMatch's code uses), as FixMatch evaluates.

Two modes:

* ``head`` (CPU default): the classifier is an MLP on frozen backbone features and the
  views come from :mod:`imgclust.views` (bank, on the fly, or none).
* ``end_to_end`` (GPU): a trainable copy of the backbone plus the MLP, on augmented images
  (:class:`ImageViews`); afterwards a head on the *frozen* features is fitted to the
  network's predictions (:func:`distill_head`), so that, as for every method, ``predict``
  needs only the frozen backbone's features.

:func:`train_fixmatch` is one loop for both: a model, a provider of (weak, strong) inputs by
sample index, and the reliable labels.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import nn

from imgclust.configcheck import check_fields, option
from imgclust.data.augment import DEFAULT_SPEC, AugmentSpec, augment
from imgclust.data.base import ImageSource
from imgclust.data.batches import ImageBatches
from imgclust.errors import InputError
from imgclust.losses.fixmatch import FixMatchLossOutput, fixmatch_loss
from imgclust.neighbors import load_or_mine_neighbors
from imgclust.train.checkpoint import Checkpoint
from imgclust.train.loop import LoopSpec, StepInfo, run_loop
from imgclust.train.optim import build_optimizer, ema_update_, param_groups

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- local consistency
def local_consistency(labels: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """beta_i of Eq. (5) for neighbour sets in CSR form (set i = indices[indptr[i]:indptr[i+1]]).

    A sample with an empty set gets beta = 0 (never reliable).
    """
    labels = np.asarray(labels)
    sizes = np.diff(indptr)
    owner = np.repeat(np.arange(len(labels)), sizes)
    same = (labels[indices] == labels[owner]).astype(np.float64)
    agree = np.bincount(owner, weights=same, minlength=len(labels))
    return np.where(sizes > 0, agree / np.maximum(sizes, 1), 0.0)


@dataclass
class ReliableSet:
    """Reliable samples: positions, their labels, and what was found per cluster."""

    index: np.ndarray  # (R,) int64 positions of reliable samples
    labels: np.ndarray  # (R,) int64 their cluster labels
    beta: np.ndarray  # (N,) local consistency of every sample
    counts: list[int]  # reliable samples per cluster (after balancing)
    empty_clusters: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def select_reliable(
    features: np.ndarray,
    labels: np.ndarray,
    n_clusters: int,
    *,
    n_neighbors: int = 100,
    threshold: float = 0.95,
    probs: np.ndarray | None = None,
    min_confidence: float = 0.0,
    balance: bool = False,
    work_dir: Any = None,
    seed: int = 0,
    progress: bool = False,
) -> ReliableSet:
    """Reliable samples by local consistency (beta_i > ``threshold``) over ``n_neighbors`` neighbours.

    Neighbours come from :func:`imgclust.neighbors.load_or_mine_neighbors` (cached in
    ``work_dir``). ``min_confidence`` > 0 also requires max_c p_ic > it (reference code:
    0.99); ``balance`` keeps a random subset of the same size in every cluster that has
    any (the reference code's balancing, without its failure on empty clusters).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    k = max(1, min(int(n_neighbors), n - 1))
    nb = load_or_mine_neighbors(np.ascontiguousarray(features, dtype=np.float32), work_dir, mode="fixed", k=k,
                                seed=seed, progress=progress)
    beta = local_consistency(labels, nb.indptr, nb.indices)
    ok = beta > threshold
    if min_confidence > 0 and probs is not None:
        ok &= np.asarray(probs).max(axis=1) > min_confidence
    index = np.flatnonzero(ok)
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels[index], minlength=n_clusters)
    if balance and (counts > 0).any():
        m = int(counts[counts > 0].min())
        keep = [rng.permutation(index[labels[index] == c])[:m] for c in range(n_clusters) if counts[c] > 0]
        index = np.sort(np.concatenate(keep))
        counts = np.bincount(labels[index], minlength=n_clusters)
    empty = [int(c) for c in np.flatnonzero(counts == 0)]
    info = {"n_neighbors": k, "threshold": threshold, "min_confidence": min_confidence, "balance": balance,
            "neighbors_cache": nb.info.get("cache"), "mean_beta": float(beta.mean()) if n else 0.0}
    return ReliableSet(index.astype(np.int64), labels[index], beta, [int(c) for c in counts], empty, info)


# --------------------------------------------------------------------------- training
@dataclass
class FixMatchConfig:
    """FixMatch's defaults (Sohn et al. 2020), except the number of steps (a CPU budget)."""

    steps: int = option(2000, Ge(1))  # FixMatch: 2**20 on a GPU; a head on frozen features converges in far fewer
    batch_size: int = option(64, Ge(1))  # B (labelled)
    mu: int = option(7, Ge(1))  # unlabelled : labelled ratio
    threshold: float = option(0.95, Interval(ge=0, le=1))  # tau
    unsup_weight: float = option(1.0, Ge(0))  # lambda_u
    lr: float = option(0.03, Gt(0))
    momentum: float = option(0.9, Interval(ge=0, lt=1))  # SGD, Nesterov
    weight_decay: float = option(5e-4, Ge(0))
    ema: float = option(0.999, Interval(ge=0, lt=1))

    def __post_init__(self) -> None:
        check_fields(self)  # the ranges declared above (imgclust.configcheck)


def train_fixmatch(
    model: nn.Module,
    views: Any,
    labeled_index: np.ndarray,
    labeled_targets: np.ndarray,
    n_samples: int,
    cfg: FixMatchConfig,
    generator: torch.Generator,
    *,
    device: torch.device = CPU,
    progress: bool = True,
    desc: str = "fixmatch",
    lr_option: str = "lr",
    checkpoint: Checkpoint | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` (inputs -> logits (B, K)) with FixMatch; returns (EMA model, history).

    ``views.sample(kind, idx, generator)`` gives the model inputs of a weak or strong view of
    samples ``idx`` (positions 0..n_samples-1). Labelled batches are drawn with replacement
    from ``labeled_index``; unlabelled ones uniformly from all samples. SGD with Nesterov
    momentum and FixMatch's cosine decay lr * cos(7 pi t / (16 T)); weight decay on weights,
    not biases. A non-finite loss stops training at once with
    :class:`~imgclust.nonfinite.NonFiniteLoss` naming ``lr_option`` (the caller's name for ``cfg.lr``).

    Runs on :func:`imgclust.train.loop.run_loop`: one loop "epoch" is one history point
    (``every`` = steps / 50 steps), so a ``checkpoint`` (optional) resumes at such a point with
    the model, its EMA, the optimiser and ``generator`` restored (bit-identical to a whole run).
    """
    if len(labeled_index) == 0:
        raise InputError("FixMatch needs at least one labelled (reliable) sample")
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    opt = build_optimizer("sgd", param_groups(_bias_named(model), cfg.weight_decay), lr=cfg.lr,
                          momentum=cfg.momentum, nesterov=True)
    lab = torch.from_numpy(np.asarray(labeled_index, dtype=np.int64))
    tgt = torch.from_numpy(np.asarray(labeled_targets, dtype=np.int64))
    b, ub = cfg.batch_size, cfg.batch_size * cfg.mu
    every = max(1, cfg.steps // 50)
    # math.cos per step (not np.cos): the exact values of the loop this replaced
    lrs = [cfg.lr * math.cos(7.0 * math.pi * step / (16.0 * cfg.steps)) for step in range(cfg.steps)]

    def batches(chunk: int):
        for _ in range(chunk * every, min((chunk + 1) * every, cfg.steps)):
            pick = torch.randint(0, len(lab), (b,), generator=generator)
            xi, yi = lab[pick], tgt[pick].to(device)
            ui = torch.randint(0, n_samples, (ub,), generator=generator)
            xw = views.sample("weak", xi, generator)
            uw = views.sample("weak", ui, generator)
            us = views.sample("strong", ui, generator)
            yield torch.cat([xw, uw, us]), yi

    def step(batch: tuple[torch.Tensor, torch.Tensor], info: StepInfo):
        x, yi = batch
        logits = model(x.to(device))  # one pass, as FixMatch (BatchNorm sees all)
        out = fixmatch_loss(logits[:b], yi, logits[b:b + ub], logits[b + ub:], threshold=cfg.threshold,
                            unsup_weight=cfg.unsup_weight)
        return out.loss, {"supervised": out.supervised, "unsupervised": out.unsupervised,
                          "mask_rate": out.mask.mean()}

    def ema_step(info: StepInfo) -> None:
        # EMA momentum warmed up as TensorFlow's ExponentialMovingAverage(num_updates): with a CPU
        # budget of a few thousand steps, 0.999 from step 0 would keep ~14% of the random init.
        ema_update_(ema, model, min(cfg.ema, (1.0 + info.step) / (10.0 + info.step)))

    t0 = time.perf_counter()
    spec = LoopSpec(epochs=math.ceil(cfg.steps / every), name=desc, lr=lrs, option=lr_option, option_value=cfg.lr,
                    progress=progress, postfix=("loss", "mask_rate"))
    res = run_loop(model, step, batches, spec, optimizer=opt, after_step=[ema_step], modules={"ema": ema},
                   generators=[generator], checkpoint=checkpoint)
    _copy_buffers(ema, model)
    hist = {k: [round(float(v), 5) for v in res.history.get(k, [])]
            for k in ("loss", "supervised", "unsupervised", "mask_rate")}
    info = {**hist, "steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 3), "every": every}
    if res.resumed_from is not None:
        info["resumed_at"] = res.resumed_from * every
    return ema.eval(), info


def _bias_named(model: nn.Module):
    """``named_parameters`` for :func:`~imgclust.train.optim.param_groups`, with MultiHeadMLP's stacked
    per-head biases (``b1``, ``b2``: 2-d, (H, hidden)) named as biases, so that the one no-decay rule
    leaves them out of weight decay as FixMatch (and this loop before the move) does."""
    for name, p in model.named_parameters():
        yield (name + ".bias" if name.rsplit(".", 1)[-1] in ("b1", "b2") else name), p


def _copy_buffers(dst: nn.Module, src: nn.Module) -> None:
    """The EMA model takes the trained model's buffers (BatchNorm statistics, normalisation)."""
    with torch.no_grad():
        for bd, bs in zip(dst.buffers(), src.buffers(), strict=True):
            bd.copy_(bs)


# --------------------------------------------------------------------------- end-to-end mode
class ImageViews:
    """Weak / strong augmented *images* (normalised tensors) of the fitted images, for end-to-end training."""

    mode = "images"

    def __init__(self, source: ImageSource, rows: np.ndarray, preprocess: Any, spec: AugmentSpec = DEFAULT_SPEC,
                 device: torch.device = CPU, cache: bool = True) -> None:
        self.source, self.rows, self.pre, self.spec, self.device = source, np.asarray(rows), preprocess, spec, device
        # decoding + resizing in threads (Pillow releases the GIL); unreadable images are all zero
        self.batches = ImageBatches(source, self.rows, preprocess.size, preprocess, min(8, os.cpu_count() or 1))
        self._cache: torch.Tensor | None = None
        if cache and len(self.rows) * preprocess.size ** 2 * 3 <= 512 << 20:  # small sets stay in RAM
            self._cache = self._hwc(None)

    def _hwc(self, idx: np.ndarray | None) -> torch.Tensor:
        """(B, s, s, C) uint8: kept channels-last, so that :meth:`images` gives the memory layout the
        augmentations and the backbone always saw here (a permuted view)."""
        return self.batches.uint8(idx, channels_last=True)[0].permute(0, 2, 3, 1)

    def images(self, idx: np.ndarray) -> torch.Tensor:
        arr = self._cache[torch.as_tensor(np.asarray(idx))] if self._cache is not None else self._hwc(idx)
        return arr.permute(0, 3, 1, 2)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255.0)
        c = x.shape[1]
        mean = torch.tensor(self.pre.mean[:c], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.pre.std[:c], device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def sample(self, kind: str, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.images(idx.cpu().numpy()).to(self.device)
        if kind in ("weak", "strong"):
            g = torch.Generator(device=self.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            x = augment(x, kind, g, self.spec)
        return self.normalize(x)


@torch.no_grad()
def predict_images(model: nn.Module, views: ImageViews, n: int, batch: int = 256) -> np.ndarray:
    """Softmax predictions of ``model`` on the un-augmented images: (n, K)."""
    model.eval()
    out = []
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        out.append(torch.softmax(model(views.sample("none", idx, torch.Generator())).float(), -1).cpu())
    return torch.cat(out).numpy()


def distill_head(head: nn.Module, features: torch.Tensor, targets: torch.Tensor, *, epochs: int = 30,
                 batch_size: int = 256, lr: float = 1e-3, generator: torch.Generator | None = None) -> nn.Module:
    """Fit ``head`` (features -> logits) to hard labels ``targets`` with CE (Adam), e.g. the labels an
    end-to-end network gave the training images, so the model predicts from frozen features."""
    head.train()
    opt = build_optimizer("adam", head, lr=lr)
    n = len(features)

    def batches(epoch: int):
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n, batch_size):
            yield perm[s:s + batch_size]

    def step(i: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return F.cross_entropy(head(features[i]), targets[i])

    run_loop(head, step, batches, LoopSpec(epochs=epochs, name="distill head", progress=False), optimizer=opt)
    return head.eval()


def warn_empty_clusters(empty: list[int], n_clusters: int) -> None:
    if empty:
        warnings.warn(f"SPICE-Semi: no reliable sample in cluster(s) {empty} of {n_clusters}; they get no labelled "
                      "examples and continue only through the unlabelled term", stacklevel=3)


__all__ = [
    "FixMatchConfig", "FixMatchLossOutput", "ImageViews", "ReliableSet", "distill_head",
    "fixmatch_loss", "local_consistency", "predict_images", "select_reliable", "train_fixmatch",
    "warn_empty_clusters",
]
