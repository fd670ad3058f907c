"""The pre-training loop: two views -> encoder -> projector -> SSL loss, checkpointed every epoch.

* **Data**: every image is decoded once, resized to ``image_size`` (the backbone's
  ``Preprocess.resize_image``) and kept in memory as uint8; unreadable images are skipped.
* **Optimiser**: SGD with momentum 0.9, ``lr = base_lr x batch / 256``, linear warm-up then a
  cosine decay to 0, per step (LARS of SimCLR/BYOL/Barlow Twins is not implemented: SGD is the
  usual choice for CIFAR-sized runs, e.g. SimSiam's and solo-learn's CIFAR recipes). The steps,
  the schedule, the non-finite check and the checkpoints are the shared loop's
  (:func:`imgclust.train.loop.run_loop`, :func:`imgclust.train.optim.schedule`).
* **Momentum encoders** (BYOL, MoCo v2): ``xi <- tau xi + (1 - tau) theta``; BYOL raises
  ``tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2`` from 0.996 to 1 over the K steps,
  MoCo keeps ``m`` fixed.
* **Checkpoint** ``checkpoint.pt`` after every epoch (:mod:`imgclust.train.checkpoint`: atomic
  write, ``weights_only`` load, keyed by the options): model, optimiser, grad scaler, the
  augmentation generator's state, the epoch and the history; ``resume=True`` continues at the
  next epoch and draws exactly the steps an uninterrupted run draws (each epoch's permutation
  comes from ``(seed, epoch)``, the views from the saved generator); a file written with other
  options is refused. The exported encoder (``backbone.pt`` + ``backbone.json``) is
  rewritten every epoch too, so ``--backbone DIR`` works during training.
* **Monitor** (no labels needed), on a fixed subset of up to ``monitor_size`` images after
  every epoch: the loss curve, alignment and uniformity (Wang & Isola 2020) of the encoder's
  L2-normalised features, and with labels the weighted kNN accuracy (k = 20, leave-one-out,
  weights ``exp(sim / 0.07)`` as in InstDisc) of those features.
* **Mixed precision**: ``precision="bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (GPU, with a
  gradient scaler); ``"auto"`` = bf16 on a GPU that supports it, fp32 on CPU.
* **Data parallel**: launched with ``torchrun`` (``WORLD_SIZE`` > 1) every rank builds the same
  network (same seed), takes its share of each epoch's permutation, and the loop averages the
  gradients over ranks after each backward (:func:`imgclust.train.dist.all_reduce_grads`, NCCL on
  GPU, gloo on CPU) before the identical optimiser steps; rank 0 monitors and writes the outputs.
  Not DDP's wrapper: one code path for every trainer of the package (the loop's), and checkpoints
  without a ``module.`` prefix; what it gives up is DDP's overlap of communication with backward and
  its per-forward broadcast of buffers: BatchNorm statistics and the MoCo queue stay per rank (rank
  0's are exported, as before). Negatives (SimCLR, the MoCo queue) and Barlow Twins' batch
  statistics stay per rank (no all-gather yet).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import nn

from imgclust.backbones.base import Backbone
from imgclust.backbones.pretrained_dir import make_encoder, preprocess_for, save_pretrained
from imgclust.configcheck import SEED_MAX, OneOf, check_fields, option
from imgclust.data.base import ImageSource
from imgclust.data.batches import ImageBatches
from imgclust.errors import InputError
from imgclust.losses import ssl as losses
from imgclust.pretrain.recipes import METHODS, TwoViews, recipe_for
from imgclust.train import dist
from imgclust.train.checkpoint import Checkpoint, fingerprint
from imgclust.train.loop import LoopSpec, StepInfo, epoch_permutation, run_loop
from imgclust.train.optim import build_optimizer, schedule

CHECKPOINT = "checkpoint.pt"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: Paper defaults per method: projector (hidden, out), predictor hidden, base lr for SGD at batch 256.
_DEFAULTS = {
    "simclr": dict(proj_hidden=0, proj_dim=128, temperature=0.5, base_lr=0.3),
    "mocov2": dict(proj_hidden=0, proj_dim=128, temperature=0.2, base_lr=0.06),
    "byol": dict(proj_hidden=4096, proj_dim=256, temperature=0.0, base_lr=0.2),
    "barlowtwins": dict(proj_hidden=8192, proj_dim=8192, temperature=0.0, base_lr=0.2),
}


@dataclass
class PretrainConfig:
    """Options of ``imgclust pretrain`` (``proj_hidden = 0`` means the encoder's width)."""

    method: str = option("simclr", OneOf(METHODS))
    arch: str = "resnet18"
    image_size: int = option(32, Ge(1))
    epochs: int = option(100, Ge(1))
    batch_size: int = option(256, Ge(2), why="contrastive losses need pairs")
    base_lr: float | None = option(None, Gt(0))  # per-method default (_DEFAULTS), scaled by batch / 256
    weight_decay: float = option(5e-4, Ge(0))
    warmup_epochs: int = option(10, Ge(0))
    temperature: float | None = option(None, Ge(0))  # simclr 0.5, mocov2 0.2 (> 0 there; unused by byol / barlowtwins)
    proj_hidden: int | None = option(None, Ge(0))
    proj_dim: int | None = option(None, Ge(1))
    pred_hidden: int = option(4096, Ge(1))  # BYOL predictor
    momentum: float | None = option(None, Interval(ge=0, lt=1))  # BYOL tau_base 0.996; MoCo m 0.99
    queue_size: int = option(4096, Ge(1))  # MoCo (65536 on ImageNet; a few thousand for datasets of that size)
    lambd: float = option(5e-3, Ge(0))  # Barlow Twins
    precision: str = option("auto", OneOf(PRECISIONS))
    seed: int = option(0, Interval(ge=0, le=SEED_MAX))
    monitor_size: int = option(1000, Ge(1))
    knn_k: int = option(20, Ge(1))
    patch_size: int | None = option(None, Ge(1))  # ViTs
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)  # the ranges declared above (imgclust.configcheck)
        d = _DEFAULTS[self.method]
        for k in ("proj_hidden", "proj_dim", "temperature", "base_lr"):
            if getattr(self, k) is None:
                setattr(self, k, d[k])
        if self.momentum is None:
            self.momentum = 0.996 if self.method == "byol" else 0.99
        if self.method in ("simclr", "mocov2") and not self.temperature > 0:
            raise InputError(f"{self.method} needs temperature > 0; got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(dims: list[int], bn: bool, last_bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not (bn and (not last or last_bn))))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


class SSLModel(nn.Module):
    """Encoder + projector (+ predictor, momentum target, key queue); ``forward(v1, v2) -> loss``.

    Projectors (paper defaults): SimCLR ``d-d-128`` with BN; MoCo v2 ``d-d-128`` without BN;
    BYOL ``d-4096-256`` (BN) + predictor ``256-4096-256``; Barlow Twins ``d-8192-8192-8192`` (BN).
    """

    def __init__(self, encoder: Backbone, cfg: PretrainConfig, generator: torch.Generator):
        super().__init__()
        self.method, self.cfg = cfg.method, cfg
        d = encoder.dim
        h = cfg.proj_hidden or d
        self.encoder = encoder
        if cfg.method == "simclr":
            self.projector = _mlp([d, h, cfg.proj_dim], bn=True)
        elif cfg.method == "mocov2":
            self.projector = _mlp([d, h, cfg.proj_dim], bn=False)
        elif cfg.method == "byol":
            self.projector = _mlp([d, h, cfg.proj_dim], bn=True)
            self.predictor = _mlp([cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim], bn=True)
        else:
            self.projector = _mlp([d, h, h, cfg.proj_dim], bn=True)
        if cfg.method in ("byol", "mocov2"):
            self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if cfg.method == "mocov2":
            self.queue = losses.KeyQueue(cfg.proj_dim, cfg.queue_size, generator)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target_projector(self.target_encoder(x))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(v1)), self.projector(self.encoder(v2))
        if self.method == "simclr":
            return losses.nt_xent(z1, z2, self.cfg.temperature)
        if self.method == "barlowtwins":
            return losses.barlow_twins_loss(z1, z2, self.cfg.lambd)
        t1, t2 = self._target(v1), self._target(v2)
        if self.method == "byol":
            return losses.byol_loss(self.predictor(z1), t2) + losses.byol_loss(self.predictor(z2), t1)
        # MoCo v2, symmetrised (both views serve as query), then both key sets enter the queue
        keys = self.queue.keys.clone()  # the enqueue below writes the buffer in place before backward
        loss = losses.moco_infonce(z1, t2, keys, self.cfg.temperature)
        loss = loss + losses.moco_infonce(z2, t1, keys, self.cfg.temperature)
        self.queue.enqueue(torch.cat([t1, t2]))
        return 0.5 * loss

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        if not hasattr(self, "target_encoder"):
            return
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.mul_(tau).add_(po.detach(), alpha=1.0 - tau)
            for bo, bt in zip(online.buffers(), target.buffers(), strict=True):
                bt.copy_(bo)


def load_images(source: ImageSource, size: int, workers: int = 4, progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """All readable images resized to ``size`` as uint8 (N, 3, S, S), and their source rows."""
    imgs, ok = ImageBatches(source, np.arange(len(source)), size, preprocess_for(size), max(1, workers)).uint8(
        progress=progress)
    rows = np.flatnonzero(ok).astype(np.int64)
    if len(rows) == 0:
        raise InputError(f"{source.name}: no readable images")
    return (imgs if ok.all() else imgs[torch.from_numpy(ok)]).contiguous(), rows


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div(255.0) - mean) / std


def knn_accuracy(feats: torch.Tensor, labels: torch.Tensor, k: int = 20, t: float = 0.07) -> float:
    """Leave-one-out weighted kNN accuracy: vote of the k nearest (cosine) with weights exp(sim / t)."""
    f = F.normalize(feats.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, len(f) - 1)
    s, idx = sim.topk(k, dim=1)
    n_cls = int(labels.max()) + 1
    votes = torch.zeros(len(f), n_cls).scatter_add_(1, labels[idx], (s / t).exp())
    return float((votes.argmax(1) == labels).float().mean())


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise InputError("precision fp16 needs a GPU; use bf16 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class _Scaled:
    """The optimiser as :func:`~imgclust.train.loop.run_loop` sees it, stepping through a gradient
    scaler (fp16; a disabled scaler steps plainly). Its state dict holds both, so they resume together."""

    def __init__(self, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.opt, self.scaler = opt, scaler

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def _checkpoint(path: Path, cfg: PretrainConfig, resume: bool) -> Checkpoint:
    """``OUT/checkpoint.pt`` in the one checkpoint format, keyed by the options. A file of a run with
    other options is refused (rather than mixing two runs, or silently overwriting it); without
    ``resume`` the old file is removed and training starts over."""
    ckpt = Checkpoint(path, fingerprint(name="pretrain", config=cfg.to_dict()))
    if not resume:
        ckpt.remove()
    elif path.is_file():
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torn: the loop ignores it and starts over
            old = None
        if isinstance(old, dict) and old.get("key") not in (None, ckpt.key):
            was = old.get("state", {}).get("config", {})
            diff = sorted(k for k in cfg.to_dict() if was.get(k) != cfg.to_dict()[k])
            raise InputError(f"{path} was written with other options ({', '.join(diff)}); "
                             "pass the same options, or --no-resume (or another --out) to start over")
    return ckpt


def pretrain(
    source: ImageSource,
    out: str | Path,
    cfg: PretrainConfig,
    *,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
    workers: int | None = None,
    stop_after_epochs: int | None = None,
) -> dict:
    """Pre-train ``cfg.arch`` on ``source`` with ``cfg.method``; write ``out`` (see module docstring).

    ``stop_after_epochs``: end after this many epochs *of this call* (the schedule still spans
    ``cfg.epochs``; used to test resuming). Returns the summary written to ``backbone.json``.
    """
    from imgclust.features import resolve_device

    out = Path(out)
    dist.init_from_env()
    rank, world, local_rank = dist.rank(), dist.world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    precision = _resolve_precision(cfg.precision, dev)
    images, rows = load_images(source, cfg.image_size, workers or min(8, os.cpu_count() or 1))
    n = len(images)
    steps_per_epoch = n // (cfg.batch_size * world)
    if steps_per_epoch < 1:
        raise InputError(f"{n} readable images are fewer than one batch of {cfg.batch_size} x {world} rank(s); "
                         "lower --batch-size")
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = steps_per_epoch * min(cfg.warmup_epochs, cfg.epochs - 1) if cfg.epochs > 1 else 0
    lr_peak = cfg.base_lr * cfg.batch_size * world / 256.0

    g_init = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # every rank builds the same initial network
        encoder = make_encoder(cfg.arch, cfg.image_size, cfg.patch_size)
        model = SSLModel(encoder, cfg, g_init).to(dev)
    pre = encoder.preprocess
    mean = torch.tensor(pre.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=dev).view(1, 3, 1, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    # one group, decay on every weight (SimCLR / BYOL with SGD as before the move; LARS's
    # bias/norm exclusion is not implemented)
    opt = build_optimizer("sgd", [{"params": params, "weight_decay": cfg.weight_decay}], lr=lr_peak, momentum=0.9,
                          weight_decay=cfg.weight_decay)
    scaled = _Scaled(opt, torch.amp.GradScaler("cuda", enabled=precision == "fp16"))
    views = TwoViews(recipe_for(cfg.method), cfg.image_size)
    g_aug = torch.Generator().manual_seed(cfg.seed + 1)
    ckpt = _checkpoint(out / CHECKPOINT, cfg, resume)
    state: dict = {"config": cfg.to_dict(), "history": []}

    # fixed monitor subset (same for every epoch and every resume)
    mon_rng = np.random.default_rng(cfg.seed + 2)
    mon = np.sort(mon_rng.choice(n, size=min(cfg.monitor_size, n), replace=False))
    mon_labels = None
    if source.labels is not None:
        lab = source.labels[rows[mon]]
        if (lab >= 0).all() and len(np.unique(lab)) > 1:
            mon_labels = torch.from_numpy(lab.astype(np.int64))

    # the shared warm-up + cosine schedule, except that the warm-up starts at lr_peak / warmup (not 0:
    # a first step at lr 0 is wasted) and reaches lr_peak one step earlier, as this trainer always did
    lr = schedule("warmup-cosine", lr_peak, total_steps, warmup=warmup_steps)
    lr[:warmup_steps] = lr_peak * (np.arange(warmup_steps) + 1) / warmup_steps

    def tau_at(step: int) -> float:
        if cfg.method == "byol":
            return 1.0 - (1.0 - cfg.momentum) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0
        return cfg.momentum

    @torch.no_grad()
    def monitor() -> dict:
        model.eval()
        x = images[torch.from_numpy(mon)]
        gm = torch.Generator().manual_seed(cfg.seed + 3)
        v1, v2 = views(x, gm)
        out_f = []
        for batch in (x, v1, v2):
            fs = [encoder(_normalize(batch[i:i + 256].to(dev), mean, std)).float().cpu() for i in range(0, len(batch), 256)]
            out_f.append(torch.cat(fs))
        model.train()
        rec = {"alignment": float(losses.alignment(out_f[1], out_f[2])), "uniformity": float(losses.uniformity(out_f[0]))}
        if mon_labels is not None:
            rec["knn_acc"] = knn_accuracy(out_f[0], mon_labels, cfg.knn_k)
        return rec

    meta_base = {
        "arch": cfg.arch, "image_size": cfg.image_size, "dim": encoder.dim, "method": cfg.method,
        "patch_size": getattr(getattr(encoder, "cfg", None), "patch_size", None),
        "preprocess": asdict(pre), "source": source.name, "n_images": n, "config": cfg.to_dict(),
        "precision": precision, "device": str(dev), "world_size": world,
    }
    clock: dict = {}

    def batches(epoch: int):
        if epoch == 0 and rank == 0 and not state["history"]:
            state["history"].append({"epoch": 0, **monitor()})  # the random-init reference point
        clock.update(t=time.perf_counter(), cpu=time.process_time())
        perm = epoch_permutation(n, cfg.seed, epoch)
        for s in range(steps_per_epoch):
            a = (s * world + rank) * cfg.batch_size  # this rank's share of the step's global batch
            x = images[perm[a:a + cfg.batch_size]].to(dev, non_blocking=True)
            v1, v2 = views(x, g_aug)
            yield _normalize(v1, mean, std), _normalize(v2, mean, std)

    def step(batch: tuple[torch.Tensor, torch.Tensor], info: StepInfo):
        with _autocast(dev, precision):
            loss = model(*batch)
        return scaled.scaler.scale(loss), {"ssl_loss": loss.detach()}

    def epoch_end(epoch: int, means: dict, info: StepInfo) -> None:
        t_train, cpu_train = time.perf_counter() - clock["t"], time.process_time() - clock["cpu"]
        rec = {"epoch": epoch + 1, "loss": means["ssl_loss"], "lr": float(lr[(epoch + 1) * steps_per_epoch - 1]),
               "images_per_s": steps_per_epoch * cfg.batch_size * world / max(t_train, 1e-9),
               "step_s": t_train / steps_per_epoch,
               # per CPU-second of this process: the speed on dedicated cores, whatever else runs
               "images_per_cpu_s": steps_per_epoch * cfg.batch_size / max(cpu_train, 1e-9)}
        if rank == 0:
            rec.update(monitor())
            state["history"].append(rec)
            save_pretrained(out, encoder, {**meta_base, "epochs_done": epoch + 1, "history": state["history"]})

    end_epoch = cfg.epochs
    if stop_after_epochs is not None:  # only to test resuming: the schedule still spans cfg.epochs
        saved = ckpt.load()
        end_epoch = min(cfg.epochs, (int(saved["epoch"]) if saved else 0) + stop_after_epochs)
    model.train()
    spec = LoopSpec(epochs=end_epoch, name=cfg.method, lr=lr, option="base_lr", option_value=cfg.base_lr,
                    progress=progress and rank == 0, postfix=("ssl_loss",))
    # Data parallel through the loop's all_reduce_grads (not DDP): see the module docstring.
    res = run_loop(model, step, batches, spec, optimizer=scaled,  # type: ignore[arg-type]
                   after_step=[lambda info: model.update_target(tau_at(info.step + 1))],
                   on_epoch_end=epoch_end, generators=[g_aug], state=state, checkpoint=ckpt)
    history = state["history"]
    if rank == 0 and res.resumed_from == end_epoch:  # nothing left to train: make sure the export exists
        save_pretrained(out, encoder, {**meta_base, "epochs_done": end_epoch, "history": history})
    dist.barrier()
    dist.shutdown()
    return {**meta_base, "epochs_done": end_epoch, "history": history, "out": str(out), "rank": rank}
