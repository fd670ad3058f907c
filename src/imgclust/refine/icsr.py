"""ICSR: improve a fitted clustering by ranking samples inside clusters and weighted self-training.

ICSR paper (Remote Sensing 14(14) 3317, 2022), sec. 3. Given a fitted model f:

1. **Pseudo-labels**, Eq. (7): y(x) = argmax f(weak(x)) (the model's prediction on a weak view).
2. **Ranking**, Algorithm 1 (:mod:`imgclust.refine.ranking`): inside every pseudo-cluster the
   samples are scored by M = mean + median of the distances to their k nearest cluster-mates
   for n values of k, and majority voting over the n sorted lists forms m groups g_1..g_m
   (g_1 most reliable) from the top fractions p_1 < ... < p_m (15/35/55/75/95 %, each growing by
   ``percent_growth`` points every ``percent_every`` epochs). Distances are taken on the
   frozen features, L2-normalised (``rank_on="features"``, the default) or on the model's
   final layer, its probabilities (``rank_on="proba"``, as in the paper, where the final layer
   is a trained network's). The default is the one that ranked and refined better here: on
   CIFAR-10 / EfficientNet-Lite0 k-means clusters, held-out ACC 0.461 -> 0.472 (features,
   cosine) vs -> 0.451 (probabilities); on digits 0.796 -> 0.812 vs -> 0.805. Probabilities
   also carry no ranking information when the base model's outputs are (near) one-hot.
3. **Weighted label-consistent training**, Eqs. (8)-(11): the classifier is trained on *strong*
   views with the weak-view pseudo-labels, each sample's cross-entropy weighted by its group's
   w_i(t) = 1 - ((i - 1) / m)^((1 + t) beta0) (t = epoch from 0, beta0 = 0.02), i.e.
   L = (1 / B) sum_b w_{g(b)}(t) H(y(weak(x_b)), f(strong(x_b))). Samples in no group (the last
   ~5 %) have weight 0. The pseudo-labels and the ranking are refreshed from the model being
   trained every ``rank_every`` epochs (the reference code re-ranks every round).

What is trained here (head-on-features mode, CPU): a linear classifier on standardised frozen
features (:class:`~imgclust.refine.selftrain.LinearClassifier`), from scratch, so ICSR applies
to *any* fitted imgclust model, including ones with nothing differentiable (k-means). The paper
fine-tunes the clustering network itself, which already reproduces its clusters; here the
first ranking and pseudo-labels come from the base model and stay for ``first_refresh``
epochs (a head after one epoch would relabel the data with an untrained model; a head first
fitted to *all* base labels memorises them and ICSR then changes nothing, as measured), and
from then on the head relabels and re-ranks. The weight schedule is stretched so that a run of
``epochs`` ends where the paper's 240 epochs end (``schedule_epochs``). An epoch is one pass
over the data but at least ``min_steps`` SGD steps. Features are standardised with a floored
std (:func:`robust_std`).

End-to-end mode (``mode=end_to_end``, for a GPU; :func:`train_icsr_end_to_end`): after the head
stage, a trainable copy of the backbone followed by that head (so the network starts from the
head's clusters, as the paper's network starts from its base model) trains on weak / strong
augmented *images* (:mod:`imgclust.data.augment`: flip + shift, RandAugment + Cutout) for
``e2e_epochs`` with the same Eqs. (7)-(11), relabelling from its own predictions of weak views
and re-ranking every ``rank_every`` epochs (on the frozen features by default; on its own
embeddings, the paper's "final layer", with ``rank_on=embedding``); SGD (lr 0.005, momentum 0.9, batch 128:
the paper's), gradient norm clipped to ``clip_grad``, the whole backbone (``finetune=all``, the
paper) or its last blocks. The model then classifies images through the tuned backbone
(``image_level``); its state holds the tuned parameters. Each epoch is checkpointed in the
cache entry (``icsr-e2e-ckpt-<key>.pt``; the key hashes the images, backbone, options, seed and
the head stage's result) and an interrupted run resumes from it; the file is kept afterwards,
so the same command again returns at once (delete it to free the space). On a CPU it runs,
slowly: use ``finetune=last_blocks`` and a small ``image_size``.

Views (``views``): ``noise`` (default) is a feature-space stand-in for image augmentations —
the weak view is the feature itself, the strong view the standardised feature with dropout
(``feature_dropout``) plus Gaussian noise (``noise_std``); it needs no images, so it works for
precomputed features and costs nothing. ``bank`` / ``online`` / ``none`` use
:mod:`imgclust.views` (augmented images through the frozen backbone: weak = flip + shift,
strong = RandAugment + cutout): the bank costs 2 x ``n_views`` backbone passes over the images
the first time (hours for 50,000 images at 224 px on 2 CPU cores) and needs un-reduced
backbone features (no PCA).

Diagnostics: when the true labels are known (used for nothing else), every ranking records
the ranking success rate R_sr(p) for p = 20/40/60/80 % averaged over clusters (paper Eq. 15,
Figure 3), next to the clusters' purity (what a random p % would give); the first and the last
ranking keep the per-cluster values. :func:`imgclust.run.refine_model` writes them to ``icsr.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval, MinLen
from torch import nn

from imgclust.backbones.finetune import FINETUNE_SCOPES, trainable_copy
from imgclust.configcheck import OneOf, check_fields, option
from imgclust.data.augment import DEFAULT_SPEC
from imgclust.errors import InputError
from imgclust.heads.wrap import BackboneHead, features_tensor
from imgclust.losses.icsr import weighted_cross_entropy
from imgclust.refine.base import RefinerInfo, register_refiner
from imgclust.refine.ranking import (
    DEFAULT_PERCENTS,
    METRICS,
    Ranking,
    check_percents,
    group_weights,
    rank_samples,
    success_rate,
)
from imgclust.refine.selftrain import LinearClassifier
from imgclust.train.checkpoint import Checkpoint, data_digest
from imgclust.train.loop import LoopSpec, StepInfo, run_loop
from imgclust.views import VIEW_MODES, FeatureViews, make_feature_views

ICSR_VIEWS = ("noise",) + VIEW_MODES
RANK_ON = ("proba", "features", "embedding")
MODES = ("head", "end_to_end")
WEIGHTING = ("icsr", "uniform")


@dataclass
class ICSRConfig:
    """ICSR's options; defaults from the paper (sec. 4.1.2) unless noted.

    A plain dataclass here (this module must not import :mod:`imgclust.methods`, which imports
    it); :class:`imgclust.methods.icsr.ICSRMethodConfig` adds the method-config behaviour.
    """

    base: str = "kmeans"  # `cluster --method icsr`: the method fitted first (refine uses the model dir's)
    base_options: dict = field(default_factory=dict)
    epochs: int = option(60, Ge(1))  # passes over the data (a linear head on features converges in far fewer than 240)
    schedule_epochs: int = option(240, Ge(1))  # Eq. (11) and the p growth run on t' = t * schedule_epochs / epochs (paper: 240)
    first_refresh: int = option(10, Ge(0))  # epochs on the base model's pseudo-labels and ranking before the head relabels
    min_steps: int = option(20, Ge(0))  # an epoch is one pass over the data but at least this many SGD steps (small sets)
    beta0: float = option(0.02, Gt(0))  # Eq. (11)
    percents: list | tuple = option(DEFAULT_PERCENTS, MinLen(1), each=Interval(gt=0, le=100))  # p_1..p_m in %, increasing
    percent_growth: float = option(1.0, Ge(0))  # points added to every p_j ...
    percent_every: int = option(50, Ge(1))  # ... every this many epochs
    k_start: float = option(1 / 3, Interval(gt=0, le=1))  # k_0 = k_start * N_c
    k_stop: float = option(2 / 3, Interval(gt=0, le=1))  # largest k about k_stop * N_c
    k_step: int = option(5, Ge(1))  # k^
    metric: str = option("euclidean", OneOf(METRICS))  # euclidean | cosine | kl
    rank_on: str = option("features", OneOf(RANK_ON))  # features (frozen, see rank_normalize) | proba (the model's output, as the paper)
    # | embedding (end_to_end: the tuned backbone's features of weak views; head mode: = features)
    rank_normalize: bool = True  # rank_on=features: L2-normalise the features first
    rank_every: int = option(1, Ge(1))  # epochs between two rankings (and pseudo-label refreshes)
    weighting: str = option("icsr", OneOf(WEIGHTING))  # icsr (Eq. 11) | uniform (every sample weight 1: plain self-training, an ablation)
    lr: float = option(0.01, Gt(0))  # SGD with Nesterov momentum 0.9; x0.1 for the last quarter (reference code)
    weight_decay: float = option(1e-4, Ge(0))
    batch_size: int = option(256, Ge(1))
    views: str = option("noise", OneOf(ICSR_VIEWS))  # noise | auto | bank | online | none (see the module doc)
    n_views: int = option(2, Ge(1))  # bank: V weak + V strong views per image
    noise_std: float = option(0.5, Ge(0))  # views=noise: Gaussian noise, in units of each feature's std
    feature_dropout: float = option(0.2, Interval(ge=0, lt=1))  # views=noise: share of (standardised) features zeroed
    block_rows: int = option(1024, Ge(1))  # rows per block of the within-cluster distance matrix
    # end-to-end mode: after the head stage, fine-tune a copy of the backbone + the head on images
    mode: str = option("head", OneOf(MODES))  # head (linear head on frozen features, CPU) | end_to_end (then backbone + head, GPU)
    finetune: str = option("all", OneOf(FINETUNE_SCOPES))  # end_to_end: all (the paper: the whole network) | last_blocks
    finetune_blocks: int = option(2, Ge(1))  # finetune=last_blocks: trailing blocks / stages that train
    e2e_epochs: int = option(30, Ge(1))  # end_to_end: epochs of the image stage (paper: 240 on a GPU)
    e2e_lr: float = option(0.005, Gt(0))  # end_to_end: SGD lr of backbone and head (paper: 0.005, momentum 0.9)
    e2e_batch_size: int = option(128, Ge(1))  # end_to_end: images per step (paper: 128)
    clip_grad: float = option(1.0, Ge(0))  # end_to_end: gradient-norm clip (0 = off; without it the network collapsed on digits)
    image_size: int | None = option(None, Ge(8))  # end_to_end: image side (default: the backbone's, as the features)
    checkpoint: bool = True  # end_to_end: save after every epoch in the cache entry; a re-run resumes

    def __post_init__(self) -> None:
        check_fields(self)  # the ranges declared above (imgclust.configcheck)
        check_percents(self.percents)  # strictly increasing
        if not self.k_start <= self.k_stop:
            raise InputError(f"icsr needs k_start <= k_stop; got {self.k_start}, {self.k_stop}")


class NoiseViews(FeatureViews):
    """Feature-space views: weak = the feature; strong = standardised feature with dropout + noise.

    strong(x) = mean + std * (mask * z / (1 - q) + sigma * eps), z = (x - mean) / std,
    mask ~ Bernoulli(1 - q), eps ~ N(0, 1): a stand-in for image augmentation when no images
    are at hand or their views are too costly to compute.
    """

    mode = "noise"

    def __init__(self, features: torch.Tensor, noise_std: float, dropout: float) -> None:
        super().__init__(features)
        self.mean, self.std = features.mean(0), features.std(0).clamp(min=1e-6)
        self.noise_std, self.dropout = float(noise_std), float(dropout)

    def sample(self, kind: str, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.features[idx]
        if kind == "weak":
            return x
        z = (x - self.mean) / self.std
        if self.dropout > 0:
            keep = torch.rand(z.shape, generator=generator) >= self.dropout
            z = z * keep / (1.0 - self.dropout)
        if self.noise_std > 0:
            z = z + self.noise_std * torch.randn(z.shape, generator=generator)
        return self.mean + self.std * z

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "noise_std": self.noise_std, "feature_dropout": self.dropout}


def make_views(x: torch.Tensor, cfg: ICSRConfig, ctx: Any) -> FeatureViews:
    if cfg.views == "noise":
        return NoiseViews(x, cfg.noise_std, cfg.feature_dropout)
    if cfg.views == "none":
        return FeatureViews(x)
    return make_feature_views(x, ctx, mode=cfg.views, n_views=cfg.n_views, device=torch.device("cpu"))


@dataclass
class ICSRResult:
    classifier: LinearClassifier
    ranking: Ranking  # the last ranking
    pseudo_labels: np.ndarray  # the last pseudo-labels
    history: dict[str, Any] = field(default_factory=dict)
    backbone_state: dict[str, torch.Tensor] = field(default_factory=dict)  # end_to_end: the tuned parameters
    fit_proba: np.ndarray | None = None  # end_to_end: the network's probabilities of the fit images


def schedule_t(cfg: ICSRConfig, t: int, epochs: int | None = None) -> int:
    """The paper's epoch index for our epoch t: t' = floor(t * schedule_epochs / epochs).

    The run then ends where the paper's schedule ends (beta = (1 + 240) * 0.02 = 4.8 in Eq. 11)
    whatever the number of epochs; schedule_epochs = epochs gives Eq. (11) literally.
    """
    return (t * cfg.schedule_epochs) // (epochs or cfg.epochs)


def percents_at(cfg: ICSRConfig, t: int, epochs: int | None = None) -> list[float]:
    """p_j(t) = min(100, p_j + growth * floor(t' / percent_every)), t' = :func:`schedule_t`."""
    grow = cfg.percent_growth * (schedule_t(cfg, t, epochs) // cfg.percent_every)
    return [min(100.0, float(p) + grow) for p in cfg.percents]


def robust_std(x: torch.Tensor) -> torch.Tensor:
    """Per-feature std with a floor of 10 % of the median non-zero std, for standardising.

    Features that (almost) never vary on the fit images, e.g. ReLU units that never fire at a
    small image size (1045 of EfficientNet-Lite0's 1280 on digits at 32 px), would otherwise be
    divided by ~0: once an augmented view or a training backbone moves them, the classifier's
    input explodes (seen: loss 1e12 after one end-to-end epoch; strong views 30x the norm of
    the fit features). With the floor they stay small, and the others are untouched.
    """
    std = x.std(0) if len(x) > 1 else torch.ones(x.shape[1])
    live = std[std > 1e-6]
    floor = 0.1 * float(live.median()) if len(live) else 1.0
    return std.clamp(min=max(floor, 1e-6))


class LinearHead(nn.Module):
    """softmax(((x - mean) / std) @ weight + bias) as a trainable module (the ICSR classifier).

    ``weight`` starts uniform in +-1/sqrt(D) from ``generator``, ``bias`` at 0; ``mean`` / ``std``
    (buffers) standardise the inputs with the statistics of the frozen features.
    """

    def __init__(self, d: int, k: int, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d)
        self.weight = nn.Parameter((torch.rand(d, k, generator=generator) * 2 - 1) * bound)
        self.bias = nn.Parameter(torch.zeros(k))
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight + self.bias

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the ranking space of head mode is the frozen features themselves

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self(z)

    def to_classifier(self) -> LinearClassifier:
        return LinearClassifier(*(t.detach().cpu().clone() for t in (self.weight, self.bias, self.mean, self.std)))

    @classmethod
    def from_classifier(cls, clf: LinearClassifier) -> LinearHead:
        head = cls(clf.weight.shape[0], clf.weight.shape[1], clf.mean, clf.std, torch.Generator())
        with torch.no_grad():
            head.weight.copy_(clf.weight)
            head.bias.copy_(clf.bias)
        return head


@dataclass
class _Loop:
    """What one weighted self-training run needs (:func:`_weighted_selftrain`)."""

    net: nn.Module  # forward(view) -> logits; embed(view) -> ranking features
    opt: torch.optim.Optimizer
    views: Any  # sample(kind, rows, generator) -> model input
    epochs: int
    first_refresh: int  # epochs on the initial pseudo-labels / ranking before the model relabels
    batch_size: int
    lrs: list[float]  # base learning rate of each optimiser group
    rank_frozen: torch.Tensor | None  # fixed ranking space (head mode) or None (the model's embeddings)
    device: torch.device = torch.device("cpu")
    desc: str = "icsr"
    chunk: int = 8192  # rows per forward pass when relabelling
    train_mode: Any = None  # callable(net) putting the net in its training mode (default net.train())
    clip_grad: float = 0.0  # > 0: clip the gradient norm to this (end-to-end)
    lr_option: str = "lr"  # the option a non-finite loss tells the user to lower


def _weighted_selftrain(loop: _Loop, cfg: ICSRConfig, p0: np.ndarray, rank0: torch.Tensor, gen: torch.Generator, *,
                        truth: np.ndarray | None, progress: bool, ckpt: Checkpoint | None = None,
                        ) -> tuple[Ranking, np.ndarray, dict[str, Any]]:
    """Eqs. (7)-(11): rank, weight, train on strong views; relabel and re-rank every ``rank_every`` epochs.

    ``p0`` (N, K): the starting predictions (pseudo-labels and the ranking of epoch 0, on
    ``rank0``). From ``first_refresh`` on, the model's predictions on weak views replace them
    (and, without ``rank_frozen``, its embeddings of those views become the ranking space).
    Runs on :func:`imgclust.train.loop.run_loop` (the optimiser's groups take their base
    learning rates ``loop.lrs`` as ``lr_scale``; the schedule is x1, then x0.1 for the last
    quarter); the pseudo-labels, the ranking and this history resume with a ``ckpt``.
    """
    n, n_clusters = p0.shape
    net, opt, views = loop.net, loop.opt, loop.views
    bs = min(loop.batch_size, n)
    steps = max(math.ceil(n / bs), cfg.min_steps)
    m = len(cfg.percents)
    described = views.describe() if hasattr(views, "describe") else {"mode": getattr(views, "mode", "?")}
    hist: dict[str, Any] = {"loss": [], "weights": [], "rankings": [], "views": described, "steps_per_epoch": steps,
                            "epoch_s": []}
    have_truth = truth is not None and (np.asarray(truth) >= 0).any()
    cur: dict[str, Any] = {"pseudo": p0.argmax(1).astype(np.int64), "ranking": None, "restored": False}
    state: dict[str, Any] = {}

    def restore() -> None:
        """Take the pseudo-labels, ranking and history of a loaded checkpoint (at the first epoch run,
        or after the loop when the checkpoint had every epoch)."""
        if cur["restored"]:
            return
        cur["restored"] = True
        if "pseudo" not in state:
            return
        cur["pseudo"] = state["pseudo"].numpy()
        cur["ranking"] = Ranking(group=state["group"].numpy(), order=state["order"].numpy(),
                                 n_groups=int(state["n_groups"]), n_lists=dict(state["n_lists"]))
        hist.clear()
        hist.update(json.loads(state["history"]))
        hist["resumed_at"] = int(state["epoch"])

    def to_norm(z: torch.Tensor) -> torch.Tensor:
        return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12) if cfg.rank_normalize else z

    @torch.no_grad()
    def relabel() -> tuple[torch.Tensor, torch.Tensor]:
        """The model's probabilities and embeddings of weak views of every sample (eval mode)."""
        net.eval()
        probs, embs = [], []
        for s0 in range(0, n, loop.chunk):
            rows = torch.arange(s0, min(s0 + loop.chunk, n))
            v = views.sample("weak", rows, gen).to(loop.device)
            z = net.embed(v)
            probs.append(torch.softmax(net.classify(z), 1).float().cpu())
            if loop.rank_frozen is None:
                embs.append(z.float().cpu())
        return torch.cat(probs), (torch.cat(embs) if embs else torch.empty(0))

    def rank(t: int) -> None:
        """Rank at t = 0 with the starting outputs; from ``first_refresh`` on, every ``rank_every``
        epochs with the model's own predictions on weak views."""
        refresh = t >= loop.first_refresh and (t - loop.first_refresh) % cfg.rank_every == 0
        if not (t == 0 or refresh):
            return
        if refresh and t > 0:
            proba, emb = relabel()
        else:
            proba, emb = torch.from_numpy(p0), torch.empty(0)
        new = proba.argmax(1).numpy()
        changed = int((new != cur["pseudo"]).sum())
        pseudo = cur["pseudo"] = new
        if cfg.rank_on == "proba":
            space = proba
        elif loop.rank_frozen is not None:
            space = loop.rank_frozen
        else:
            space = to_norm(emb) if len(emb) else rank0
        pct = percents_at(cfg, t, loop.epochs)
        ranking = cur["ranking"] = rank_samples(space, pseudo, n_clusters, percents=pct, k_start=cfg.k_start,
                                                k_stop=cfg.k_stop, k_step=cfg.k_step, metric=cfg.metric,
                                                block_rows=cfg.block_rows)
        rec: dict[str, Any] = {"epoch": t, "percents": pct, "changed": changed,
                               "group_sizes": np.bincount(ranking.group, minlength=m + 1).tolist(),
                               "cluster_sizes": np.bincount(pseudo, minlength=n_clusters).tolist()}
        if have_truth:
            sr = success_rate(ranking, pseudo, np.asarray(truth), n_clusters)
            rec["mean_rsr"], rec["mean_purity"] = sr["mean_rsr"], sr["mean_purity"]
            if t == 0:
                hist["rsr_first"] = sr
            rec["acc_pseudo"] = _acc(np.asarray(truth), pseudo)
        hist["rankings"].append(rec)

    def batches(t: int):
        """Epoch t: (re-)rank, weight the groups (Eq. 11), then strong views of a permutation."""
        restore()
        cur["t0"] = time.perf_counter()
        rank(t)
        ts = schedule_t(cfg, t, loop.epochs)
        w_group = group_weights(m, ts, cfg.beta0) if cfg.weighting == "icsr" else np.append(np.ones(m), 0.0)
        cur["w_group"] = w_group
        cur["w_sample"] = torch.from_numpy(w_group.astype(np.float32))[torch.from_numpy(cur["ranking"].group)]
        cur["targets"] = torch.from_numpy(cur["pseudo"])
        (loop.train_mode or (lambda mod: mod.train()))(net)
        perm = torch.randperm(n, generator=gen)
        for it in range(steps):
            first = (it * bs) % n
            if first + bs > n and it > 0:  # more steps than one pass (small data): a fresh permutation
                perm = torch.randperm(n, generator=gen)
                first = 0
            rows = perm[first:first + bs]
            yield views.sample("strong", rows, gen).to(loop.device), rows

    def step(batch: tuple[torch.Tensor, torch.Tensor], info: StepInfo) -> torch.Tensor:
        x, rows = batch
        return weighted_cross_entropy(net(x), cur["targets"][rows].to(loop.device),
                                      cur["w_sample"][rows].to(loop.device))

    def epoch_end(t: int, means: dict[str, float], info: StepInfo) -> None:
        hist["loss"].append(round(means["loss"], 5))
        hist["weights"].append([round(float(v), 5) for v in cur["w_group"][:m]])
        hist["epoch_s"].append(round(time.perf_counter() - cur["t0"], 3))
        ranking = cur["ranking"]
        state.update(epoch=t + 1, pseudo=torch.from_numpy(cur["pseudo"]), group=torch.from_numpy(ranking.group),
                     order=torch.from_numpy(ranking.order), n_groups=int(ranking.n_groups),
                     n_lists={int(c): int(v) for c, v in ranking.n_lists.items()},
                     history=json.dumps(hist, default=float))  # plain text: nothing for the unpickler to trust

    for g, lr in zip(opt.param_groups, loop.lrs, strict=True):
        g["lr_scale"] = lr
    last = int(0.75 * loop.epochs)
    spec = LoopSpec(epochs=loop.epochs, name=loop.desc, lr=[1.0 if t < last else 0.1 for t in range(loop.epochs)
                                                            for _ in range(steps)],
                    clip_grad_norm=loop.clip_grad or None, option=loop.lr_option, option_value=loop.lrs[0],
                    progress=progress)
    run_loop(net, step, batches, spec, optimizer=opt, on_epoch_end=epoch_end, generators=[gen], state=state,
             checkpoint=ckpt)
    restore()  # a checkpoint of a finished run: nothing was trained
    ranking, pseudo = cur["ranking"], cur["pseudo"]
    if ranking is None:  # epochs >= 1 always ranks at t = 0
        raise AssertionError("no ranking")
    if have_truth:
        hist["rsr_last"] = success_rate(ranking, pseudo, np.asarray(truth), n_clusters)
    return ranking, pseudo, hist


def train_icsr(
    features: np.ndarray,
    base_proba: np.ndarray,
    n_clusters: int,
    cfg: ICSRConfig,
    views: FeatureViews | None = None,
    *,
    truth: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = False,
) -> ICSRResult:
    """ICSR on ``features`` (N, D) starting from the base model's ``base_proba`` (N, K): a linear
    head on the frozen features (head mode; see the module doc).

    ``truth`` (true labels, -1 = unknown) feeds the R_sr diagnostics only.
    """
    t_start = time.perf_counter()
    x = torch.from_numpy(np.array(features, dtype=np.float32, copy=True))
    p0 = np.asarray(base_proba, dtype=np.float32)
    n, d = x.shape
    if p0.shape != (n, n_clusters):
        raise InputError(f"base probabilities have shape {p0.shape}, expected ({n}, {n_clusters})")
    if n < 2:
        raise InputError("ICSR needs at least 2 samples")
    if views is None:
        if cfg.views not in ("noise", "none"):
            raise InputError(f"views={cfg.views} needs the images: build them with make_views(features, cfg, ctx)")
        views = make_views(x, cfg, None)
    gen = torch.Generator().manual_seed(int(seed))
    x_rank = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12) if cfg.rank_normalize else x
    head = LinearHead(d, n_clusters, x.mean(0), robust_std(x), gen)
    opt = torch.optim.SGD([{"params": [head.weight], "weight_decay": cfg.weight_decay},
                           {"params": [head.bias], "weight_decay": 0.0}], lr=cfg.lr, momentum=0.9, nesterov=True)
    loop = _Loop(net=head, opt=opt, views=views, epochs=cfg.epochs, first_refresh=cfg.first_refresh,
                 batch_size=cfg.batch_size, lrs=[cfg.lr, cfg.lr], rank_frozen=x_rank, desc="icsr")
    ranking, pseudo, hist = _weighted_selftrain(loop, cfg, p0, x_rank, gen, truth=truth, progress=progress)
    if not all(torch.isfinite(t).all() for t in (head.weight, head.bias)):
        raise InputError(f"ICSR training diverged at lr={cfg.lr}; give a smaller lr")
    hist["seconds"] = round(time.perf_counter() - t_start, 3)
    return ICSRResult(head.to_classifier(), ranking, pseudo, hist)


def _e2e_checkpoint(work_dir: str | Path, cfg: ICSRConfig, n_clusters: int, seed: int, source: Any,
                    rows: np.ndarray, backbone: Any, head: LinearClassifier) -> Checkpoint:
    """The end-to-end stage's checkpoint (:mod:`imgclust.train.checkpoint`): every option counts
    (e2e_epochs too: the weight and lr schedules depend on it) but not ``checkpoint``, and the
    head stage's result (the starting network) is part of the data digest."""
    from dataclasses import asdict

    opts = {k: v for k, v in asdict(cfg).items() if k != "checkpoint"}
    data = data_digest(np.asarray(rows, dtype=np.int64), head.weight, head.bias)
    return Checkpoint.in_dir(work_dir, "icsr-e2e", k=int(n_clusters), seed=int(seed), opts=opts,
                             source=source.fingerprint(), backbone=backbone.cache_key(), data=data)


def train_icsr_end_to_end(
    head: LinearClassifier,
    features: np.ndarray,
    n_clusters: int,
    cfg: ICSRConfig,
    *,
    source: Any,
    backbone: Any,
    rows: np.ndarray,
    device: torch.device | str = "cpu",
    work_dir: str | Path | None = None,
    truth: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = False,
) -> ICSRResult:
    """ICSR's image stage: a trainable copy of ``backbone`` followed by ``head`` (the head stage's
    classifier, trained on ``features`` = the frozen backbone's features of ``source[rows]``)
    trained on weak / strong augmented images for ``e2e_epochs`` with Eqs. (7)-(11).

    The network starts where the head stage ended (its predictions are the head's on the frozen
    features), relabels its weak views and re-ranks every ``rank_every`` epochs on its own
    L2-normalised embeddings (``rank_on=embedding``, the paper's "final layer"), the frozen features
    (``rank_on=features``, the default, as in the head stage) or its
    probabilities. The backbone stays in eval mode (BatchNorm statistics and stochastic depth of
    the pretrained model; the paper trains its network's BatchNorm) and only the layers of
    ``finetune`` train. With ``work_dir`` the state after every epoch is checkpointed there and a
    re-run resumes. Returns the tuned head, the tuned backbone parameters (``backbone_state``) and
    the network's probabilities of the images (``fit_proba``).
    """
    import dataclasses
    import warnings

    from imgclust.features import resolve_device
    from imgclust.refine.fixmatch import ImageViews, predict_images

    t_start = time.perf_counter()
    dev = resolve_device(device) if isinstance(device, str) else device
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    rows = np.asarray(rows, dtype=np.int64)
    if source is None or backbone is None or len(rows) != n:
        raise InputError("icsr mode=end_to_end needs the images: refine or fit on an image source, not on "
                         "precomputed features")
    if int(getattr(backbone, "dim", -1)) != x.shape[1]:
        raise InputError(f"icsr mode=end_to_end needs the backbone's own {getattr(backbone, 'dim', '?')}-d "
                         f"features (no pca); got {x.shape[1]}-d")
    pre = backbone.preprocess if not cfg.image_size else dataclasses.replace(backbone.preprocess, size=cfg.image_size)
    bb, tuned = trainable_copy(backbone, cfg.finetune, cfg.finetune_blocks, device=dev)
    if dev.type != "cuda":
        warnings.warn("icsr mode=end_to_end on a CPU trains the backbone: expect it to be slow (a GPU is the "
                      "intended device; finetune=last_blocks and a small image_size help)", stacklevel=2)
    start = LinearHead.from_classifier(head)
    net = BackboneHead(bb, start).to(dev)
    opt = torch.optim.SGD([{"params": [prm for _, prm in tuned], "weight_decay": cfg.weight_decay},
                           {"params": [net.head.weight], "weight_decay": cfg.weight_decay},
                           {"params": [net.head.bias], "weight_decay": 0.0}],
                          lr=cfg.e2e_lr, momentum=0.9, nesterov=True)
    views = ImageViews(source, rows, pre, DEFAULT_SPEC, dev)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    p0 = head.predict_proba(x).astype(np.float32)
    xt = features_tensor(x)
    rank0 = xt / xt.norm(dim=1, keepdim=True).clamp(min=1e-12) if cfg.rank_normalize else xt

    def train_mode(mod: nn.Module) -> None:
        mod.train()
        mod.backbone.eval()

    loop = _Loop(net=net, opt=opt, views=views, epochs=cfg.e2e_epochs, first_refresh=0, batch_size=cfg.e2e_batch_size,
                 lrs=[cfg.e2e_lr] * 3, rank_frozen=None if cfg.rank_on == "embedding" else rank0, device=dev, desc=f"icsr end-to-end ({cfg.finetune})",
                 chunk=max(64, 2 * cfg.e2e_batch_size), train_mode=train_mode, clip_grad=cfg.clip_grad,
                 lr_option="e2e_lr")
    ckpt = None
    if cfg.checkpoint and work_dir is not None:
        ckpt = _e2e_checkpoint(work_dir, cfg, n_clusters, seed, source, rows, backbone, head)
    ranking, pseudo, hist = _weighted_selftrain(loop, cfg, p0, rank0, gen, truth=truth, progress=progress, ckpt=ckpt)
    probs = predict_images(net, views, n, batch=loop.chunk)
    if not np.isfinite(probs).all():
        raise InputError(f"ICSR end-to-end training diverged at e2e_lr={cfg.e2e_lr}; give a smaller e2e_lr")
    steps = hist["steps_per_epoch"]
    hist.update(finetune=cfg.finetune, finetune_params=int(sum(prm.numel() for _, prm in tuned)),
                image_size=int(pre.size), device=str(dev), checkpoint=None if ckpt is None else str(ckpt.path),
                train_images_per_s=[round(steps * min(cfg.e2e_batch_size, n) / max(s, 1e-9), 2)
                                    for s in hist["epoch_s"]],
                seconds=round(time.perf_counter() - t_start, 3))
    state = {nm: prm.detach().cpu().clone() for nm, prm in tuned}
    return ICSRResult(net.head.cpu().to_classifier(), ranking, pseudo, hist, backbone_state=state, fit_proba=probs)


def _acc(truth: np.ndarray, labels: np.ndarray) -> float:
    from imgclust.metrics import evaluate

    ok = truth >= 0
    return round(float(evaluate(truth[ok], labels[ok])["acc"]), 5) if ok.any() else float("nan")


# --------------------------------------------------------------------------- the refiner entry
def _outputs(options: dict[str, Any], hist: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``icsr.json`` (options, history, R_sr(p) before / after) and run.json's ``mean_rsr``."""
    diag = {"options": options, "history": hist, "rsr_before": hist.get("rsr_first"), "rsr_after": hist.get("rsr_last")}
    return diag, {"mean_rsr": {"before": (hist.get("rsr_first") or {}).get("mean_rsr"),
                               "after": (hist.get("rsr_last") or {}).get("mean_rsr")}}


register_refiner(RefinerInfo(
    name="icsr", method="icsr", diagnostics="icsr.json", outputs=_outputs,
    description="rank samples inside clusters by neighbourhood density, then weighted self-training (ICSR)"))
