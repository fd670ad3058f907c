"""TEMI multi-head clustering on frozen features, and ICCE stage 1 (its improved version).

``temi`` — TEMI (Adaloglou et al., "Exploring the limits of deep image clustering using
pretrained models", BMVC 2023): H = 50 heads learn K-way clusterings from pairs (image,
random one of its k = 50 nearest neighbours) with the teacher-weighted beta-PMI loss of
:mod:`imgclust.losses.temi`; teacher = EMA of the student; features standardised with
precomputed mean/std ("embedding normalisation").

``icce-heads`` — ICCE stage 1 (ICCE paper, sec. 3.1, Table 1): the same training with
adaptive neighbour sets (cosine distance <= 0.3, at least k), a BatchNorm layer after the
backbone instead of the standardisation, Sinkhorn-Knopp centring of the teacher (3
iterations) and the cross-entropy term with the teacher's argmax, its weight raised from 0
on a cosine schedule. (ICCE's fourth change, "enhanced" ViT features CLS + mean patch token,
is a backbone option: ``--backbone dinov2_vits14 --backbone-option feature=cls+mean``.)

Both are one class; the registered names differ only in their defaults, so every
improvement can be switched on alone (``--option neighbors=adaptive``, ``norm=batchnorm``,
``sinkhorn=true``, ``ce_weight=1``) for the ablation.

Training (as TEMI's ``train_main.py``): AdamW (weight decay on weights, not on biases or
norm parameters), learning rate with linear warm-up then cosine decay per step, batches
without replacement that drop the last incomplete batch, teacher EMA after every step. The
best head is the one with the lowest mean loss over the last epoch (no labels), as TEMI's
``set_losses``; ``labels_`` and ``predict_proba`` use the *teacher's* best head (TEMI
evaluates the teacher checkpoint). All heads' teacher assignments of the training features
are kept in ``head_labels_`` (H, N) and all heads' weights in ``state_dict`` for the cluster
ensemble of ICCE stage 2.

The loop is the shared one (:func:`imgclust.train.loop.run_loop`); the loss is
:func:`imgclust.losses.temi.temi_loss`. With a work directory (the feature cache entry when
fitted through the API) every epoch is checkpointed to ``<work_dir>/<name>-ckpt-<key>.pt``
(the key hashes K, seed, options and the features), so a killed run resumes where it stopped
and ends with the same heads and labels as an uninterrupted one (``checkpoint=false``: off).

CPU-sized defaults: the papers train 100 (TEMI README) to 400 (ICCE) epochs on a GPU at
learning rate 1e-4 x batch/256. Here ``epochs=60`` at batch 256 and a peak learning rate of
1e-3 (~2,340 steps on 10k images) takes about a minute for 50 heads on 2 cores (0.8 s per
epoch for ``temi``, 1.1 s for ``icce-heads``); on CIFAR-10 / EfficientNet-Lite0 features it
reaches the accuracy of 100 epochs within noise, while 40 epochs lose ~4 points.
``--option epochs=...`` trades time for the last points. On small sets (few steps per
epoch) the teacher's EMA momentum 0.996 makes learning slow; ``momentum=0.9`` to ``0.99``
converges in far fewer steps (digits: ACC 0.44 -> 0.80 at 100 short epochs).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval

from imgclust.configcheck import OneOf, option
from imgclust.errors import InputError
from imgclust.heads import NORMS, MultiHeadClassifier
from imgclust.heads.mlp import MultiHeadMLP, build_heads
from imgclust.heads.wrap import (
    argmax_blocks,
    features_tensor,
    load_multihead,
    multihead_labels,
    multihead_labels_sharded,
    multihead_logits,
)
from imgclust.losses.temi import cosine_ramp, temi_loss
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, register_method
from imgclust.neighbors import MODES, load_or_mine_neighbors, sample_neighbors
from imgclust.train import dist
from imgclust.train.checkpoint import Checkpoint, data_digest
from imgclust.train.loop import LoopSpec, StepInfo, run_loop
from imgclust.train.optim import build_optimizer, ema_update_, schedule


@dataclass
class TEMIConfig(MethodConfig):
    """Options of ``temi`` (TEMI paper / reference-code defaults unless noted)."""

    heads: int = option(50, Ge(1))  # H, as TEMI and ICCE
    head: str = option("linear", OneOf(("linear", "mlp")))  # "linear" (ICCE's multi-head classifier) | "mlp" (TEMI reference: DINO head)
    hidden_dim: int = option(512, Ge(1))  # head=mlp: TEMI reference hidden width
    bottleneck_dim: int = option(256, Ge(1))  # head=mlp: L2-normalised bottleneck before the weight-normalised layer
    neighbors: str = option("fixed", OneOf(MODES))  # "fixed": k nearest; "adaptive": ICCE's distance threshold, >= k
    k: int = option(50, Ge(1))  # TEMI --knn 50; ICCE's minimum set size
    threshold: float = option(0.3, Interval(ge=0, le=2))  # adaptive: max cosine distance 1 - cos (ICCE: 0.3)
    max_neighbors: int = option(1000, Ge(1))  # adaptive: search cap per image
    center_neighbors: bool = False  # mine neighbours on mean-centred features (not in the papers)
    norm: str = option("standardize", OneOf(NORMS))  # "standardize" (TEMI --embed_norm) | "batchnorm" (ICCE) | "l2" | "none"
    sinkhorn: bool = False  # ICCE: Sinkhorn-Knopp centring of teacher outputs
    sinkhorn_iters: int = option(3, Ge(0))  # ICCE: 3 (>= 1 when sinkhorn is on)
    ce_weight: float = option(0.0, Ge(0))  # ICCE: final weight lambda of the CE term (cosine ramp from 0)
    epochs: int = option(60, Ge(1))  # CPU default (~1 min for 10k images, 50 heads, 2 cores); TEMI 100-200, ICCE 400
    batch_size: int = option(256, Ge(1))  # ICCE: 256 on CIFAR, 1024 otherwise; TEMI README 1024
    lr: float = option(1e-3, Gt(0))  # peak AdamW learning rate (absolute; TEMI: 1e-4 * batch/256)
    min_lr: float = option(1e-5, Ge(0))  # end of the cosine decay
    warmup_epochs: int = option(2, Ge(0))  # linear warm-up from 0 (TEMI: 10-20 of 100-200)
    weight_decay: float = option(1e-4, Ge(0))  # TEMI, ICCE
    momentum: float = option(0.996, Interval(ge=0, le=1))  # teacher EMA momentum (TEMI --momentum_teacher)
    student_temp: float = option(0.1, Gt(0))
    teacher_temp: float = option(0.1, Gt(0))
    beta: float = option(0.6, Gt(0))  # TEMI's beta in the beta-PMI
    prior_momentum: float = option(0.9, Interval(ge=0, le=1))  # EMA of the cluster prior (TEMI probs_momentum)
    checkpoint: bool = True  # save every epoch under the fit's work dir; a killed run resumes there

    def __post_init__(self) -> None:
        super().__post_init__()  # the ranges declared above (imgclust.configcheck)
        if self.sinkhorn and self.sinkhorn_iters < 1:
            raise InputError(f"with sinkhorn on, sinkhorn_iters must be >= 1; got {self.sinkhorn_iters}")
        if self.max_neighbors < self.k:
            raise InputError(f"max_neighbors ({self.max_neighbors}) must be >= k ({self.k})")


@dataclass
class ICCEHeadsConfig(TEMIConfig):
    """ICCE stage 1: TEMI + adaptive neighbours + BatchNorm + Sinkhorn-Knopp + CE term."""

    neighbors: str = "adaptive"
    norm: str = "batchnorm"
    sinkhorn: bool = True
    ce_weight: float = 1.0  # the paper's value was lost in the text extraction


@register_method
class TEMI(ClusteringMethod):
    """TEMI: 50 linear heads, teacher-weighted beta-PMI on k-NN pairs (Adaloglou et al. 2023)."""

    name = "temi"
    Config = TEMIConfig
    config: TEMIConfig

    def __init__(self, n_clusters: int, config: TEMIConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.teacher_: MultiHeadClassifier | MultiHeadMLP | None = None
        self.best_head_: int = 0
        self.head_labels_: np.ndarray | None = None  # (H, N) int16, teacher assignments of the fit features
        self.head_losses_: np.ndarray | None = None  # (H,) last-epoch mean loss per head
        self.prior_: torch.Tensor | None = None

    # ------------------------------------------------------------------ training
    def fit(self, features: np.ndarray, ctx: FitContext) -> TEMI:
        from imgclust.features import resolve_device

        cfg, t0 = self.config, time.perf_counter()
        x_np = np.ascontiguousarray(features, dtype=np.float32)
        n, d = x_np.shape
        if n < self.n_clusters:
            raise InputError(f"K={self.n_clusters} is larger than the number of images ({n})")
        if n < 2:
            raise InputError("TEMI needs at least 2 images")
        device = resolve_device(ctx.device)
        nb = load_or_mine_neighbors(x_np, ctx.work_dir, mode=cfg.neighbors, k=cfg.k, threshold=cfg.threshold,
                                    max_neighbors=cfg.max_neighbors, seed=ctx.seed, progress=ctx.progress,
                                    center=cfg.center_neighbors)
        t_nn = time.perf_counter() - t0
        indptr, indices = nb.torch_view()  # sampling stays on the CPU generator (deterministic)
        x = features_tensor(x_np).to(device)
        gen = torch.Generator(device="cpu").manual_seed(int(ctx.seed))
        student = build_heads(cfg.head, d, self.n_clusters, cfg.heads, cfg.norm, generator=gen, **self._mlp_dims())
        if cfg.norm == "standardize":
            student.set_standardization(x.mean(0).cpu(), x.std(0).cpu())  # TEMI: torch mean/std over the set
        student.to(device).train()
        teacher = copy.deepcopy(student).train()
        teacher.requires_grad_(False)
        opt = build_optimizer("adamw", student, lr=cfg.lr, weight_decay=cfg.weight_decay)  # no decay: biases, norms
        h, k, bs = cfg.heads, self.n_clusters, min(cfg.batch_size, n)
        steps_per_epoch = n // bs  # drop the last incomplete batch, as TEMI's loader
        # --- issue 20: data-parallel under torchrun: every rank draws the same global batch and its
        # neighbours (same generator), trains on its slice; run_loop averages the gradients and
        # losses/temi.py reduces the prior and Sinkhorn-Knopp statistics over ranks.
        if bs % dist.world_size():
            raise InputError(f"{self.name}: batch size {bs} must be a multiple of the {dist.world_size()} processes")
        mine = dist.shard(bs)
        bl, total = len(mine), steps_per_epoch * cfg.epochs
        state = {"prior": torch.full((h, k), 1.0 / k, device=device),
                 "head_sum": torch.zeros(h, dtype=torch.float64, device=device),
                 "head_mean": torch.zeros(h, dtype=torch.float64)}

        def batches(epoch: int):
            perm = torch.randperm(n, generator=gen)
            return (perm[it * bs:(it + 1) * bs] for it in range(steps_per_epoch))

        def step(rows: torch.Tensor, info: StepInfo):
            pair = sample_neighbors(indptr, indices, rows, gen)
            rows, pair = rows[mine.start:mine.stop], pair[mine.start:mine.stop]  # issue 20: this rank's slice
            xb = x[torch.cat([rows, pair]).to(device)]  # view 0: images, view 1: their neighbours
            s_logits = student(xb).reshape(h, 2, bl, k)
            with torch.no_grad():
                t_logits = teacher(xb).reshape(h, 2, bl, k)
            out = temi_loss(s_logits, t_logits, state["prior"], student_temp=cfg.student_temp,
                            teacher_temp=cfg.teacher_temp, beta=cfg.beta, prior_momentum=cfg.prior_momentum,
                            sinkhorn_iters=cfg.sinkhorn_iters if cfg.sinkhorn else 0,
                            ce_weight=cosine_ramp(info.step, total, cfg.ce_weight))
            state["prior"] = out.prior
            state["head_sum"] += out.head_losses.detach().double()
            # the components: the total moves with the CE weight's ramp (issue 24: "loss" climbed -0.01 -> 1.6)
            return out.loss, {"pmi": out.pmi.mean(), "ce": out.ce.mean()}

        def epoch_end(epoch: int, means: dict[str, float], info: StepInfo) -> dict:
            dist.all_reduce_mean(state["head_sum"])  # issue 20: every rank picks the same best head
            head_mean = (state["head_sum"] / steps_per_epoch).cpu()
            state["head_mean"], state["head_sum"] = head_mean, torch.zeros_like(state["head_sum"])
            return {"head_mean_loss": float(head_mean.numpy().mean()), "best_head": int(head_mean.argmin())}

        ckpt = Checkpoint.in_dir(ctx.work_dir if cfg.checkpoint else None, self.name, k=k, seed=int(ctx.seed),
                                 opts=self.config.to_dict(), data=data_digest(x_np))
        lr = schedule("warmup-cosine", cfg.lr, total, final=cfg.min_lr, warmup=cfg.warmup_epochs * steps_per_epoch)
        res = run_loop(student, step, batches,
                       LoopSpec(cfg.epochs, f"{self.name} heads", lr=lr, option="lr", option_value=cfg.lr,
                                progress=ctx.progress, postfix=("pmi", "ce", "loss"), steps_per_epoch=steps_per_epoch),
                       optimizer=opt, after_step=[lambda info: ema_update_(teacher, student, cfg.momentum)],
                       on_epoch_end=epoch_end, modules={"teacher": teacher}, generators=[gen], state=state,
                       checkpoint=ckpt)
        self._finish(teacher, state, x_np, res, ckpt, {"neighbors": nb.info, "steps": total, "batch_size": bs,
                                                       "neighbors_s": round(t_nn, 3),
                                                       "train_s": round(time.perf_counter() - t0 - t_nn, 3)},
                     progress=ctx.progress)
        return self

    def _finish(self, teacher, state: dict, x_np: np.ndarray, res, ckpt: Checkpoint, run: dict,
                progress: bool = False) -> None:
        """The teacher's best head (lowest last-epoch loss) and every head's labels; the history."""
        head_mean = state["head_mean"].numpy()
        self.teacher_ = teacher.eval().cpu()
        self.prior_ = state["prior"].cpu()
        self.head_losses_ = head_mean
        self.best_head_ = int(head_mean.argmin())
        # issue 20: each rank labels its share (a bar from 1M rows: 10M x 50 heads take ~12 min)
        self.head_labels_ = multihead_labels_sharded(self.teacher_, x_np, progress=progress)
        self.labels_ = self.head_labels_[self.best_head_].astype(np.int64)
        self.history_ = {
            "loss": res.history["head_mean_loss"],  # per epoch, mean over heads and steps
            "pmi": res.history["pmi"], "ce": res.history["ce"], "best_head_per_epoch": res.history["best_head"],
            "best_head": self.best_head_, "head_losses": [float(v) for v in head_mean],
            "best_head_cluster_sizes": np.bincount(self.labels_, minlength=self.n_clusters).tolist(),
            **run, "epoch_s": res.epoch_s, "resumed_from_epoch": res.resumed_from,
            "resumed_at_step": res.resumed_at_step,
            "checkpoint": None if ckpt.path is None else str(ckpt.path),
        }

    # ------------------------------------------------------------------ inference
    def _check(self) -> MultiHeadClassifier | MultiHeadMLP:
        if self.teacher_ is None:
            raise InputError(f"this {self.name} model is not fitted yet")
        return self.teacher_

    def head_logits(self, features: np.ndarray, head: int | None = None, chunk: int = 65536) -> np.ndarray:
        """Teacher logits: all heads (H, N, K), or one head (N, K) when ``head`` is given."""
        return multihead_logits(self._check(), features, head, chunk)

    def predict_heads(self, features: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Cluster of every image under every head (teacher): (H, N) int16 (int32 above 32,768 clusters)."""
        return multihead_labels(self._check(), features, chunk)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Softmax of the teacher's best head at the teacher temperature: (N, K)."""
        logits = torch.from_numpy(self.head_logits(features, self.best_head_))
        return torch.softmax(logits / self.config.teacher_temp, dim=-1).numpy().astype(np.float32)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Cluster of every row (N,) int64: :meth:`predict_proba` block by block (issue 20; ICCE's
        self-trained classifier too), never the (N, K) probabilities of all rows at once."""
        return argmax_blocks(self.predict_proba, features)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Teacher heads (all H), its normalisation, the best head, last-epoch head losses, prior."""
        state = {f"teacher.{k}": v.detach().clone() for k, v in self._check().state_dict().items()}
        state["best_head"] = torch.tensor(self.best_head_)
        if self.head_losses_ is not None:
            state["head_losses"] = torch.from_numpy(np.asarray(self.head_losses_, dtype=np.float64))
        if self.prior_ is not None:
            state["prior"] = self.prior_.clone()
        return state

    def _mlp_dims(self) -> dict[str, int]:
        if self.config.head != "mlp":
            return {}
        return {"hidden_dim": self.config.hidden_dim, "bottleneck_dim": self.config.bottleneck_dim}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher_ = load_multihead(state, "teacher.", self.config.head, self.config.norm, self.n_clusters, self.name)
        self.best_head_ = int(state["best_head"])
        self.head_losses_ = state["head_losses"].numpy() if "head_losses" in state else None
        self.prior_ = state.get("prior")


@register_method
class ICCEHeads(TEMI):
    """ICCE stage 1: TEMI heads + adaptive neighbours, BatchNorm, Sinkhorn-Knopp, CE term."""

    name = "icce-heads"
    Config = ICCEHeadsConfig
    config: ICCEHeadsConfig
