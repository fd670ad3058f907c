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
(``checkpoint=false``: off). SPICE-Semi (FixMatch) is not resumable yet. The networks are in
:mod:`imgclust.heads.spice`, SPICE-Semi's classifier (head or end to end) in
:func:`imgclust.refine.semi.fixmatch_classifier`: this file is the recipe.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval

from imgclust.configcheck import OneOf, option, rule_of
from imgclust.data.augment import AugmentSpec
from imgclust.errors import InputError
from imgclust.heads import spice as spice_heads
from imgclust.heads.spice import HEAD_NORMS, MultiHeadMLP, SingleHead
from imgclust.heads.wrap import apply_rows, features_tensor
from imgclust.losses import spice as losses
from imgclust.losses.spice import LOSSES, cluster_loss, cluster_probs, default_pool_size
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, register_method
from imgclust.refine.fixmatch import FixMatchConfig
from imgclust.refine.semi import SEMI_MODES, fixmatch_classifier, reliable_for_semi
from imgclust.train import dist
from imgclust.train.loop import StepInfo
from imgclust.train.optim import build_optimizer
from imgclust.train.recipe import cluster_sizes, run_epochs
from imgclust.views import VIEW_MODES, FeatureViews, make_feature_views


@dataclass
class SPICESelfConfig(MethodConfig):
    """Options of ``spice-self`` (paper / reference-code defaults unless noted)."""

    heads: int = option(10, Ge(1))  # number of CLSHeads trained together
    hidden: int = option(128, Ge(1))  # MLP hidden units (reference: = feature dim, 512; 128 keeps 1280-d inputs cheap on a CPU)
    norm: str = option("standardize", OneOf(HEAD_NORMS))  # head input: "standardize" (frozen mean/std), "l2" or "none" (reference: raw)
    pool_size: int = option(0, Ge(0))  # M; 0: the paper's value for K (1000 for K <= 10, 100 K up to 5000)
    batch_size: int = option(0, Ge(0))  # m_2; 0: the paper's 128 (256 from K = 200)
    ratio: float = option(0.5, Interval(gt=0, le=1))  # r, confident ratio for the prototypes
    overlap: bool = True  # overlap assignment (paper default) or non-overlap
    loss: str = option("dsce", OneOf(LOSSES))  # "dsce" | "ce" | "tce" (ablation, paper Table 4)
    temperature: float = option(0.2, Gt(0))  # T of the temperature CE ("tce")
    epochs: int = option(30, Ge(1))  # reference: 100; CPU default
    repeats: int = option(1, Ge(1))  # passes over a pool's labelled samples (Algorithm 1: 1; reference code: 8 at M = 5000)
    lr: float = option(0.005, Gt(0))  # Adam (reference)
    weight_decay: float = option(0.0, Ge(0))
    select_every_epoch: bool = True  # keep the (epoch, head) with the lowest whole-data DS-CE
    views: str = option("auto", OneOf(VIEW_MODES))  # "auto" | "bank" | "online" | "none"
    n_views: int = option(2, Ge(1))  # bank: V weak + V strong views per image
    view_image_size: int = option(0, Ge(0))  # 0: the backbone's input size
    shift: float = option(0.125, rule_of(AugmentSpec, "shift"))  # weak view: max translation (fraction of the side)
    n_ops: int = option(4, rule_of(AugmentSpec, "n_ops"))  # strong view: RandAugment ops per image
    cutout: float = option(0.5, rule_of(AugmentSpec, "cutout"))  # strong view: max Cutout side (fraction)
    checkpoint: bool = True  # save every epoch under the fit's work dir; a killed run resumes there

    def spec(self) -> AugmentSpec:
        return AugmentSpec(self.shift, self.n_ops, self.cutout)


@dataclass
class SPICEConfig(SPICESelfConfig):
    """``spice`` = SPICE-Self + SPICE-Semi (reliable labels + FixMatch)."""

    reliable_neighbors: int = option(100, Ge(1))  # n_s
    reliable_threshold: float = option(0.95, Interval(ge=0, lt=1))  # tau_c: beta_i > tau_c
    reliable_confidence: float = option(0.0, Interval(ge=0, lt=1))  # also max p_i > this (reference code: 0.99; not in the paper)
    balance_reliable: bool = True  # reference code (paper silent): equal count per cluster that has any
    semi_mode: str = option("head", OneOf(SEMI_MODES))  # "head" (CPU) | "end_to_end" (GPU)
    semi_steps: int = option(2000, rule_of(FixMatchConfig, "steps"))
    semi_batch_size: int = option(64, rule_of(FixMatchConfig, "batch_size"))  # B
    mu: int = option(7, rule_of(FixMatchConfig, "mu"))
    semi_threshold: float = option(0.95, rule_of(FixMatchConfig, "threshold"))  # tau
    semi_lr: float = option(0.03, rule_of(FixMatchConfig, "lr"))
    semi_weight_decay: float = option(5e-4, rule_of(FixMatchConfig, "weight_decay"))
    ema: float = option(0.999, rule_of(FixMatchConfig, "ema"))
    unsup_weight: float = option(1.0, rule_of(FixMatchConfig, "unsup_weight"))
    distill_epochs: int = option(30, Ge(1))  # end_to_end: head on frozen features fitted to the network's labels
    semi_min_clusters: float = option(0.5, Interval(ge=0, le=1))  # run SPICE-Semi only if this share of clusters has reliable samples

    def fixmatch(self) -> FixMatchConfig:
        return FixMatchConfig(steps=self.semi_steps, batch_size=self.semi_batch_size, mu=self.mu,
                              threshold=self.semi_threshold, unsup_weight=self.unsup_weight, lr=self.semi_lr,
                              weight_decay=self.semi_weight_decay, ema=self.ema)


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

    def fit(self, features: np.ndarray, ctx: FitContext) -> SPICESelf:
        self._fit_self(features, ctx)
        self._views = None
        return self

    def _fit_self(self, features: np.ndarray, ctx: FitContext) -> torch.Tensor:
        """Algorithm 1 in the shared loop: a batch = each head's strong views of its own pseudo-labelled
        samples of the current pool; after every epoch the (epoch, head) selection on all data."""
        from imgclust.features import resolve_device

        cfg, k, t0 = self.config, self.n_clusters, time.perf_counter()
        x_np = np.ascontiguousarray(features, dtype=np.float32)
        n = len(x_np)
        if n < k:
            raise InputError(f"K={k} is larger than the number of images ({n})")
        device = resolve_device(ctx.device)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        x = features_tensor(x_np).to(device)
        emb = F.normalize(x, dim=1)
        views = self._views = make_feature_views(x, ctx, mode=cfg.views, n_views=cfg.n_views, device=device,
                                                 image_size=cfg.view_image_size or None, spec=cfg.spec())
        t_views = time.perf_counter() - t0
        heads = MultiHeadMLP.for_features(x, k, cfg.heads, cfg.hidden, cfg.norm, generator=gen).to(device)
        # SPICE's reference decays every parameter (its Adam has no groups): kept, so no no-decay rule here
        opt = build_optimizer("adam", [{"params": list(heads.parameters())}], lr=cfg.lr, weight_decay=cfg.weight_decay)
        m, m2, n_pools = losses.pool_and_batch(k, n, cfg.pool_size, cfg.batch_size)
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
            for pool in losses.pools(n, m, gen):
                with torch.no_grad():  # step 1: predictions on weak views
                    heads.eval()
                    probs = cluster_probs(heads(views.sample("weak", pool, gen)), cfg.loss, cfg.temperature)
                # step 2: prototypes and pseudo-labels per head; step 3: train on strong views
                idx, lab = losses.prototype_pseudo_labels(probs, emb[pool.to(device)], cfg.ratio, cfg.overlap, gen)
                strong = views.sample("strong", pool, gen)
                heads.train()
                for ib, lb in losses.pool_steps(idx, lab, m2, cfg.repeats, gen):
                    ib, lb = ib[:, mine.start:mine.stop], lb[:, mine.start:mine.stop]  # issue 20: this rank's slice
                    yield strong[ib], lb  # (H, m2, D): each head its own samples

        def step(batch, info: StepInfo) -> torch.Tensor:
            per_head = cluster_loss(heads(batch[0]), batch[1], cfg.loss, cfg.temperature).mean(dim=1)
            state["loss_sum"] += per_head.detach().double().cpu()
            return per_head.mean()

        def epoch_end(epoch: int, means: dict[str, float], info: StepInfo) -> dict:
            dist.all_reduce_mean(state["loss_sum"])  # issue 20: the global batch's loss on every rank
            out: dict = {"train_loss": [round(float(v), 5) for v in (state["loss_sum"] / max(info.it, 1)).numpy()]}
            state["loss_sum"] = torch.zeros_like(state["loss_sum"])
            if cfg.select_every_epoch or epoch == cfg.epochs - 1:
                sel = losses.selection_losses(heads.all_logits(x), emb, cfg.loss, cfg.temperature, cfg.ratio).cpu()
                record, best = losses.epoch_selection(sel, state["best_loss"])
                out.update(record)
                if best is not None:
                    state.update(best, best_epoch=epoch,
                                 best_state={kk: v.detach().clone() for kk, v in heads.state_dict().items()})
            return out

        res, run = run_epochs(self, ctx, x_np, heads, step, batches, optimizer=opt, generator=gen, state=state,
                              label=f"{self.name} heads", on_epoch_end=epoch_end, views=views.describe())
        assert state["best_state"] is not None
        self.heads_, self.head_labels_ = spice_heads.freeze_selected(heads, state["best_state"], x.cpu())  # (H, N)
        self.head_losses_, self.best_head_ = state["head_losses"].numpy(), int(state["best_head"])
        self.labels_ = self.head_labels_[self.best_head_].astype(np.int64)
        self.history_ = {
            **{key: res.history.get(key, []) for key in ("train_loss", "select_loss", "best_head_per_epoch")}, **run,
            "best_head": self.best_head_, "best_epoch": state["best_epoch"], "best_select_loss": state["best_loss"],
            "head_losses": [float(v) for v in self.head_losses_], **cluster_sizes(self.labels_, k), "pool_size": m,
            "batch_size": m2, "pools_per_epoch": n_pools, "views": views.describe(), "views_s": round(t_views, 3),
            "train_s": round(time.perf_counter() - t0 - t_views, 3)}
        return x

    # ------------------------------------------------------------------ inference
    def _check(self) -> MultiHeadMLP:
        if self.heads_ is None:
            raise InputError(f"this {self.name} model is not fitted yet")
        return self.heads_

    def self_proba(self, features: np.ndarray) -> np.ndarray:
        """SPICE-Self's best head: its cluster probabilities (N, K)."""
        heads, cfg = self._check().eval(), self.config
        return apply_rows(lambda xb: cluster_probs(heads.forward_head(xb, self.best_head_), cfg.loss, cfg.temperature),
                          features, self.n_clusters)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.self_proba(features)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return spice_heads.selected_heads_state(self._check(), self.best_head_, self.head_losses_)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        loaded = spice_heads.load_selected_heads(state, self.n_clusters, self.config.norm, self.name)
        self.heads_, self.best_head_, self.head_losses_ = loaded


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
        """SPICE-Self, the reliable set, then FixMatch on it (:func:`imgclust.refine.semi.fixmatch_classifier`):
        a head on the feature views, or end to end on a trainable copy of the backbone, distilled into a head."""
        from imgclust.features import resolve_device
        from imgclust.nonfinite import NonFiniteLoss

        cfg, x = self.config, self._fit_self(features, ctx).cpu()
        views, self._views = self._views, None
        t0 = time.perf_counter()
        self_labels = self.self_labels_ = self.labels_.copy()  # SPICE-Self's labels (the reliable set keeps them)
        rel = self._reliable(x.numpy(), self_labels, ctx)
        if rel is None:
            return self
        try:
            semi, info = fixmatch_classifier(
                x, views, rel.index, rel.labels, self.n_clusters, cfg.fixmatch(), mode=cfg.semi_mode, hidden=cfg.hidden,
                norm=cfg.norm, seed=int(ctx.seed) + 1, source=ctx.source, backbone=ctx.backbone, rows=ctx.rows,
                image_size=cfg.view_image_size, spec=cfg.spec(), distill_epochs=cfg.distill_epochs,
                device=resolve_device(ctx.device), progress=ctx.progress, desc="spice-semi", lr_option="semi_lr")
        except NonFiniteLoss as e:  # issue 24: keep the last good stage (SPICE-Self) rather than lose the run
            warnings.warn(f"SPICE-Semi stopped: {e}; keeping the SPICE-Self result", stacklevel=2)
            self.history_.update(semi=f"failed: {e}", fallbacks=[e.as_record(kept="spice-self")],
                                 semi_s=round(time.perf_counter() - t0, 3))
            return self
        semi.requires_grad_(False)
        self.semi_ = semi.eval()
        self.history_.update(semi=dict(info), semi_s=round(time.perf_counter() - t0, 3))
        self.labels_ = self.predict_proba(x.numpy()).argmax(1).astype(np.int64)
        self.history_.update(**cluster_sizes(self.labels_, self.n_clusters),
                             changed_from_self=float((self.labels_ != self_labels).mean()))
        return self

    def _reliable(self, x_np: np.ndarray, self_labels: np.ndarray, ctx: FitContext):
        """Sec. 3.3's reliable set (recorded in the history), or None when SPICE-Semi is skipped."""
        cfg = self.config
        rel, record = reliable_for_semi(
            x_np, self_labels, self.self_proba(x_np), self.n_clusters, min_clusters=cfg.semi_min_clusters,
            work_dir=ctx.work_dir, seed=ctx.seed, progress=ctx.progress, n_neighbors=cfg.reliable_neighbors,
            threshold=cfg.reliable_threshold, min_confidence=cfg.reliable_confidence, balance=cfg.balance_reliable)
        self.history_.update(record)
        self.reliable_index_ = rel.index
        return None if "semi" in record else rel

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.semi_ is None:
            return self.self_proba(features)
        semi = self.semi_
        return apply_rows(lambda xb: torch.softmax(semi(xb), -1), features, self.n_clusters)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **spice_heads.single_head_state(self.semi_, "semi.")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.semi_ = spice_heads.load_single_head(state, "semi.", self.n_clusters, self.config.norm, self.name)


__all__ = ["SPICE", "SPICEConfig", "SPICESelf", "SPICESelfConfig", "SingleHead", "default_pool_size"]
