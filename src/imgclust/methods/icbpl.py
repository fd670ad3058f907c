"""ICBPL: clustering onto predefined evenly-distributed class centroids (PEDCC) with a
pretrained backbone (Hu, Zhu, Wang, "Image clustering algorithm based on self-supervised
pretrained models and latent feature distribution optimization", 2024).

Model (paper sec. 3, Fig. 1). Encoder = pretrained backbone -> projection to the latent
dimension d -> L2 normalisation, z = g(f(x)) / |g(f(x))|. The K cluster centres are fixed
before training: the PEDCC points c_1..c_K (:mod:`imgclust.heads.pedcc`; a regular simplex,
pairwise cosine -1/(K-1), when d >= K - 1). Training minimises eq. (7),

    L = lambda1 MMD^2({z, z~}, PEDCC) + lambda2 mean d(z, z~) + lambda3 mean_m d(z, z_m)
        + lambda4 mean min_j d(z, c_j),                    d(a, b) = 1 - cos(a, b),

(:mod:`imgclust.losses.icbpl`): Loss1 pulls the batch distribution onto the K points
(uniformly, so clusters stay balanced), Loss2 makes an image and its augmented view agree,
Loss3 pulls an image towards its k = 4 nearest neighbours (Table 4: k = 4 best), Loss4 pulls
each feature onto its nearest centre. Neighbours are mined on the pretrained features, then
re-mined with the current encoder every ``refresh_every`` = 30 epochs (Table 10). An image's
cluster is its nearest PEDCC point by cosine, eq. (8): argmax_j <z, c_j>.
``predict_proba`` = softmax_j(<z, c_j> / ``temperature``) (temperature 0.1: cosines lie in
[-1, 1], so this gives confident but not saturated probabilities; its argmax is eq. (8)).

Loss weights: Table 1 lists three weights per data set (CIFAR-10: 9, 2, 2; STL-10,
CIFAR-100, ImageNet-50: 8, 2, 2) for four losses, and its column headers were lost in the
text. Read here as lambda1 (MMD) = 9, lambda3 (kNN) = 2, lambda4 (min-cosine) = 2 and
lambda2 (augmentation) = 1. The other reading, augmentation = 9 with the MMD at 1 (ICBPC's
reference ``utils.py`` gives its augmentation terms more weight than its MMD), collapsed
onto 4 of 10 clusters on digits (ACC 0.38 against 0.71) and left 6 of 10 empty on
CIFAR-10 EfficientNet-Lite0 features (ACC 0.35 against 0.42, 60 epochs); it is
``--option mmd_weight=1 --option aug_weight=9``. Table 6's ablation is weights (9,0,0,0),
(9,1,0,0), (9,1,2,2). On CIFAR-10 test with frozen EfficientNet-Lite0 features (head mode,
60 epochs, one seed) these score ACC 0.379, 0.381, 0.424 against k-means' 0.457;
``knn_weight=4 pedcc_weight=4`` scored 0.482 (``benchmarks/icbpl.py``).

Loss3 per step: ``neighbors_per_step`` (default 1) of each image's k neighbours, drawn
uniformly, enter the loss — an unbiased estimate of the paper's mean over all k at a
fraction of the cost (on CPU the projection of the k neighbour rows dominates a step);
``neighbors_per_step=4`` is the exact sum.

Fine-tuning (paper sec. 3.4 and Table 9: the best choice differs per data set):

* ``finetune="head"`` (default; CPU-sized): the backbone stays frozen, the projection
  g (``hidden_dim`` > 0: Linear-BatchNorm-ReLU-Linear; 0: one Linear) trains on the cached
  features, standardised with their mean and std. The augmented view of Loss2 then has
  to come from somewhere cheap; ``aug`` chooses:

  - ``"feature"`` (default): a feature-space view, x~ = m * x / (1 - p) + s * eps on the
    standardised features (m ~ Bernoulli(1 - p) per coordinate, eps ~ N(0, 1);
    ``feature_dropout`` p = 0.2, ``feature_noise`` s = 0.2). Costs no image work: an
    epoch over 10k EfficientNet-Lite0 features takes ~3.5 s on one thread of a loaded
    2-core machine. It is only a stand-in for the paper's image augmentations: it teaches
    invariance to small feature perturbations, not to crops and colour changes.
  - ``"views"``: the real thing, computed once — ``views`` augmented copies of every image
    (random resized crop, flip, colour jitter, grayscale, blur: the paper's list) run
    through the frozen backbone and kept in a view bank next to the feature cache
    (``<work_dir>/icbpl-views-<key>.npy``, reused by later fits); each step draws one of
    them. Costs ``views`` x one feature extraction (EfficientNet-Lite0 at 224 px: ~7 min
    per view of 10k images on 2 cores), which is why it is not the default on CPU.

* ``finetune="last_blocks"`` (the paper's "last two conv layers") and ``"all"``: images are
  decoded and augmented on the fly (kornia) and run through a trainable copy of the
  backbone (``ctx.backbone``) at ``image_size`` (default: the backbone's own);
  only the last ``finetune_blocks`` blocks (EfficientNet: MBConv blocks + the head conv;
  ViT: transformer blocks + final norm; ResNet: stages layer4, layer3, ...) or all layers
  get gradients, at ``backbone_lr`` (1e-4; the projection keeps ``lr``). BatchNorm layers
  stay in inference mode (running statistics fixed; small CPU batches would make batch
  statistics noisy). With the default ``neighbors_per_step=1`` a step runs 3 images per
  training image through the network (original, augmented view, one neighbour), not
  k + 2. Every refresh and the final assignment re-encode all images. Cost on CPU
  (EfficientNet-Lite0, one thread): ``last_blocks`` trains at ~8 images/s at 224 px and
  ~33 at 96 px, i.e. about an hour per epoch of 10k images at 224 px; it is meant for a
  GPU or for small sets. The fine-tuned
  parameters are saved in ``state_dict`` (``backbone.<name>``) and the model then
  classifies *images* (``image_level`` is true, :meth:`predict_proba_images`; the
  estimator calls it in ``predict``). These modes need the images: a fit on precomputed
  features raises InputError.

Defaults follow the paper (Adam, lr 1e-3, batch 100, k = 4, refresh every 30 epochs) except
``epochs`` (paper: 400; here 100, ~6 min in head mode on 10k images on one CPU thread) and the
latent dimension (not stated in ICBPL; ``latent_dim=60`` is ICBPC's suggestion, which gives
an exact simplex up to K = 61).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval
from torch import nn

from imgclust.backbones.finetune import finetuned_copy, trainable_parameters
from imgclust.configcheck import OneOf, option
from imgclust.data.augment import contrastive_augment, seeded_augment
from imgclust.data.batches import ImageBatches
from imgclust.errors import InputError
from imgclust.heads.pedcc import load_or_build_pedcc, pedcc_stats
from imgclust.losses.icbpl import icbpl_loss
from imgclust.methods.base import (
    ClusteringMethod,
    FitContext,
    MethodConfig,
    register_method,
)
from imgclust.neighbors import load_or_mine_neighbors, mine_neighbors
from imgclust.progress import progress_bar
from imgclust.train.checkpoint import Checkpoint, data_digest
from imgclust.train.loop import LoopSpec, StepInfo, run_loop
from imgclust.train.optim import build_optimizer

FINETUNE = ("head", "last_blocks", "all")
AUGS = ("feature", "views")
PEDCC_METHODS = ("auto", "simplex", "repulsion")
VIEWS_FORMAT = 1


@dataclass
class ICBPLConfig(MethodConfig):
    """Options of ``icbpl`` (paper defaults unless noted; see the module docstring)."""

    latent_dim: int = option(60, Ge(1))  # d (ICBPC's suggestion; not stated in ICBPL)
    hidden_dim: int = option(512, Ge(0))  # projection Linear-BN-ReLU-Linear; 0 = a single Linear
    pedcc: str = option("auto", OneOf(PEDCC_METHODS))  # "auto" (simplex if d >= K-1, else repulsion) | "simplex" | "repulsion"
    pedcc_seed: int = option(0, Ge(0))
    finetune: str = option("head", OneOf(FINETUNE))  # "head" | "last_blocks" | "all"
    finetune_blocks: int = option(2, Ge(1))  # last_blocks: how many trailing blocks/stages train (paper: 2)
    aug: str = option("feature", OneOf(AUGS))  # head mode's Loss2 view: "feature" (feature-space) | "views" (image view bank)
    views: int = option(2, Ge(1))  # aug="views": augmented views per image in the bank
    feature_dropout: float = option(0.2, Interval(ge=0, lt=1))  # aug="feature": dropout rate p
    feature_noise: float = option(0.2, Ge(0))  # aug="feature": Gaussian noise std s (standardised units)
    crop_scale: float = option(0.2, Interval(gt=0, le=1))  # image augmentations: smallest area fraction of the random resized crop
    k: int = option(4, Ge(1))  # neighbours per image (Table 4)
    neighbors_per_step: int = option(1, Ge(1))  # Loss3 terms per image and step, drawn from its k (k = the paper's exact sum)
    refresh_every: int = option(30, Ge(0))  # epochs between neighbour refreshes with the current encoder (Table 10); 0 = never
    mmd_weight: float = option(9.0, Ge(0))  # lambda1, Loss1 (Table 1 CIFAR-10 row, read as described in the docstring)
    aug_weight: float = option(1.0, Ge(0))  # lambda2, Loss2 (not in Table 1: unit weight)
    knn_weight: float = option(2.0, Ge(0))  # lambda3, Loss3
    pedcc_weight: float = option(2.0, Ge(0))  # lambda4, Loss4
    kernel_num: int = option(5, Ge(1))  # Gaussian kernels in the MMD (ICBPC mmd.py)
    kernel_mul: float = option(2.0, Gt(0))  # ratio between kernel bandwidths
    epochs: int = option(100, Ge(1))  # paper: 400
    batch_size: int = option(100, Ge(1))  # paper: 100
    lr: float = option(1e-3, Gt(0))  # Adam, paper: 1e-3
    backbone_lr: float = option(1e-4, Gt(0))  # fine-tuned backbone layers (not stated; 1e-3 would wash out the pretraining)
    weight_decay: float = option(0.0, Ge(0))
    temperature: float = option(0.1, Gt(0))  # predict_proba: softmax(cos / temperature)
    image_size: int | None = option(None, Ge(8))  # fine-tuning modes / view bank: input size (default: the backbone's)
    checkpoint: bool = True  # save every epoch under the fit's work dir; a killed run resumes there

    def __post_init__(self) -> None:
        super().__post_init__()  # the ranges declared above (imgclust.configcheck)
        if not any((self.mmd_weight, self.aug_weight, self.knn_weight, self.pedcc_weight)):
            raise InputError("at least one of mmd_weight, aug_weight, knn_weight, pedcc_weight must be > 0")


# ---------------------------------------------------------------------------- encoder head
class Projection(nn.Module):
    """g: standardise -> (Linear -> BatchNorm -> ReLU ->) Linear -> L2 normalise, (B, D) -> (B, d)."""

    def __init__(self, in_dim: int, latent_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden_dim > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                                nn.ReLU(inplace=True), nn.Linear(hidden_dim, latent_dim))
        else:
            self.net = nn.Linear(in_dim, latent_dim)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, standardized: bool = False) -> torch.Tensor:
        h = self.net(x if standardized else self.standardize(x))
        return nn.functional.normalize(h, dim=-1)


def _set_standardization(head: Projection, x: np.ndarray) -> None:
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    head.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    head.std.copy_(torch.from_numpy(np.maximum(std, 1e-6).astype(np.float32)))  # constant pixels: no 0/0


def feature_view(x: torch.Tensor, dropout: float, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Feature-space augmented view of standardised features: dropout (rescaled) plus Gaussian noise."""
    out = x
    if dropout > 0:
        keep = torch.rand(x.shape, generator=generator) >= dropout
        out = out * keep.to(x.dtype).to(x.device) / (1.0 - dropout)
    if noise > 0:
        out = out + noise * torch.randn(x.shape, generator=generator).to(x.device)
    return out


def _fixed_neighbors(features: np.ndarray, k: int, work_dir: Path | None, seed: int, progress: bool,
                     cached: bool) -> np.ndarray:
    """(N, k') int64 indices of each row's k nearest rows by cosine (k' = min(k, N - 1))."""
    if cached:
        nb = load_or_mine_neighbors(features, work_dir, mode="fixed", k=k, seed=seed, progress=progress)
    else:
        nb = mine_neighbors(features, mode="fixed", k=k, seed=seed, progress=False)
    n = len(features)
    kk = int(nb.info.get("k_effective", min(k, n - 1)))
    if kk <= 0:
        return np.arange(n, dtype=np.int64)[:, None]  # a single image: its own neighbour
    return np.asarray(nb.indices, dtype=np.int64).reshape(n, kk)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of each row's neighbour set that two (N, k) index arrays share."""
    hits = sum(len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(a, b, strict=True))
    return hits / max(a.size, 1)


# ---------------------------------------------------------------------------- the method
@register_method
class ICBPL(ClusteringMethod):
    """ICBPL: latent features pulled onto fixed PEDCC points by MMD + augmentation + kNN + min-cosine losses."""

    name = "icbpl"
    Config = ICBPLConfig
    config: ICBPLConfig

    def __init__(self, n_clusters: int, config: ICBPLConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.head_: Projection | None = None
        self.centroids_: torch.Tensor | None = None  # (K, d) PEDCC
        self.backbone_state_: dict[str, torch.Tensor] = {}  # fine-tuned backbone parameters
        self.fit_proba_: np.ndarray | None = None  # image-level modes: probabilities of the fit images
        self.neighbors_: np.ndarray | None = None  # (N, k) neighbour sets in use at the end of training

    @property
    def image_level(self) -> bool:
        """True when the backbone was fine-tuned: the model classifies images, not cached features."""
        return self.config.finetune != "head"

    @property
    def inputs(self) -> str:
        """Images for fine-tuning and for the image view bank (``aug="views"``); features otherwise."""
        return "images" if self.image_level or self.config.aug == "views" else "features"

    # ------------------------------------------------------------------ training
    def fit(self, features: np.ndarray, ctx: FitContext) -> ICBPL:
        cfg = self.config
        x_np = np.ascontiguousarray(features, dtype=np.float32)
        n, d_in = x_np.shape
        if n < self.n_clusters:
            raise InputError(f"K={self.n_clusters} is larger than the number of images ({n})")
        if n < 2:
            raise InputError("ICBPL needs at least 2 images")
        t0 = time.perf_counter()
        from imgclust.features import resolve_device

        device = resolve_device(ctx.device)
        gen = torch.Generator(device="cpu").manual_seed(int(ctx.seed))
        c_np = load_or_build_pedcc(self.n_clusters, cfg.latent_dim, cfg.pedcc, seed=cfg.pedcc_seed,
                                   cache_dir=ctx.cache_dir)
        centroids = torch.from_numpy(c_np).to(device)
        nbrs = _fixed_neighbors(x_np, cfg.k, ctx.work_dir, ctx.seed, ctx.progress, cached=True)
        t_prep = time.perf_counter() - t0
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(int(ctx.seed))
            head = Projection(d_in, cfg.latent_dim, cfg.hidden_dim)
        _set_standardization(head, x_np)
        head.to(device)
        self.history_ = {"pedcc": pedcc_stats(c_np), "neighbors_k": int(nbrs.shape[1]), "refresh_overlap": [],
                         "loss": [], "mmd": [], "aug": [], "knn": [], "pedcc_loss": [], "epoch_s": []}
        if cfg.finetune == "head":
            z_all, nbrs = self._fit_head(x_np, head, centroids, nbrs, ctx, gen, device)
        else:
            z_all, nbrs = self._fit_images(x_np, head, centroids, nbrs, ctx, gen, device)
        self.head_ = head.cpu().eval()
        self.centroids_ = centroids.cpu()
        self.neighbors_ = nbrs
        cos = z_all @ c_np.T
        self.labels_ = cos.argmax(axis=1).astype(np.int64)
        self.fit_proba_ = self._softmax(cos) if self.image_level else None
        sizes = np.bincount(self.labels_, minlength=self.n_clusters)
        self.history_.update(cluster_sizes=sizes.tolist(), empty_clusters=[int(c) for c in np.flatnonzero(sizes == 0)],
                             prepare_s=round(t_prep, 3), train_s=round(time.perf_counter() - t0 - t_prep, 3),
                             mean_epoch_s=round(float(np.mean(self.history_["epoch_s"])), 4))
        return self

    def _weights(self) -> tuple[float, float, float, float]:
        c = self.config
        return (float(c.mmd_weight), float(c.aug_weight), float(c.knn_weight), float(c.pedcc_weight))

    def _draw_neighbors(self, nbrs: np.ndarray, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, m) neighbour indices for Loss3: all k when ``neighbors_per_step`` >= k, else m drawn
        uniformly with replacement (an unbiased estimate of the mean over the k)."""
        nb = torch.from_numpy(nbrs)[rows]
        m = self.config.neighbors_per_step
        if m >= nb.shape[1]:
            return nb
        pick = torch.randint(nb.shape[1], (len(rows), m), generator=gen)
        return torch.gather(nb, 1, pick)

    def _train(self, model: nn.Module, head: Projection, opt: torch.optim.Optimizer, n: int, nbrs: np.ndarray,
               ctx: FitContext, gen: torch.Generator, centroids: torch.Tensor, x_np: np.ndarray, label: str,
               encode, latents) -> np.ndarray:
        """The epochs of both modes in the shared loop: neighbour refresh at an epoch's start, batches
        without replacement (the last incomplete one dropped: the MMD target is the PEDCC tiled to 2B),
        eq. (7) per step. ``latents(rows, nbrs, info)`` -> z = [B images; B views; B x m neighbours]."""
        cfg = self.config
        bs = min(cfg.batch_size, n)
        steps = n // bs
        weights = self._weights()
        state = {"nbrs": torch.from_numpy(np.ascontiguousarray(nbrs)), "refresh_overlap": []}

        def batches(epoch: int):
            if cfg.refresh_every and epoch > 0 and epoch % cfg.refresh_every == 0:
                new = _fixed_neighbors(encode(), cfg.k, None, ctx.seed + epoch, False, cached=False)
                state["refresh_overlap"].append(round(_overlap(state["nbrs"].numpy(), new), 4))
                state["nbrs"] = torch.from_numpy(np.ascontiguousarray(new))
            head.train()
            perm = torch.randperm(n, generator=gen)
            return (perm[it * bs:(it + 1) * bs] for it in range(steps))

        def step(rows: torch.Tensor, info: StepInfo):
            z = latents(rows, state["nbrs"].numpy(), info)
            b = len(rows)
            out = icbpl_loss(z[:b], z[b:2 * b], z[2 * b:].reshape(b, -1, z.shape[1]), centroids, weights,
                             cfg.kernel_mul, cfg.kernel_num)
            return out.loss, {"mmd": out.mmd, "aug": out.aug, "knn": out.knn, "pedcc": out.pedcc}

        ckpt = Checkpoint.in_dir(ctx.work_dir if cfg.checkpoint else None, self.name, k=self.n_clusters,
                                 seed=int(ctx.seed), opts=cfg.to_dict(), data=data_digest(x_np))
        res = run_loop(model, step, batches, LoopSpec(cfg.epochs, label, option="lr", option_value=cfg.lr,
                                                      progress=ctx.progress),
                       optimizer=opt, generators=[gen], state=state, checkpoint=ckpt)
        h = self.history_
        for key, hk in (("loss", "loss"), ("mmd", "mmd"), ("aug", "aug"), ("knn", "knn"), ("pedcc", "pedcc_loss")):
            h[hk] = res.history.get(key, [])
        h.update(epoch_s=res.epoch_s, refresh_overlap=state["refresh_overlap"], resumed_from_epoch=res.resumed_from,
                 checkpoint=None if ckpt.path is None else str(ckpt.path))
        return state["nbrs"].numpy()

    def _fit_head(self, x_np: np.ndarray, head: Projection, centroids: torch.Tensor, nbrs: np.ndarray,
                  ctx: FitContext, gen: torch.Generator, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        n = len(x_np)
        x = head.standardize(torch.from_numpy(x_np if x_np.flags.writeable else x_np.copy()).to(device))
        bank = self._view_bank(x_np, ctx) if cfg.aug == "views" else None  # (V, N, D), rows read per batch
        # ICBPC's reference decays every parameter (plain Adam): kept, so no no-decay rule here
        opt = build_optimizer("adam", [{"params": list(head.parameters())}], lr=cfg.lr, weight_decay=cfg.weight_decay)

        def latents(rows: torch.Tensor, nbrs: np.ndarray, info: StepInfo) -> torch.Tensor:
            xb = x[rows.to(device)]
            if bank is None:
                xa = feature_view(xb, cfg.feature_dropout, cfg.feature_noise, gen)
            else:
                v = torch.randint(bank.shape[0], (len(rows),), generator=gen).numpy()
                xa = head.standardize(torch.from_numpy(np.asarray(bank[v, rows.numpy()], dtype=np.float32)).to(device))
            xn = x[self._draw_neighbors(nbrs, rows, gen).reshape(-1).to(device)]
            return head(torch.cat([xb, xa, xn]), standardized=True)

        nbrs = self._train(head, head, opt, n, nbrs, ctx, gen, centroids, x_np, "icbpl",
                           lambda: self._encode_standardized(head, x), latents)
        return self._encode_standardized(head, x), nbrs

    @torch.no_grad()
    def _encode_standardized(self, head: Projection, x: torch.Tensor, chunk: int = 8192) -> np.ndarray:
        head.eval()
        return torch.cat([head(x[s:s + chunk], standardized=True) for s in range(0, len(x), chunk)]).cpu().numpy()

    # ------------------------------------------------------------------ images (view bank, fine-tuning)
    def _image_context(self, ctx: FitContext, n: int, what: str) -> tuple[Any, Any, np.ndarray]:
        source, backbone, rows = ctx.source, ctx.backbone, ctx.rows
        if source is None or backbone is None:
            raise InputError(f"icbpl {what} needs the images: fit on an image source, not on precomputed features")
        rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) != n:
            raise InputError(f"icbpl: {len(rows)} source rows for {n} feature rows")
        return source, backbone, rows

    def _view_bank(self, x_np: np.ndarray, ctx: FitContext) -> np.ndarray:
        """(V, N, D) features of ``views`` augmented copies of every image (frozen backbone), cached."""
        cfg = self.config
        source, backbone, rows = self._image_context(ctx, len(x_np), "aug=views")
        if backbone.dim != x_np.shape[1]:
            raise InputError(f"aug=views needs the backbone's own {backbone.dim}-d features (no pca); got {x_np.shape[1]}-d")
        size = cfg.image_size or backbone.preprocess.size
        key = hashlib.sha256(json.dumps({
            "format": VIEWS_FORMAT, "backbone": backbone.cache_key(), "size": size, "views": cfg.views,
            "crop_scale": cfg.crop_scale, "seed": int(ctx.seed), "source": source.fingerprint(),
            "rows": hashlib.sha256(rows.tobytes()).hexdigest()}, sort_keys=True).encode()).hexdigest()[:24]
        path = None if ctx.work_dir is None else Path(ctx.work_dir) / f"icbpl-views-{key}.npy"
        if path is not None and path.is_file():
            try:
                bank = np.load(path, mmap_mode="r", allow_pickle=False)
                if bank.shape == (cfg.views, len(x_np), x_np.shape[1]) and bank.dtype == np.float32:
                    self.history_["view_bank"] = {"path": str(path), "cache": "hit"}
                    return bank
            except (OSError, ValueError):
                pass
        from imgclust.features import resolve_device

        device = resolve_device(ctx.device)
        bb = copy.deepcopy(backbone).to(device).eval()
        images = ImageBatches(source, rows, size, backbone.preprocess, ctx.workers)
        channels = 1 if images.pre.grayscale else 3
        aug = contrastive_augment(size, channels, cfg.crop_scale)
        bank = np.zeros((cfg.views, len(x_np), x_np.shape[1]), np.float32)
        bs = int(ctx.batch_size or 64)
        t0 = time.perf_counter()
        bar = progress_bar(cfg.views * len(rows), "icbpl view bank", unit="img", enable=ctx.progress)
        with ThreadPoolExecutor(max_workers=images.workers) as pool:
            for s in range(0, len(rows), bs):
                idx = np.arange(s, min(s + bs, len(rows)))
                img, ok = images.batch(idx, pool)
                for v in range(cfg.views):
                    xa = seeded_augment(aug, img, int(ctx.seed) * 1_000_003 + v * 7919 + s)
                    with torch.inference_mode():
                        f = bb(images.normalize(xa).to(device)).float().cpu().numpy()
                    f[~ok] = x_np[idx[~ok]]  # an image that no longer decodes: its own features
                    bank[v, idx] = f
                    bar.update(len(idx))
        bar.close()
        info: dict[str, Any] = {"cache": "none", "seconds": round(time.perf_counter() - t0, 2)}
        if path is not None:
            from imgclust.rundir import atomic_open

            try:
                with atomic_open(path, "wb") as fh:
                    np.save(fh, bank)
                info = {**info, "path": str(path), "cache": "written"}
            except OSError as e:
                info["cache"] = f"not written: {e.strerror or e}"
        self.history_["view_bank"] = info
        return bank

    def _fit_images(self, x_np: np.ndarray, head: Projection, centroids: torch.Tensor, nbrs: np.ndarray,
                    ctx: FitContext, gen: torch.Generator, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        n = len(x_np)
        source, backbone, rows = self._image_context(ctx, n, f"finetune={cfg.finetune}")
        if backbone.dim != x_np.shape[1]:
            raise InputError(f"finetune={cfg.finetune} needs the backbone's own {backbone.dim}-d features "
                             f"(no pca); got {x_np.shape[1]}-d")
        bb = copy.deepcopy(backbone).to(device).eval()  # eval: BatchNorm statistics and drop-connect off
        bb.requires_grad_(False)
        train_params = trainable_parameters(bb, cfg.finetune, cfg.finetune_blocks)
        for _, p in train_params:
            p.requires_grad_(True)
        size = cfg.image_size or backbone.preprocess.size
        images = ImageBatches(source, rows, size, backbone.preprocess, ctx.workers)
        aug = contrastive_augment(size, 1 if images.pre.grayscale else 3, cfg.crop_scale)
        opt = build_optimizer("adam", [{"params": list(head.parameters()), "lr": cfg.lr},
                                       {"params": [p for _, p in train_params], "lr": cfg.backbone_lr}],
                              lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_params = sum(p.numel() for _, p in train_params)
        self.history_.update(finetune_params=int(n_params), image_size=int(size))
        with ThreadPoolExecutor(max_workers=images.workers) as pool:

            def latents(r: torch.Tensor, nbrs: np.ndarray, info: StepInfo) -> torch.Tensor:
                pair = self._draw_neighbors(nbrs, r, gen).reshape(-1)
                img, _ = images.batch(torch.cat([r, pair]).numpy(), pool)
                b = len(r)
                xa = seeded_augment(aug, img[:b], int(ctx.seed) * 1_000_003 + info.epoch * 100_003 + info.it)
                return head(bb(images.normalize(torch.cat([img[:b], xa, img[b:]])).to(device)))

            both = nn.ModuleDict({"head": head, "backbone": bb})  # bb stays in eval mode (set above)
            nbrs = self._train(both, head, opt, n, nbrs, ctx, gen, centroids, x_np, f"icbpl {cfg.finetune}",
                               lambda: self._encode_images(bb, head, images, pool, x_np, device), latents)
            z_all = self._encode_images(bb, head, images, pool, x_np, device)
        steps_bs = (n // min(cfg.batch_size, n)) * min(cfg.batch_size, n)
        # 3 forward+backward per image
        self.history_["train_images_per_s"] = [round(3 * steps_bs / max(v, 1e-9), 2) for v in self.history_["epoch_s"]]
        self.backbone_state_ = {nm: p.detach().cpu().clone() for nm, p in bb.named_parameters() if p.requires_grad}
        return z_all, nbrs

    @torch.no_grad()
    def _encode_images(self, bb: nn.Module, head: Projection, images: ImageBatches, pool: ThreadPoolExecutor,
                       fallback: np.ndarray | None, device: torch.device, batch: int = 64) -> np.ndarray:
        """Latent features of every image (no augmentation); unreadable images use ``fallback`` rows."""
        head.eval()
        n = len(images.rows)
        out = np.zeros((n, self.config.latent_dim), np.float32)
        for s in range(0, n, batch):
            idx = np.arange(s, min(s + batch, n))
            img, ok = images.batch(idx, pool)
            z = head(bb(images.normalize(img).to(device))).cpu().numpy()
            if fallback is not None and not ok.all():
                z[~ok] = head(torch.from_numpy(fallback[idx[~ok]]).to(device)).cpu().numpy()
            out[idx] = z
        return out

    # ------------------------------------------------------------------ inference
    def _softmax(self, cos: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(np.asarray(cos, dtype=np.float32)) / self.config.temperature
        return torch.softmax(logits, dim=-1).numpy().astype(np.float32)

    def _check(self) -> tuple[Projection, torch.Tensor]:
        if self.head_ is None or self.centroids_ is None:
            raise InputError("this icbpl model is not fitted yet")
        return self.head_, self.centroids_

    @torch.no_grad()
    def transform(self, features: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Latent features z (N, d), unit rows, of backbone features (N, D)."""
        head, _ = self._check()
        head.eval()
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != head.mean.shape[0]:
            raise InputError(f"features must be (N, {head.mean.shape[0]}), got shape {x.shape}")
        outs = [head(torch.from_numpy(np.ascontiguousarray(x[s:s + chunk]))).numpy() for s in range(0, len(x), chunk)]
        return np.concatenate(outs) if outs else np.zeros((0, self.config.latent_dim), np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """softmax_j(cos(z, c_j) / temperature) for backbone features (N, D); argmax = eq. (8).

        For a fine-tuned model (``image_level``) the features must come from the fine-tuned
        backbone; :meth:`predict_proba_images` does that from images.
        """
        _, c = self._check()
        return self._softmax(self.transform(features) @ c.numpy().T)

    def predict_proba_images(self, source: Any, backbone: nn.Module, batch_size: int = 64, device: str = "auto",
                             workers: int | None = None, progress: bool = True) -> np.ndarray:
        """(N, K) probabilities of every image of ``source`` through the fine-tuned backbone.

        ``backbone`` is the pretrained backbone the model was fitted from (the estimator's);
        the saved fine-tuned parameters replace its trained layers in a copy. Rows of images
        that cannot be decoded are all zero.
        """
        from imgclust.features import resolve_device

        head, c = self._check()
        dev = resolve_device(device)
        bb = finetuned_copy(backbone, self.backbone_state_, dev)
        head = head.to(dev)
        size = self.config.image_size or backbone.preprocess.size
        images = ImageBatches(source, np.arange(len(source)), size, backbone.preprocess, workers)
        z = images.apply(lambda x: head.eval()(bb(x)), c.shape[1], batch_size=batch_size, device=dev,
                         progress=progress, desc="icbpl predict")
        ok = z.any(axis=1)  # latents are unit vectors: all-zero rows are the images that did not decode
        out = np.zeros((len(source), self.n_clusters), np.float32)
        out[ok] = self._softmax(z[ok] @ c.numpy().T)
        self.head_ = head.cpu()
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Projection (``head.*``), PEDCC points (``centroids``), fine-tuned backbone parameters (``backbone.*``)."""
        head, c = self._check()
        state = {f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}
        state["centroids"] = c.clone()
        state.update({f"backbone.{k}": v.clone() for k, v in self.backbone_state_.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        c = state.get("centroids")
        if not isinstance(c, torch.Tensor) or c.ndim != 2 or not c.is_floating_point():
            raise InputError("not an icbpl state: 'centroids' (K x d floats) missing")
        if c.shape[0] != self.n_clusters:
            raise InputError(f"saved model has K={c.shape[0]} centroids, expected {self.n_clusters}")
        if c.shape[1] != self.config.latent_dim:
            raise InputError(f"saved centroids are {c.shape[1]}-d, the config says latent_dim={self.config.latent_dim}")
        mean = state.get("head.mean")
        if not isinstance(mean, torch.Tensor) or mean.ndim != 1:
            raise InputError("not an icbpl state: 'head.mean' missing")
        head = Projection(int(mean.shape[0]), self.config.latent_dim, self.config.hidden_dim)
        try:
            head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
        except RuntimeError as e:
            raise InputError(f"saved icbpl projection does not match hidden_dim={self.config.hidden_dim}: {e}") from e
        if not all(torch.isfinite(v).all() for v in head.state_dict().values() if v.is_floating_point()):
            raise InputError("saved icbpl model has non-finite weights")
        head.requires_grad_(False)
        self.head_ = head.eval()
        self.centroids_ = c.float()
        self.backbone_state_ = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        if self.image_level and not self.backbone_state_:
            raise InputError(f"saved icbpl model has finetune={self.config.finetune} but no backbone parameters")
