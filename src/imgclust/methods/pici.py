"""PICI (partial information discrimination and cross-level interaction; Zhang et al.) and its
ablation baseline CC (Contrastive Clustering, Li et al. 2021): clustering networks trained
*from scratch on the images*, for domains where no pretrained backbone fits.

``pici`` (paper sec. 3, Algorithm 1). Encoder F = a masked-autoencoder ViT
(:mod:`imgclust.backbones.mae`; ``vit_size`` tiny/small/base, patch from the image size,
32 px -> patch 4), decoder D, instance MLP G_I (128-d) and cluster MLP G_C (softmax over K)
(:mod:`imgclust.losses.pici`, where the losses and their formulas are). Every image gives two
views: weak T_w = resize + normalise, strong T_s = random resized crop, flip, colour jitter,
random grayscale, Gaussian blur (kornia, ``imgclust.data.augment.contrastive_augment``); both are
masked (ratio 0.5) in training. Three stages, each with its own epoch count:

1. pre-training (``pretrain_epochs``, paper 200): L_PISD (masked-patch MSE), F and D;
2. training (``train_epochs``, paper 800): L_PISD + L_PICD (instance InfoNCE tau_I = 0.5 +
   cluster contrast tau_C = 1.0 - H(C));
3. boosting (``boost_epochs``, paper 50): L_PICD + L_CLI (k-means on the instance features,
   Hungarian-aligned per batch to the cluster-MLP argmax, cross-entropy); the decoder rests.
   Where the k-means runs is ``cli_kmeans``: ``"dataset"`` (default; what the reference code
   does: once when boosting starts, over the instance features of all images, weak and one
   strong view, labels fixed for the stage and kept in the checkpoint) or ``"batch"`` (eqs.
   (12)-(13) read literally, N = the mini-batch: a fresh k-means per step and view).

PISD's target is the plain pixels (paper); ``norm_pix_loss=True`` standardises each target
patch (MAE's option, on in the reference code).

Test (Algorithm 1, line 21): c = argmax G_C(F(x)) on the *unmasked* image — the paper omits
masking at test time, the reference code does not; this follows the paper.
``predict_proba`` = G_C(F(x)).

``cc``: PICD alone (instance + cluster contrast, one stage of ``epochs``), no masking, no
decoder, on a CNN: ``encoder="cnn"`` (default: a 4-layer conv net, 256-d, sized for CPU),
``resnet18``/``resnet34`` (the CIFAR-stem ResNets of :mod:`imgclust.backbones.resnet`; CC
uses ResNet-34) or ``vit`` (the MAE encoder without masking). CC's own defaults: Adam lr
3e-4, batch 256, tau_I = 0.5, tau_C = 1.0.

**Input.** These methods read the images, not the cached features: the estimator passes
``ctx.source`` / ``ctx.rows`` and the method decodes every training image once to
``image_size`` (``uint8`` in memory: N x 3 x S^2 bytes, 3 MB per 1,000 images at 32 px)
and normalises with mean = std = 0.5. The features the estimator extracts are then unused,
so run them with the cheap ``pixels`` backbone at the same size:
``imgclust cluster SRC --k 10 --method pici --backbone pixels --image-size 32``. Without a
source (precomputed features) a fit works only when the features *are* such pixels
(3 x S x S values in [0, 1], channel-first: the ``pixels`` backbone's output).
``image_level`` is true: after fit, ``fit_proba_`` holds the network's probabilities of the
training images, and ``predict`` on new images goes through :meth:`predict_proba_images`.
The network's parameters are saved in ``state_dict`` (``net.*``).

**Checkpoints.** After every epoch (and after each stage's evaluation) the network, the
optimiser and the history go to ``<work_dir>/<name>-ckpt-<key>.pt`` (atomic write; the key
hashes the method, K, seed, the options other than the epoch counts, and the training
images). A re-run resumes from the last completed epoch; raising an epoch count continues
from there (for a stage that a later stage already followed, the raise is ignored: stages
keep their order). Every epoch draws its order, masks and augmentations from a generator seeded by
(seed, stage, epoch), so a resumed run equals an uninterrupted one.

**History.** ``history_["stages"]``: per stage its losses per epoch, ``images_per_s``
(training images per second, two views each, forward + backward; use it to size a GPU run)
and, when the caller puts ground truth in ``ctx.truth`` (the benchmark does), the
ACC/NMI/ARI of the cluster head and of k-means on the encoder features after the stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval

from imgclust.backbones.mae import VIT_SIZES, MaskedAutoencoderViT
from imgclust.configcheck import OneOf, option
from imgclust.data.augment import contrastive_augment, seeded_augment
from imgclust.data.pixels import load_pixel_images, pixels_to_uint8, training_images
from imgclust.errors import InputError
from imgclust.heads.pici import ClusteringNet, build_clustering_net, normalize_half
from imgclust.losses.pici import cli_loss, cli_targets, cluster_loss, instance_loss, pisd_loss
from imgclust.methods.base import ClusteringMethod, FitContext, MethodConfig, register_method
from imgclust.train.loop import LoopSpec, StepInfo, run_loop
from imgclust.train.optim import build_optimizer
from imgclust.train.stages import derive_seed, evaluate_stage, stage_checkpoint

CC_ENCODERS = ("cnn", "resnet18", "resnet34", "vit")
CLI_KMEANS = ("dataset", "batch")


@dataclass
class PICIConfig(MethodConfig):
    """Options of ``pici`` (paper sec. 4.1 defaults, except where a CPU needs less)."""

    image_size: int = option(32, Ge(8))  # paper: 224; patch = image_size / 8 up to 32 px
    vit_size: str = option("small", OneOf(VIT_SIZES))  # tiny | small (paper) | base
    depth: int = option(0, Ge(0))  # encoder blocks; 0 = the size's own (small: 6)
    patch_size: int = option(0, Ge(0))  # 0 = from the image size (32 -> 4, 224 -> 16)
    decoder_dim: int = option(512, Ge(1))  # paper: 512
    decoder_depth: int = option(8, Ge(1))  # paper: 8
    decoder_heads: int = option(16, Ge(1))  # paper: 16
    mask_ratio: float = option(0.5, Interval(gt=0, lt=1), why="PISD needs masked patches")  # training only (paper: 0.5; none at test)
    instance_dim: int = option(128, Ge(1))
    projector_bn: bool = False  # BatchNorm in G_I / G_C (not in the paper; see heads.pici.InstanceMLP)
    tau_i: float = option(0.5, Gt(0))
    tau_c: float = option(1.0, Gt(0))
    pretrain_epochs: int = option(200, Ge(0))  # E1
    train_epochs: int = option(800, Ge(0))  # E2
    boost_epochs: int = option(50, Ge(0))  # E3
    batch_size: int = option(96, Ge(2), why="contrastive losses need negatives")
    lr: float = option(1e-4, Gt(0))  # Adam
    weight_decay: float = option(0.0, Ge(0))
    crop_scale: float = option(0.2, Interval(gt=0, le=1))  # strong view: smallest area of the resized crop (not stated in the paper)
    norm_pix_loss: bool = False  # PISD target standardised per patch (reference code: on; paper: plain MSE)
    cli_kmeans: str = option("dataset", OneOf(CLI_KMEANS))  # "dataset" (reference code: once per boosting stage) | "batch" (eq. 12 per batch)
    checkpoint: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()  # the ranges declared above (imgclust.configcheck)
        if self.patch_size and self.image_size % self.patch_size:
            raise InputError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")


@dataclass
class CCConfig(MethodConfig):
    """Options of ``cc`` (Contrastive Clustering's defaults; ``epochs`` CPU-sized, paper: 1000)."""

    image_size: int = option(32, Ge(8))
    encoder: str = option("cnn", OneOf(CC_ENCODERS))  # cnn | resnet18 | resnet34 | vit
    vit_size: str = option("tiny", OneOf(VIT_SIZES))  # encoder="vit" only
    depth: int = option(0, Ge(0))
    patch_size: int = option(0, Ge(0))
    instance_dim: int = option(128, Ge(1))
    projector_bn: bool = False  # BatchNorm in G_I / G_C (not in the paper; see heads.pici.InstanceMLP)
    tau_i: float = option(0.5, Gt(0))
    tau_c: float = option(1.0, Gt(0))
    epochs: int = option(100, Ge(0))
    batch_size: int = option(256, Ge(2), why="contrastive losses need negatives")
    lr: float = option(3e-4, Gt(0))
    weight_decay: float = option(0.0, Ge(0))
    crop_scale: float = option(0.2, Interval(gt=0, le=1))
    checkpoint: bool = True


# ---------------------------------------------------------------------------- method
def _build_net(cfg: PICIConfig | CCConfig, n_clusters: int) -> ClusteringNet:
    return build_clustering_net(getattr(cfg, "encoder", "vit"), n_clusters, image_size=cfg.image_size,
                                instance_dim=cfg.instance_dim, bn=cfg.projector_bn, vit_size=cfg.vit_size,
                                patch_size=cfg.patch_size, depth=cfg.depth, decoder_dim=getattr(cfg, "decoder_dim", 64),
                                decoder_depth=getattr(cfg, "decoder_depth", 1),
                                decoder_heads=getattr(cfg, "decoder_heads", 4))


class _ImageContrastive(ClusteringMethod):
    """Shared recipe of ``pici`` and ``cc`` (stages differ)."""

    image_level = True

    def __init__(self, n_clusters: int, config: MethodConfig | dict | None = None) -> None:
        super().__init__(n_clusters, config)
        self.net_: ClusteringNet | None = None
        self.fit_proba_: np.ndarray | None = None
        self.stage_labels_: dict[str, dict[str, np.ndarray]] = {}
        self._pseudo: dict[str, np.ndarray] = {}  # CLI k-means labels of views a/b (cli_kmeans="dataset")

    def _stages(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def fit(self, features: np.ndarray, ctx: FitContext) -> _ImageContrastive:
        """Each stage is one :func:`~imgclust.train.loop.run_loop` (Adam, checkpoint + resume per
        epoch); after a stage, its k-means / head labels are evaluated (recomputed on a resume:
        they are a function of the network)."""
        from imgclust.features import resolve_device

        cfg = self.config
        imgs, ident = training_images(features, ctx.source, ctx.rows, cfg.image_size, name=self.name,
                                      progress=ctx.progress)
        n = len(imgs)
        if n < 2:
            raise InputError(f"{self.name} needs at least 2 images")
        device = resolve_device(ctx.device)
        torch.manual_seed(derive_seed(int(ctx.seed), 0))  # parameter initialisation
        net = _build_net(cfg, self.n_clusters).to(device)
        opt = build_optimizer("adam", net, lr=cfg.lr, weight_decay=cfg.weight_decay)
        stages = self._stages()
        self.history_ = {"stages": {name: {"epochs_run": 0} for name, _ in stages}, "n_images": n,
                         "parameters": int(sum(p.numel() for p in net.parameters()))}
        self.stage_labels_, self._pseudo = {}, {}
        aug = contrastive_augment(cfg.image_size, 3, cfg.crop_scale).to(device)
        opts = {k: v for k, v in asdict(cfg).items() if not k.endswith("epochs") and k != "checkpoint"}
        resumed: list[int] = []
        paths: list[str] = []
        for si, (stage, epochs) in enumerate(stages):
            ckpt = stage_checkpoint(ctx.work_dir if cfg.checkpoint else None, self.name, stages, si,
                                    k=self.n_clusters, seed=int(ctx.seed), opts=opts, data=ident)
            res = self._run_stage(net, opt, imgs, aug, si, stage, epochs, ckpt, ctx, device)
            resumed.append(res.resumed_from or 0)
            if ckpt is not None and ckpt.path is not None:
                paths.append(str(ckpt.path))
            if epochs > 0:
                h, p = net.encode_images(imgs, device)
                labels, record = evaluate_stage(h, None if stage == "pretrain" else p, self.n_clusters,
                                                int(ctx.seed), ctx.truth)
                self.stage_labels_[stage] = labels
                self.history_["stages"][stage].update(record)
        self.history_["resumed_from"] = {"done": resumed} if any(resumed) else None
        self.history_["checkpoint"] = paths[-1] if paths else None
        self.net_ = net.cpu().eval()
        self.fit_proba_ = self._proba(imgs)
        self.labels_ = self.fit_proba_.argmax(axis=1)
        self.history_["final_stage"] = next((s for (s, e) in reversed(stages) if e > 0), None)
        return self

    def _run_stage(self, net: ClusteringNet, opt: torch.optim.Optimizer, imgs: torch.Tensor, aug: torch.nn.Module,
                   si: int, stage: str, epochs: int, ckpt, ctx: FitContext, device: torch.device):
        """One stage in the shared loop: every epoch's order, masks and augmentations come from
        generators seeded by (seed, stage, epoch[, step]), so a resumed run equals a whole one."""
        cfg, seed, n = self.config, int(ctx.seed), len(imgs)
        bs = min(cfg.batch_size, n)
        steps = n // bs
        state: dict[str, Any] = {}

        def batches(epoch: int):
            if stage == "boost" and getattr(cfg, "cli_kmeans", "batch") == "dataset":
                if "pseudo_a" not in state:  # once per boosting stage; resumes with it
                    pl = net.dataset_cli_labels(imgs, aug, self.n_clusters, device, derive_seed(seed, si, -1))
                    state.update(pseudo_a=torch.from_numpy(pl["a"]), pseudo_b=torch.from_numpy(pl["b"]))
                self._pseudo = {"a": state["pseudo_a"].numpy(), "b": state["pseudo_b"].numpy()}
            net.train()
            gen = torch.Generator().manual_seed(derive_seed(seed, si, epoch))
            perm = torch.randperm(n, generator=gen)
            for it in range(steps):
                idx = perm[it * bs:(it + 1) * bs]
                x = imgs[idx].to(device).float().div_(255.0)
                xb = seeded_augment(aug, x, derive_seed(seed, si, epoch, it))
                yield normalize_half(x), normalize_half(xb), gen, derive_seed(seed, si, epoch, it, 1), idx.numpy()

        def step(batch: tuple, info: StepInfo) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            parts = self._step_losses(net, stage, *batch)
            return sum(parts.values()), parts

        res = run_loop(net, step, batches, LoopSpec(epochs=epochs, name=f"{self.name} {stage}", progress=ctx.progress),
                       optimizer=opt, state=state, checkpoint=ckpt)
        hist = self.history_["stages"][stage]
        hist.update({k: [round(float(e), 5) for e in v] for k, v in res.history.items() if k != "loss"})  # loss = sum
        hist["images_per_s"] = [round(steps * bs / max(t, 1e-9), 2) for t in res.epoch_s]
        hist["epochs_run"] = len(res.history.get("loss", []))
        return res

    def _step_losses(self, net: ClusteringNet, stage: str, xa: torch.Tensor, xb: torch.Tensor,
                     gen: torch.Generator, seed: int, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Loss terms of one step (each a scalar tensor; the step minimises their sum)."""
        cfg = self.config
        out: dict[str, torch.Tensor] = {}
        if net.is_vit:
            ratio = float(getattr(cfg, "mask_ratio", 0.0))
            enc: MaskedAutoencoderViT = net.encoder  # type: ignore[assignment]
            ta, ma, ra = enc.forward_encoder(xa, ratio, gen)
            tb, mb, rb = enc.forward_encoder(xb, ratio, gen)
            if stage in ("pretrain", "train") and ratio > 0:
                npx = bool(getattr(cfg, "norm_pix_loss", False))
                out["pisd"] = 0.5 * (pisd_loss(enc.forward_decoder(ta, ra), enc.patchify(xa), ma, npx)
                                     + pisd_loss(enc.forward_decoder(tb, rb), enc.patchify(xb), mb, npx))
            ha, hb = ta[:, 0], tb[:, 0]
        else:
            ha, hb = net.encoder(xa), net.encoder(xb)
        if stage == "pretrain":
            return out
        za, zb = net.instance(ha), net.instance(hb)
        ca, cb = net.cluster(ha), net.cluster(hb)
        out["instance"] = instance_loss(za, zb, cfg.tau_i)
        clu = cluster_loss(ca, cb, cfg.tau_c)
        out["cluster"] = clu.contrast
        out["neg_entropy"] = -clu.entropy
        if stage == "boost":
            pa, pb = (self._pseudo["a"][idx], self._pseudo["b"][idx]) if self._pseudo else (None, None)
            out["cli"] = 0.5 * (cli_loss(ca, cli_targets(za, ca, seed, pa)) + cli_loss(cb, cli_targets(zb, cb, seed + 1, pb)))
        return out

    # ------------------------------------------------------------------ inference
    def _check(self) -> ClusteringNet:
        if self.net_ is None:
            raise InputError(f"this {self.name} model is not fitted yet")
        return self.net_

    def _proba(self, imgs: torch.Tensor) -> np.ndarray:
        return self._check().encode_images(imgs)[1].astype(np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """G_C(F(x)) for pixel features of 3 x S x S values in [0, 1] (the ``pixels`` backbone at
        ``image_size``); other features raise InputError (use :meth:`predict_proba_images`)."""
        s = self.config.image_size
        imgs = pixels_to_uint8(features, s)
        if imgs is None:
            raise InputError(f"{self.name} predicts from images; features of shape {np.shape(features)} are not "
                             f"3x{s}x{s} pixels")
        return self._proba(imgs)

    def predict_proba_images(self, source: Any, backbone: Any = None, batch_size: int = 256, device: str = "auto",
                             workers: int | None = None, progress: bool = True) -> np.ndarray:
        """(N, K) probabilities of every image of ``source``; unreadable images get all-zero rows.
        ``backbone``/``workers`` are unused (the network is the model's own)."""
        from imgclust.features import resolve_device

        net = self._check()
        dev = resolve_device(device)
        imgs, ok = load_pixel_images(source, np.arange(len(source)), self.config.image_size, progress)
        out = np.zeros((len(source), self.n_clusters), np.float32)
        if ok.any():
            _, p = net.to(dev).encode_images(imgs[torch.from_numpy(ok)], dev, batch_size)
            out[ok] = p
        self.net_ = net.cpu()
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network's parameters and buffers as ``net.<name>``."""
        return {f"net.{k}": v.detach().clone() for k, v in self._check().state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        net = _build_net(self.config, self.n_clusters)
        own = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        if not own:
            raise InputError(f"not a {self.name} state: no 'net.*' tensors")
        try:
            net.load_state_dict(own)
        except RuntimeError as e:
            raise InputError(f"saved {self.name} network does not match its options (K={self.n_clusters}): "
                             f"{str(e).splitlines()[0]}") from e
        if not all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point()):
            raise InputError(f"saved {self.name} model has non-finite weights")
        self.net_ = net.eval()


@register_method
class PICI(_ImageContrastive):
    """PICI: MAE ViT, PISD + PICD + CLI in three stages (see the module docstring)."""

    name = "pici"
    Config = PICIConfig

    def _stages(self) -> list[tuple[str, int]]:
        c = self.config
        return [("pretrain", c.pretrain_epochs), ("train", c.train_epochs), ("boost", c.boost_epochs)]


@register_method
class CC(_ImageContrastive):
    """Contrastive Clustering: instance + cluster contrast on a CNN (PICI's PICD alone)."""

    name = "cc"
    Config = CCConfig

    def _stages(self) -> list[tuple[str, int]]:
        return [("train", self.config.epochs)]
