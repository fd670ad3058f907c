"""SPICE (Niu et al., "SPICE: Semantic Pseudo-labeling for Image Clustering", IEEE TIP 2022).

``spice-self`` — SPICE-Self (paper sec. 3.2, Algorithm 1) on a frozen backbone. Ten MLP
heads (one batched module, :class:`~imgclust.heads.spice.MultiHeadMLP`) are trained
together. Each epoch visits the data in pools of M images; for every pool:

1. predictions P of every head on the pool's *weak* views, embeddings F = the
   L2-normalised features of the original images;
2. per head and cluster, the prototype = mean embedding of the r M / k most confident
   samples (r = 0.5); the M / k samples most cosine-similar to it get that label (overlap
   assignment by default);
3. every head is trained on the *strong* views of its own pseudo-labelled samples in
   mini-batches of m_2 = 128 with the double-softmax cross-entropy (DS-CE).

After every epoch each head's DS-CE over the whole data set is computed the same way with
M = N on the original features (no labels); the head and epoch with the lowest value are
kept (as the reference code's ``checkpoint_select``). Predictions are that head's softmax.

``spice`` — SPICE-Self followed by SPICE-Semi (sec. 3.3): reliable samples by local
consistency (more than tau_c = 95% of the n_s = 100 nearest neighbours share the label),
the number found per cluster reported (``history_["reliable_per_cluster"]``; clusters without any are named in a warning, and if
fewer than ``semi_min_clusters`` (half) of the clusters have any, SPICE-Semi is skipped and
the SPICE-Self result kept), then FixMatch
(mu = 7, tau = 0.95, EMA 0.999) training a fresh classifier: an MLP head on frozen features
and their views (``semi_mode="head"``, the CPU default) or a trainable copy of the backbone
plus head on augmented images (``semi_mode="end_to_end"``, for a GPU; the network's
predictions are then distilled into a head on frozen features so ``predict`` works from
features like every method). The paper retrains a WideResNet from scratch on a GPU.

Views (``views`` option, see :mod:`imgclust.views`): ``auto`` = a precomputed bank of
``n_views`` weak + ``n_views`` strong views per image on a CPU, fresh views on a GPU,
un-augmented features when fitting precomputed features (``none``).

Defaults follow the paper (M = 1,000 for 10 clusters, scaled as its 1,500 / 2,000 / 5,000
for 15 / 20 / 200; m_2 = 128, 256 from 200 clusters; r = 0.5; 10 heads; n_s = 100;
tau_c = 0.95; mu = 7; tau = 0.95) and the reference code where the paper is silent (Adam,
lr 0.005, no weight decay; MLP heads; the reliable set cut to the same size in every cluster
that has any — on CIFAR-10 / EfficientNet features this took SPICE from 0.454 to 0.493 ACC,
because the unbalanced set, 5 to 378 per cluster, biased FixMatch towards the big clusters).
CPU-sized departures: the hidden layer has 128 units (reference: the feature dimension, 512
for its MoCo ResNet; with 1280-d EfficientNet features that would cost 10x more per head,
and 512 units did not score better in a quick check); ``epochs = 30`` (reference: 100; on
CIFAR-10 / EfficientNet features the selected epoch was 0-1) — see ``benchmarks/spice.py``
for the cost per epoch; FixMatch runs 2,000 steps on the head
(FixMatch: 2^20 on a GPU, for a whole network).

SPICE-Self's heads train in the shared loop (:func:`imgclust.train.loop.run_loop`; losses in
:mod:`imgclust.losses.spice`), checkpointed every epoch to ``<work_dir>/<name>-ckpt-<key>.pt``
when the fit has a work directory, so a killed run resumes to the same heads
(``checkpoint=false``: off). SPICE-Semi (FixMatch) is not resumable yet.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclust.data.augment import AugmentSpec
from imgclust.errors import InputError
from imgclust.heads.spice import HEAD_NORMS, MultiHeadMLP
from imgclust.losses.spice import LOSSES, cluster_loss, cluster_probs, prototype_pseudo_labels
from imgclust.methods.base import (
    ClusteringMethod,
    FitContext,
    MethodConfig,
    register_method,
)
from imgclust.train import dist
from imgclust.train.checkpoint import Checkpoint, data_digest
from imgclust.train.loop import LoopSpec, StepInfo, run_loop
from imgclust.train.optim import build_optimizer
from imgclust.views import VIEW_MODES, FeatureViews, make_feature_views

SEMI_MODES = ("head", "end_to_end")


def default_pool_size(k: int) -> int:
    """The paper's M: 1,000 / 1,500 / 2,000 / 5,000 for 10 / 15 / 20 / 200 clusters, i.e. 100 k capped at 5,000."""
    return int(min(max(100 * k, 1000), 5000))


@dataclass
class SPICESelfConfig(MethodConfig):
    """Options of ``spice-self`` (paper / reference-code defaults unless noted)."""

    heads: int = 10  # number of CLSHeads trained together
    hidden: int = 128  # MLP hidden units (reference: = feature dim, 512; 128 keeps 1280-d inputs cheap on a CPU)
    norm: str = "standardize"  # head input: "standardize" (frozen mean/std), "l2" or "none" (reference: raw)
    pool_size: int = 0  # M; 0: the paper's value for K (1000 for K <= 10, 100 K up to 5000)
    batch_size: int = 0  # m_2; 0: the paper's 128 (256 from K = 200)
    ratio: float = 0.5  # r, confident ratio for the prototypes
    overlap: bool = True  # overlap assignment (paper default) or non-overlap
    loss: str = "dsce"  # "dsce" | "ce" | "tce" (ablation, paper Table 4)
    temperature: float = 0.2  # T of the temperature CE ("tce")
    epochs: int = 30  # reference: 100; CPU default
    repeats: int = 1  # passes over a pool's labelled samples (Algorithm 1: 1; reference code: 8 at M = 5000)
    lr: float = 0.005  # Adam (reference)
    weight_decay: float = 0.0
    select_every_epoch: bool = True  # keep the (epoch, head) with the lowest whole-data DS-CE
    views: str = "auto"  # "auto" | "bank" | "online" | "none"
    n_views: int = 2  # bank: V weak + V strong views per image
    view_image_size: int = 0  # 0: the backbone's input size
    shift: float = 0.125  # weak view: max translation (fraction of the side)
    n_ops: int = 4  # strong view: RandAugment ops per image
    cutout: float = 0.5  # strong view: max Cutout side (fraction)
    checkpoint: bool = True  # save every epoch under the fit's work dir; a killed run resumes there

    def __post_init__(self) -> None:
        if self.norm not in HEAD_NORMS:
            raise InputError(f"norm must be one of {', '.join(HEAD_NORMS)}; got {self.norm!r}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.views not in VIEW_MODES:
            raise InputError(f"views must be one of {', '.join(VIEW_MODES)}; got {self.views!r}")
        for name in ("heads", "hidden", "epochs", "repeats", "n_views"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer; got {v!r}")
        for name in ("pool_size", "batch_size", "view_image_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"{name} must be a non-negative integer (0: default); got {v!r}")
        for name in ("overlap", "select_every_epoch", "checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise InputError(f"ratio must be in (0, 1]; got {self.ratio}")
        if not self.temperature > 0 or not self.lr > 0 or self.weight_decay < 0:
            raise InputError("temperature and lr must be > 0, weight_decay >= 0")
        AugmentSpec(self.shift, self.n_ops, self.cutout)  # validates the view options

    def spec(self) -> AugmentSpec:
        return AugmentSpec(self.shift, self.n_ops, self.cutout)


@dataclass
class SPICEConfig(SPICESelfConfig):
    """``spice`` = SPICE-Self + SPICE-Semi (reliable labels + FixMatch)."""

    reliable_neighbors: int = 100  # n_s
    reliable_threshold: float = 0.95  # tau_c: beta_i > tau_c
    reliable_confidence: float = 0.0  # also max p_i > this (reference code: 0.99; not in the paper)
    balance_reliable: bool = True  # reference code (paper silent): equal count per cluster that has any
    semi_mode: str = "head"  # "head" (CPU) | "end_to_end" (GPU)
    semi_steps: int = 2000
    semi_batch_size: int = 64  # B
    mu: int = 7
    semi_threshold: float = 0.95  # tau
    semi_lr: float = 0.03
    semi_weight_decay: float = 5e-4
    ema: float = 0.999
    unsup_weight: float = 1.0
    distill_epochs: int = 30  # end_to_end: head on frozen features fitted to the network's labels
    semi_min_clusters: float = 0.5  # run SPICE-Semi only if this share of clusters has reliable samples

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.semi_mode not in SEMI_MODES:
            raise InputError(f"semi_mode must be one of {', '.join(SEMI_MODES)}; got {self.semi_mode!r}")
        if not isinstance(self.balance_reliable, bool):
            raise InputError(f"balance_reliable must be true or false; got {self.balance_reliable!r}")
        for name in ("reliable_neighbors", "distill_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer; got {v!r}")
        if not 0.0 <= self.semi_min_clusters <= 1.0:
            raise InputError(f"semi_min_clusters must be in [0, 1]; got {self.semi_min_clusters}")
        if not 0.0 <= self.reliable_threshold < 1.0 or not 0.0 <= self.reliable_confidence < 1.0:
            raise InputError("reliable_threshold and reliable_confidence must be in [0, 1)")
        self.fixmatch()  # validates the FixMatch options

    def fixmatch(self):
        from imgclust.refine.fixmatch import FixMatchConfig

        return FixMatchConfig(steps=self.semi_steps, batch_size=self.semi_batch_size, mu=self.mu,
                              threshold=self.semi_threshold, unsup_weight=self.unsup_weight, lr=self.semi_lr,
                              weight_decay=self.semi_weight_decay, ema=self.ema)


class SingleHead(nn.Module):
    """One MLP head as a plain (B, D) -> (B, K) classifier (FixMatch's model on frozen features)."""

    def __init__(self, mlp: MultiHeadMLP) -> None:
        super().__init__()
        if mlp.n_heads != 1:
            raise InputError("SingleHead wraps a MultiHeadMLP with one head")
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.forward_head(x, 0)


@register_method
class SPICESelf(ClusteringMethod):
    """SPICE-Self: prototype pseudo-labels + DS-CE, 10 MLP heads on frozen features."""

    name = "spice-self"
    Config = SPICESelfConfig
    config: SPICESelfConfig

    def __init__(self, n_clusters: int, config: SPICESelfConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.heads_: MultiHeadMLP | None = None
        self.best_head_: int = 0
        self.head_losses_: np.ndarray | None = None
        self._views: FeatureViews | None = None

    # ------------------------------------------------------------------ helpers
    def _pool_and_batch(self, n: int) -> tuple[int, int]:
        m = self.config.pool_size or default_pool_size(self.n_clusters)
        m2 = self.config.batch_size or (256 if self.n_clusters >= 200 else 128)
        return min(m, n), m2

    @torch.no_grad()
    def _all_logits(self, heads: MultiHeadMLP, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        heads.eval()
        return torch.cat([heads(x[s:s + chunk]) for s in range(0, len(x), chunk)], dim=1)

    @torch.no_grad()
    def selection_losses(self, heads: MultiHeadMLP, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Each head's loss over the whole data (Algorithm 1's steps 1-3 with M = N, original images): (H,)."""
        cfg = self.config
        logits = self._all_logits(heads, x)
        probs = cluster_probs(logits, cfg.loss, cfg.temperature)
        idx, lab = prototype_pseudo_labels(probs, emb, cfg.ratio, overlap=True)
        sel = logits.gather(1, idx[:, :, None].expand(-1, -1, logits.shape[-1]))
        return cluster_loss(sel, lab, cfg.loss, cfg.temperature).mean(dim=1)

    # ------------------------------------------------------------------ training
    def fit(self, features: np.ndarray, ctx: FitContext) -> SPICESelf:
        self._fit_self(features, ctx)
        self._views = None
        return self

    def _fit_self(self, features: np.ndarray, ctx: FitContext) -> torch.Tensor:
        from imgclust.features import resolve_device

        cfg, k = self.config, self.n_clusters
        t0 = time.perf_counter()
        x_np = np.ascontiguousarray(features, dtype=np.float32)
        n, d = x_np.shape
        if n < k:
            raise InputError(f"K={k} is larger than the number of images ({n})")
        device = resolve_device(ctx.device)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        x = torch.from_numpy(x_np).to(device)
        emb = F.normalize(x, dim=1)
        views = make_feature_views(x, ctx, mode=cfg.views, n_views=cfg.n_views,
                                   image_size=cfg.view_image_size or None, spec=cfg.spec(), device=device)
        self._views = views
        t_views = time.perf_counter() - t0

        heads = MultiHeadMLP(d, k, cfg.heads, cfg.hidden, cfg.norm, generator=gen)
        heads.set_standardization(x.mean(0).cpu(), x.std(0).cpu() if n > 1 else torch.ones(d))
        heads.to(device)
        # SPICE's reference decays every parameter (its Adam has no groups): kept, so no no-decay rule here
        opt = build_optimizer("adam", [{"params": list(heads.parameters())}], lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
        m, m2 = self._pool_and_batch(n)
        n_pools = max(1, n // m)  # Algorithm 1: floor(N / M) pools per epoch
        # --- issue 20: data-parallel under torchrun. Every rank draws the same pool, views and
        # pseudo-labels (same generator, same heads: the per-cluster top-confident selection is made
        # on the whole pool on every rank, identically, without communication) and trains on its
        # slice of each mini-batch; run_loop averages the gradients over ranks.
        if m2 % dist.world_size():
            raise InputError(f"{self.name}: batch size {m2} must be a multiple of the {dist.world_size()} processes")
        mine = dist.shard(m2)
        state: dict = {"loss_sum": torch.zeros(cfg.heads, dtype=torch.float64), "best_loss": float("inf"),
                       "best_state": None, "best_epoch": -1, "head_losses": None, "best_head": 0}

        def batches(epoch: int):
            perm = torch.randperm(n, generator=gen)
            for b in range(n_pools):
                pool = perm[b * m:(b + 1) * m]
                # Step 1: predictions on weak views; embeddings of the originals.
                with torch.no_grad():
                    heads.eval()
                    probs = cluster_probs(heads(views.sample("weak", pool, gen)), cfg.loss, cfg.temperature)
                # Step 2: prototypes and pseudo-labels, per head.
                idx, lab = prototype_pseudo_labels(probs, emb[pool.to(device)], cfg.ratio, cfg.overlap, gen)
                # Step 3: train each head on strong views of its own labelled samples.
                strong = views.sample("strong", pool, gen)
                heads.train()
                n_lab = idx.shape[1]
                steps = max(1, n_lab // m2)
                for _ in range(cfg.repeats):
                    order = torch.randperm(n_lab, generator=gen).to(device)
                    for st in range(steps):
                        cols = order[st * m2:(st + 1) * m2][mine.start:mine.stop]  # issue 20: this rank's slice
                        yield strong[idx[:, cols]], lab[:, cols]  # (H, m2, D): each head its own samples

        def step(batch, info: StepInfo) -> torch.Tensor:
            xb, yb = batch
            per_head = cluster_loss(heads(xb), yb, cfg.loss, cfg.temperature).mean(dim=1)
            state["loss_sum"] += per_head.detach().double().cpu()
            return per_head.mean()

        def epoch_end(epoch: int, means: dict[str, float], info: StepInfo) -> dict:
            dist.all_reduce_mean(state["loss_sum"])  # issue 20: the global batch's loss on every rank
            train_loss = (state["loss_sum"] / max(info.it, 1)).numpy()
            state["loss_sum"] = torch.zeros_like(state["loss_sum"])
            out: dict = {"train_loss": [round(float(v), 5) for v in train_loss]}
            if cfg.select_every_epoch or epoch == cfg.epochs - 1:
                sel = self.selection_losses(heads, x, emb).cpu()
                out.update(select_loss=[round(float(v), 5) for v in sel], best_head_per_epoch=int(sel.argmin()))
                if float(sel.min()) < state["best_loss"]:
                    state.update(best_loss=float(sel.min()), best_epoch=epoch, head_losses=sel,
                                 best_head=int(sel.argmin()),
                                 best_state={kk: v.detach().clone() for kk, v in heads.state_dict().items()})
            return out

        ckpt = Checkpoint.in_dir(ctx.work_dir if cfg.checkpoint else None, self.name, k=k, seed=int(ctx.seed),
                                 opts=self.config.to_dict(), data=data_digest(x_np), views=views.describe())
        res = run_loop(heads, step, batches,
                       LoopSpec(cfg.epochs, f"{self.name} heads", option="lr", option_value=cfg.lr,
                                progress=ctx.progress),
                       optimizer=opt, on_epoch_end=epoch_end, generators=[gen], state=state, checkpoint=ckpt)
        hist = {key: res.history.get(key, []) for key in ("train_loss", "select_loss", "best_head_per_epoch")}
        hist["epoch_s"] = res.epoch_s
        best_state, best_loss, best_epoch = state["best_state"], state["best_loss"], state["best_epoch"]
        self.head_losses_, self.best_head_ = state["head_losses"].numpy(), int(state["best_head"])
        assert best_state is not None
        heads.load_state_dict(best_state)
        heads.requires_grad_(False)
        self.heads_ = heads.eval().cpu()
        logits = self._all_logits(self.heads_, x.cpu())
        self.head_labels_ = logits.argmax(-1).numpy().astype(np.int32)  # (H, N)
        self.labels_ = self.head_labels_[self.best_head_].astype(np.int64)
        sizes = np.bincount(self.labels_, minlength=k)
        self.history_ = {
            **hist,
            "best_head": self.best_head_,
            "best_epoch": best_epoch,
            "best_select_loss": best_loss,
            "head_losses": [float(v) for v in self.head_losses_],
            "cluster_sizes": sizes.tolist(),
            "empty_clusters": [int(c) for c in np.flatnonzero(sizes == 0)],
            "pool_size": m,
            "batch_size": m2,
            "pools_per_epoch": n_pools,
            "views": views.describe(),
            "views_s": round(t_views, 3),
            "train_s": round(time.perf_counter() - t0 - t_views, 3),
            "resumed_from_epoch": res.resumed_from,
            "checkpoint": None if ckpt.path is None else str(ckpt.path),
        }
        return x

    # ------------------------------------------------------------------ inference
    def _check(self) -> MultiHeadMLP:
        if self.heads_ is None:
            raise InputError(f"this {self.name} model is not fitted yet")
        return self.heads_

    @torch.no_grad()
    def self_proba(self, features: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """SPICE-Self's best head: its cluster probabilities (N, K)."""
        heads = self._check().eval()
        x = np.asarray(features, dtype=np.float32)
        out = [cluster_probs(heads.forward_head(torch.from_numpy(np.ascontiguousarray(x[s:s + chunk])), self.best_head_),
                             self.config.loss, self.config.temperature).numpy() for s in range(0, len(x), chunk)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.n_clusters), np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.self_proba(features)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        heads = self._check()
        state = {f"heads.{kk}": v.detach().clone() for kk, v in heads.state_dict().items()}
        state["best_head"] = torch.tensor(self.best_head_)
        if self.head_losses_ is not None:
            state["head_losses"] = torch.from_numpy(np.asarray(self.head_losses_, dtype=np.float64))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.heads_ = _load_mlp(state, "heads.", self.n_clusters, self.config.norm, self.name)
        if "best_head" not in state:
            raise InputError(f"not a {self.name} state: best_head missing")
        self.best_head_ = int(state["best_head"])
        if not 0 <= self.best_head_ < self.heads_.n_heads:
            raise InputError(f"saved best head {self.best_head_} is out of range")
        self.head_losses_ = state["head_losses"].numpy() if "head_losses" in state else None


def _load_mlp(state: dict[str, torch.Tensor], prefix: str, k: int, norm: str, name: str) -> MultiHeadMLP:
    w1, w2 = state.get(f"{prefix}w1"), state.get(f"{prefix}w2")
    if w1 is None or w2 is None or w1.ndim != 3 or w2.ndim != 3:
        raise InputError(f"not a {name} state: {prefix}w1 (H, D, E) / {prefix}w2 (H, E, K) missing")
    h, d, e = w1.shape
    if w2.shape[-1] != k:
        raise InputError(f"saved model has K={w2.shape[-1]} clusters, expected {k}")
    mlp = MultiHeadMLP(d, k, h, e, norm)
    try:
        mlp.load_state_dict({kk[len(prefix):]: v for kk, v in state.items() if kk.startswith(prefix)})
    except RuntimeError as err:
        raise InputError(f"saved {name} heads do not fit: {err}") from err
    mlp.requires_grad_(False)
    return mlp.eval()


@register_method
class SPICE(SPICESelf):
    """SPICE = SPICE-Self, then SPICE-Semi (reliable labels by local consistency + FixMatch)."""

    name = "spice"
    Config = SPICEConfig
    config: SPICEConfig

    def __init__(self, n_clusters: int, config: SPICEConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.semi_: SingleHead | None = None

    @property
    def inputs(self) -> str:
        """Images for ``semi_mode=end_to_end`` and for image views (``views=bank|online``)."""
        return "images" if self.config.semi_mode == "end_to_end" or self.config.views in ("bank", "online") else "features"

    def fit(self, features: np.ndarray, ctx: FitContext) -> SPICE:
        from imgclust.features import resolve_device
        from imgclust.refine.fixmatch import (
            select_reliable,
            train_fixmatch,
            warn_empty_clusters,
        )

        cfg, k = self.config, self.n_clusters
        x = self._fit_self(features, ctx).cpu()
        views = self._views
        assert views is not None
        self._views = None
        t0 = time.perf_counter()
        x_np = x.numpy()
        self_labels = self.labels_.copy()
        rel = select_reliable(x_np, self_labels, k, n_neighbors=cfg.reliable_neighbors, threshold=cfg.reliable_threshold,
                              probs=self.self_proba(x_np), min_confidence=cfg.reliable_confidence,
                              balance=cfg.balance_reliable, work_dir=ctx.work_dir, seed=ctx.seed, progress=ctx.progress)
        warn_empty_clusters(rel.empty_clusters, k)
        self.history_["reliable_per_cluster"] = rel.counts
        self.history_["reliable_total"] = len(rel.index)
        self.history_["reliable_empty_clusters"] = rel.empty_clusters
        self.history_["reliable_info"] = rel.info
        self.reliable_index_ = rel.index
        self.self_labels_ = self_labels  # SPICE-Self's labels (the reliable set keeps them)
        covered = sum(1 for c in rel.counts if c > 0)
        if len(rel.index) == 0 or covered < cfg.semi_min_clusters * k:
            # FixMatch trained from scratch cannot create a cluster it has no labelled example of:
            # with few clusters covered it collapses onto them (seen: 3 reliable samples, all in one
            # cluster, gave a single cluster). The paper notes the same limit on Tiny-ImageNet.
            why = ("no reliable sample at all" if len(rel.index) == 0 else
                   f"reliable samples in only {covered} of {k} clusters (< semi_min_clusters={cfg.semi_min_clusters})")
            warnings.warn(f"SPICE-Semi skipped: {why}; keeping the SPICE-Self result (lower reliable_threshold "
                          "to label more samples)", stacklevel=2)
            self.history_["semi"] = f"skipped: {why}"
            return self
        device = resolve_device(ctx.device)
        gen = torch.Generator().manual_seed(int(ctx.seed) + 1)
        d = x.shape[1]

        def new_head() -> SingleHead:
            mlp = MultiHeadMLP(d, k, 1, cfg.hidden, cfg.norm, generator=gen)
            mlp.set_standardization(x.mean(0), x.std(0) if len(x) > 1 else torch.ones(d))
            return SingleHead(mlp)

        from imgclust.nonfinite import NonFiniteLoss

        try:
            if cfg.semi_mode == "head":
                model, info = train_fixmatch(new_head(), views, rel.index, rel.labels, len(x), cfg.fixmatch(), gen,
                                             device=device, progress=ctx.progress, desc="spice-semi fixmatch",
                                             lr_option="semi_lr")
                semi = model.cpu()
            else:
                semi, info = self._end_to_end(x, rel, ctx, device, gen, new_head)
        except NonFiniteLoss as e:  # issue 24: keep the last good stage (SPICE-Self) rather than lose the run
            warnings.warn(f"SPICE-Semi stopped: {e}; keeping the SPICE-Self result", stacklevel=2)
            self.history_["semi"] = f"failed: {e}"
            self.history_["fallbacks"] = [e.as_record(kept="spice-self")]
            self.history_["semi_s"] = round(time.perf_counter() - t0, 3)
            return self
        semi.requires_grad_(False)
        self.semi_ = semi.eval()
        self.history_["semi"] = {k2: v for k2, v in info.items()}
        self.history_["semi_s"] = round(time.perf_counter() - t0, 3)
        self.labels_ = self.predict_proba(x_np).argmax(1).astype(np.int64)
        sizes = np.bincount(self.labels_, minlength=k)
        self.history_["cluster_sizes"] = sizes.tolist()
        self.history_["empty_clusters"] = [int(c) for c in np.flatnonzero(sizes == 0)]
        self.history_["changed_from_self"] = float((self.labels_ != self_labels).mean())
        return self

    def _end_to_end(self, x: torch.Tensor, rel, ctx: FitContext, device: torch.device, gen: torch.Generator,
                    new_head) -> tuple[nn.Module, dict]:
        """FixMatch on a trainable copy of the backbone + head over augmented images, then distilled
        into a head on the frozen features (so predict needs only the frozen backbone)."""
        from imgclust.refine.fixmatch import (
            BackboneClassifier,
            ImageViews,
            distill_head,
            predict_images,
            train_fixmatch,
            trainable_copy,
        )

        cfg = self.config
        source, backbone, rows = ctx.source, ctx.backbone, ctx.rows
        if source is None or backbone is None or rows is None:
            raise InputError("semi_mode=end_to_end needs the images (fit on a folder, archive or source)")
        if device.type != "cuda":
            warnings.warn("semi_mode=end_to_end on a CPU trains the whole backbone: expect it to be very slow",
                          stacklevel=3)
        pre = backbone.preprocess
        if cfg.view_image_size:
            import dataclasses

            pre = dataclasses.replace(pre, size=cfg.view_image_size)
        img_views = ImageViews(source, np.asarray(rows), pre, cfg.spec(), device)
        net_head = SingleHead(MultiHeadMLP(backbone.dim, self.n_clusters, 1, cfg.hidden, "none", generator=gen))
        net = BackboneClassifier(trainable_copy(backbone), net_head)
        ema, info = train_fixmatch(net, img_views, rel.index, rel.labels, len(x), cfg.fixmatch(), gen,
                                   device=device, progress=ctx.progress, desc="spice-semi end-to-end",
                                   lr_option="semi_lr")
        probs = predict_images(ema, img_views, len(x))
        targets = torch.from_numpy(probs.argmax(1)).long()
        head = distill_head(new_head(), x, targets, epochs=cfg.distill_epochs, generator=gen)
        info = {**info, "distilled_agreement": float((head(x).argmax(1) == targets).float().mean())}
        return head, info

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.semi_ is None:
            return self.self_proba(features)
        x = np.asarray(features, dtype=np.float32)
        out = [torch.softmax(self.semi_(torch.from_numpy(np.ascontiguousarray(x[s:s + 65536]))), -1).numpy()
               for s in range(0, len(x), 65536)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.n_clusters), np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.semi_ is not None:
            state.update({f"semi.{kk}": v.detach().clone() for kk, v in self.semi_.mlp.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.semi_ = None
        if any(kk.startswith("semi.") for kk in state):
            mlp = _load_mlp(state, "semi.", self.n_clusters, self.config.norm, self.name)
            if mlp.n_heads != 1:
                raise InputError("saved SPICE-Semi classifier must have one head")
            self.semi_ = SingleHead(mlp).eval()


__all__ = ["SPICE", "SPICEConfig", "SPICESelf", "SPICESelfConfig", "SingleHead", "default_pool_size"]
