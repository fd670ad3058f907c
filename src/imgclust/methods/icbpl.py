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

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval
from torch import nn

from imgclust.backbones.finetune import trainable_copy
from imgclust.configcheck import OneOf, option
from imgclust.data.augment import contrastive_augment, feature_view, seeded_augment
from imgclust.data.batches import ImageBatches, fit_image_rows
from imgclust.errors import InputError
from imgclust.heads.pedcc import load_or_build_pedcc, pedcc_stats
from imgclust.heads.projection import Projection, centroid_model_state, load_centroid_model
from imgclust.heads.wrap import BackboneHead, encode_images, features_tensor, predict_finetuned_images
from imgclust.losses.icbpl import draw_neighbors, icbpl_loss, pedcc_proba
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, register_method
from imgclust.neighbors import fixed_neighbors, neighbor_overlap
from imgclust.train.loop import StepInfo
from imgclust.train.optim import build_optimizer
from imgclust.train.recipe import cluster_sizes, run_epochs
from imgclust.views import contrastive_view_bank

FINETUNE = ("head", "last_blocks", "all")
AUGS = ("feature", "views")
PEDCC_METHODS = ("auto", "simplex", "repulsion")


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
        from imgclust.features import resolve_device

        cfg, k = self.config, self.n_clusters
        x_np = np.ascontiguousarray(features, dtype=np.float32)
        if len(x_np) < k:
            raise InputError(f"K={k} is larger than the number of images ({len(x_np)})")
        if len(x_np) < 2:
            raise InputError("ICBPL needs at least 2 images")
        t0 = time.perf_counter()
        device = resolve_device(ctx.device)
        gen = torch.Generator(device="cpu").manual_seed(int(ctx.seed))
        c_np = load_or_build_pedcc(k, cfg.latent_dim, cfg.pedcc, seed=cfg.pedcc_seed, cache_dir=ctx.cache_dir)
        centroids = torch.from_numpy(c_np).to(device)
        nbrs = fixed_neighbors(x_np, cfg.k, ctx.work_dir, ctx.seed, ctx.progress, cached=True)
        t_prep = time.perf_counter() - t0
        head = Projection.for_features(x_np, cfg.latent_dim, cfg.hidden_dim, ctx.seed).to(device)
        self.history_ = {"pedcc": pedcc_stats(c_np), "neighbors_k": int(nbrs.shape[1]), "refresh_overlap": [],
                         "loss": [], "mmd": [], "aug": [], "knn": [], "pedcc_loss": [], "epoch_s": []}
        fit_mode = self._fit_head if cfg.finetune == "head" else self._fit_images
        z_all, nbrs = fit_mode(x_np, head, centroids, nbrs, ctx, gen, device)
        self.head_, self.centroids_, self.neighbors_ = head.cpu().eval(), centroids.cpu(), nbrs
        self.labels_ = (z_all @ c_np.T).argmax(axis=1).astype(np.int64)
        self.fit_proba_ = pedcc_proba(z_all, c_np, cfg.temperature) if self.image_level else None
        self.history_.update(**cluster_sizes(self.labels_, k), prepare_s=round(t_prep, 3),
                             train_s=round(time.perf_counter() - t0 - t_prep, 3),
                             mean_epoch_s=round(float(np.mean(self.history_["epoch_s"])), 4))
        return self

    def _train(self, model: nn.Module, head: Projection, opt: torch.optim.Optimizer, nbrs: np.ndarray,
               ctx: FitContext, gen: torch.Generator, x_np: np.ndarray, label: str, encode, latents,
               centroids: torch.Tensor) -> np.ndarray:
        """The epochs of every mode in the shared loop: neighbour refresh at an epoch's start, batches
        without replacement (the last incomplete one dropped: the MMD target is the PEDCC tiled to 2B),
        eq. (7) per step. ``latents(rows, draw, info)`` -> z = [B images; B views; B x m neighbours], ``draw(rows)``
        the rows' neighbours for Loss3."""
        cfg, n = self.config, len(x_np)
        bs = min(cfg.batch_size, n)
        weights = (float(cfg.mmd_weight), float(cfg.aug_weight), float(cfg.knn_weight), float(cfg.pedcc_weight))
        state = {"nbrs": torch.from_numpy(np.ascontiguousarray(nbrs)), "refresh_overlap": []}

        def batches(epoch: int):
            if cfg.refresh_every and epoch > 0 and epoch % cfg.refresh_every == 0:
                new = fixed_neighbors(encode(), cfg.k, None, ctx.seed + epoch, False, cached=False)
                state["refresh_overlap"].append(round(neighbor_overlap(state["nbrs"].numpy(), new), 4))
                state["nbrs"] = torch.from_numpy(np.ascontiguousarray(new))
            head.train()
            perm = torch.randperm(n, generator=gen)
            return (perm[it * bs:(it + 1) * bs] for it in range(n // bs))

        def step(rows: torch.Tensor, info: StepInfo):
            draw = lambda r: draw_neighbors(state["nbrs"], r, cfg.neighbors_per_step, gen)  # noqa: E731
            z, b = latents(rows, draw, info), len(rows)
            out = icbpl_loss(z[:b], z[b:2 * b], z[2 * b:].reshape(b, -1, z.shape[1]), centroids, weights,
                             cfg.kernel_mul, cfg.kernel_num)
            return out.loss, {"mmd": out.mmd, "aug": out.aug, "knn": out.knn, "pedcc": out.pedcc}

        res, run = run_epochs(self, ctx, x_np, model, step, batches, optimizer=opt, generator=gen, state=state,
                              label=label)
        for key, hk in (("loss", "loss"), ("mmd", "mmd"), ("aug", "aug"), ("knn", "knn"), ("pedcc", "pedcc_loss")):
            self.history_[hk] = res.history.get(key, [])
        self.history_.update(**run, refresh_overlap=state["refresh_overlap"])
        return state["nbrs"].numpy()

    def _fit_head(self, x_np: np.ndarray, head: Projection, centroids: torch.Tensor, nbrs: np.ndarray,
                  ctx: FitContext, gen: torch.Generator, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """``finetune="head"``: the projection on the frozen features; Loss2's view from ``aug``."""
        cfg = self.config
        x = head.standardize(features_tensor(x_np).to(device))
        bank = None
        if cfg.aug == "views":  # (V, N, D), rows read per batch
            rows = fit_image_rows(ctx.source, ctx.backbone, ctx.rows, x_np.shape, self.name, "aug=views")
            bank, self.history_["view_bank"] = contrastive_view_bank(
                x_np, ctx.source, ctx.backbone, rows, views=cfg.views, size=cfg.image_size or ctx.backbone.preprocess.size,
                crop_scale=cfg.crop_scale, seed=ctx.seed, work_dir=ctx.work_dir, device=device, workers=ctx.workers,
                batch_size=int(ctx.batch_size or 64), progress=ctx.progress, desc="icbpl view bank")
        # ICBPC's reference decays every parameter (plain Adam): kept, so no no-decay rule here
        opt = build_optimizer("adam", [{"params": list(head.parameters())}], lr=cfg.lr, weight_decay=cfg.weight_decay)

        def latents(rows: torch.Tensor, draw, info: StepInfo) -> torch.Tensor:
            xb = x[rows.to(device)]
            if bank is None:
                xa = feature_view(xb, cfg.feature_dropout, cfg.feature_noise, gen)
            else:
                v = torch.randint(bank.shape[0], (len(rows),), generator=gen).numpy()
                xa = head.standardize(torch.from_numpy(np.asarray(bank[v, rows.numpy()], dtype=np.float32)).to(device))
            return head(torch.cat([xb, xa, x[draw(rows).reshape(-1).to(device)]]), standardized=True)

        nbrs = self._train(head, head, opt, nbrs, ctx, gen, x_np, "icbpl", lambda: head.encode_standardized(x), latents,
                           centroids)
        return head.encode_standardized(x), nbrs

    def _fit_images(self, x_np: np.ndarray, head: Projection, centroids: torch.Tensor, nbrs: np.ndarray,
                    ctx: FitContext, gen: torch.Generator, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """``finetune="last_blocks"|"all"``: a trainable copy of the backbone + the projection on augmented
        images (BatchNorm statistics of the copy stay fixed: it stays in eval mode)."""
        cfg, backbone = self.config, ctx.backbone
        rows = fit_image_rows(ctx.source, backbone, ctx.rows, x_np.shape, self.name, f"finetune={cfg.finetune}")
        bb, train_params = trainable_copy(backbone, cfg.finetune, cfg.finetune_blocks, device=device)
        net, size = BackboneHead(bb, head), cfg.image_size or backbone.preprocess.size
        images = ImageBatches(ctx.source, rows, size, backbone.preprocess, ctx.workers)
        aug = contrastive_augment(size, 1 if images.pre.grayscale else 3, cfg.crop_scale)
        opt = build_optimizer("adam", [{"params": list(head.parameters()), "lr": cfg.lr},
                                       {"params": [p for _, p in train_params], "lr": cfg.backbone_lr}],
                              lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.history_.update(finetune_params=int(sum(p.numel() for _, p in train_params)), image_size=int(size))

        def encode() -> np.ndarray:  # latents of every image; one that no longer decodes uses its features
            head.eval()
            return encode_images(images, net, x_np, cfg.latent_dim, device)

        with ThreadPoolExecutor(max_workers=images.workers) as pool:

            def latents(r: torch.Tensor, draw, info: StepInfo) -> torch.Tensor:
                img, _ = images.batch(torch.cat([r, draw(r).reshape(-1)]).numpy(), pool)
                b = len(r)
                xa = seeded_augment(aug, img[:b], int(ctx.seed) * 1_000_003 + info.epoch * 100_003 + info.it)
                return net(images.normalize(torch.cat([img[:b], xa, img[b:]])).to(device))

            nbrs = self._train(net, head, opt, nbrs, ctx, gen, x_np, f"icbpl {cfg.finetune}", encode, latents, centroids)
        steps_bs = (len(x_np) // min(cfg.batch_size, len(x_np))) * min(cfg.batch_size, len(x_np))
        # 3 forward+backward per image
        self.history_["train_images_per_s"] = [round(3 * steps_bs / max(v, 1e-9), 2) for v in self.history_["epoch_s"]]
        self.backbone_state_ = {nm: p.detach().cpu().clone() for nm, p in train_params}
        return encode(), nbrs

    # ------------------------------------------------------------------ inference
    def _check(self) -> tuple[Projection, torch.Tensor]:
        if self.head_ is None or self.centroids_ is None:
            raise InputError("this icbpl model is not fitted yet")
        return self.head_, self.centroids_

    def transform(self, features: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Latent features z (N, d), unit rows, of backbone features (N, D)."""
        return self._check()[0].encode(features, chunk)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """softmax_j(cos(z, c_j) / temperature) for backbone features (N, D); argmax = eq. (8).

        For a fine-tuned model (``image_level``) the features must come from the fine-tuned
        backbone; :meth:`predict_proba_images` does that from images.
        """
        _, c = self._check()
        return pedcc_proba(self.transform(features), c.numpy(), self.config.temperature)

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
        head = head.to(dev).eval()
        z = predict_finetuned_images(backbone, self.backbone_state_, head, source, c.shape[1], size=self.config.image_size,
                                     batch_size=batch_size, device=dev, workers=workers, progress=progress,
                                     desc="icbpl predict")
        self.head_ = head.cpu()
        return pedcc_proba(z, c.numpy(), self.config.temperature)  # undecoded images: all-zero latents and rows

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Projection (``head.*``), PEDCC points (``centroids``), fine-tuned backbone parameters (``backbone.*``)."""
        return centroid_model_state(*self._check(), self.backbone_state_)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        cfg = self.config
        self.head_, self.centroids_, self.backbone_state_ = load_centroid_model(
            state, self.n_clusters, cfg.latent_dim, cfg.hidden_dim, cfg.finetune, self.name)
