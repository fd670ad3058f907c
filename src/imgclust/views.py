"""Augmented views of every image through the frozen backbone: a precomputed bank or on the fly.

SPICE-Self labels a pool of images from the heads' predictions on *weakly* augmented
images and trains the heads on *strongly* augmented ones; SPICE-Semi's FixMatch needs both
views again (see :mod:`imgclust.data.augment` for the two augmentations). With a frozen
backbone, a view is just the backbone's feature vector of an augmented image, so the heads
train on feature vectors either way. Three providers, one interface
(:class:`FeatureViews.sample`):

* ``"bank"`` (CPU default) — V weak and V strong views per image, computed once and stored
  memory-mapped in the feature cache; each time a view is needed, one of the V is drawn at
  random. This turns the per-epoch augmentation into a one-off cost.
* ``"online"`` (default when the device is a GPU) — read, augment (batched, on the
  device) and run the backbone for every batch, a fresh view each time: what the papers do.
* ``"none"`` — both views are the un-augmented features (no images needed: the mode for
  precomputed features; the SPICE paper's Table 1 shows the views move SPICE-Self's ACC by
  at most about 2.5 points on STL-10).

Cost of the bank (why V is small by default): building it runs the backbone over 2 V N
images. EfficientNet-Lite0 at 224 px runs at about 24-30 images/s on 2 CPU cores, so
V = 2 (4 views) for the 50,000 CIFAR-10 training images is about 2 hours; at
``image_size=96`` about 5x less. The extraction shows a progress bar with an ETA, resumes
after an interruption and is reused by later runs. Use the same ``image_size`` for the
features you cluster and for the views, or the heads see two feature distributions.

Layout, under the feature-cache entry of the images (``FitContext.work_dir``)::

    views-<key>/weak-0/    features.npy (N, D) float32, progress.json, meta.json
    views-<key>/weak-1/    ... one entry per view, same format as the feature cache
    views-<key>/strong-0/  ...

The key hashes the images (source fingerprint), the backbone and its preprocessing, the
view image size, the augmentation parameters, the seed and the precision. Views are
numbered, and view v of an image is the same whatever V is (its random numbers come from a
generator seeded by (seed, kind, v, image index)), so raising V from 2 to 4 computes only
views 2 and 3. Each view entry is written by :mod:`imgclust.features`' own machinery:
flushed in chunks with per-chunk digests, resumed after Ctrl-C / SIGTERM / SIGKILL from its
last verified chunk, marked complete by ``meta.json`` (written last, with the sha256) and
verified before it is trusted.

:func:`contrastive_view_bank` is the other bank: V contrastive views (crop, flip, colour,
blur) per image in one ``.npy`` file, for ICBPL's ``aug="views"``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclust.backbones.base import Backbone
from imgclust.data.augment import DEFAULT_SPEC, KINDS, AugmentSpec, augment, contrastive_augment, seeded_augment
from imgclust.data.base import ImageSource, as_rgb
from imgclust.data.batches import ImageBatches
from imgclust.errors import InputError
from imgclust.features import extract_to_entry, resolve_device
from imgclust.progress import progress_bar

VIEWS_FORMAT = 1
VIEW_MODES = ("auto", "bank", "online", "none")


def _view_seed(seed: int, kind: str, v: int, index: int) -> int:
    """A 63-bit seed per (run seed, kind, view number, image index); independent of batching."""
    h = hashlib.blake2b(f"{seed}|{kind}|{v}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class ViewSource(ImageSource):
    """View ``v`` of kind ``kind`` of every image of ``base``: resized to the view size, then augmented.

    ``read(i)`` is deterministic (a generator seeded by (seed, kind, v, i)), so an interrupted
    bank extraction resumes with exactly the views it would have computed.
    """

    def __init__(self, base: ImageSource, kind: str, v: int, seed: int, spec: AugmentSpec, preprocess: Any) -> None:
        if kind not in KINDS:
            raise InputError(f"unknown view kind {kind!r}; allowed: {', '.join(KINDS)}")
        self.base, self.kind, self.v, self.seed, self.spec, self.pre = base, kind, int(v), int(seed), spec, preprocess
        self.name = f"{base.name}:{kind}-{v}"
        self.labels, self.class_names = base.labels, base.class_names
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.base)

    def read(self, i: int) -> np.ndarray:
        img = self.pre.resize_image(self.base.read(i))  # (s, s, C) uint8
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]  # a copy: the array may be read-only
        g = torch.Generator().manual_seed(_view_seed(self.seed, self.kind, self.v, int(i)))
        y = augment(x, self.kind, g, self.spec)[0].permute(1, 2, 0).numpy()
        return as_rgb(y)

    def ids(self) -> list[str]:
        return self.base.ids()

    def path(self, i: int) -> str | None:
        return self.base.path(i)

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256(self.base.fingerprint().encode())
            h.update(f"|{self.kind}|{self.v}|{self.seed}|{self.spec.key()}|{self.pre.key()}".encode())
            self._fp = h.hexdigest()
        return self._fp


class ViewBackbone(Backbone):
    """The frozen backbone behind a view: same network, preprocessing resized to the view size.

    The view images arrive already resized (by :class:`ViewSource`), so this preprocessing
    always squashes to the same size, a no-op, and only normalises.
    """

    def __init__(self, inner: Backbone, size: int, label: str) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"{inner.name} {label}"
        self.dim = inner.dim
        self.weights_id = inner.weights_id
        self.preprocess = dataclasses.replace(inner.preprocess, size=int(size), resize="squash")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def view_bank_key(source: ImageSource, backbone: Backbone, *, image_size: int, spec: AugmentSpec, seed: int,
                  precision: str) -> str:
    h = hashlib.sha256(f"views-format={VIEWS_FORMAT}\n".encode())
    for part in (source.fingerprint(), backbone.cache_key(), str(int(image_size)), spec.key(), str(int(seed)), precision):
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


@dataclass
class ViewBank:
    """V weak and V strong feature views of every image of a source (memmaps (N, D) each)."""

    weak: list[np.ndarray]
    strong: list[np.ndarray]
    valid: np.ndarray  # (N,) bool: every view of the image was computed
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_views(self) -> int:
        return len(self.weak)

    def gather(self, kind: str, rows: np.ndarray, fallback: np.ndarray | None = None,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The views of ``rows`` as one tensor (V, len(rows), D) (kept in RAM in ``dtype``).

        Rows whose views could not be computed get ``fallback[row]`` (the un-augmented
        features) in every view.
        """
        arrays = self.weak if kind == "weak" else self.strong
        out = torch.empty((len(arrays), len(rows), arrays[0].shape[1]), dtype=dtype)
        bad = ~self.valid[rows]
        for v, a in enumerate(arrays):
            block = np.asarray(a[rows], dtype=np.float32)
            if bad.any() and fallback is not None:
                block[bad] = fallback[np.flatnonzero(bad)]
            out[v] = torch.from_numpy(block).to(dtype)
        return out


def build_view_bank(
    source: ImageSource,
    backbone: Backbone,
    work_dir: str | Path | None,
    *,
    n_views: int = 2,
    seed: int = 0,
    spec: AugmentSpec = DEFAULT_SPEC,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    chunk_rows: int = 1024,
    progress: bool = True,
) -> ViewBank:
    """Compute (or load, or resume) ``n_views`` weak and ``n_views`` strong views of every image.

    Stored under ``<work_dir>/views-<key>/`` (see the module docstring); with
    ``work_dir=None`` the views are computed in memory and not kept.
    """
    if n_views < 1:
        raise InputError(f"the view bank needs at least 1 view of each kind, got n_views={n_views}")
    size = int(image_size or backbone.preprocess.size)
    if size < 1:
        raise InputError(f"view image size must be >= 1, got {size}")
    key = view_bank_key(source, backbone, image_size=size, spec=spec, seed=seed, precision=precision)
    root = None if work_dir is None else Path(work_dir) / f"views-{key}"
    weak: list[np.ndarray] = []
    strong: list[np.ndarray] = []
    valid = np.ones(len(source), dtype=bool)
    info: dict[str, Any] = {"key": key, "n_views": n_views, "image_size": size, "spec": dataclasses.asdict(spec),
                            "computed": [], "cached": [], "seconds": 0.0}
    for kind in KINDS:
        for v in range(n_views):
            vsrc = ViewSource(source, kind, v, seed, spec, dataclasses.replace(backbone.preprocess, size=size))
            vbb = ViewBackbone(backbone, size, f"{kind} view {v + 1}/{n_views}")
            fs = _view_entry(vsrc, vbb, None if root is None else root / f"{kind}-{v}", key=f"{key}/{kind}-{v}",
                             batch_size=batch_size, device=device, precision=precision, workers=workers,
                             chunk_rows=chunk_rows, progress=progress)
            (weak if kind == "weak" else strong).append(fs.features)
            valid &= fs.valid
            info["cached" if fs.from_cache else "computed"].append(f"{kind}-{v}")
            info["seconds"] += float(fs.seconds)
    info["seconds"] = round(info["seconds"], 3)
    return ViewBank(weak, strong, valid, root, info)


def _view_entry(source: ViewSource, backbone: ViewBackbone, entry: Path | None, *, key: str, **opts: Any):
    """One view as a feature-cache entry, with the locking / verification / resume of ``extract_features``."""
    return extract_to_entry(source, backbone, entry, key=key, **opts)  # entry None: in memory, no cache


# --------------------------------------------------------------------------- providers
class FeatureViews:
    """Feature vectors of weak / strong views of the fitted images, by position in the fit rows."""

    mode = "none"

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features  # (n, D) float32, the un-augmented features

    @property
    def device(self) -> torch.device:
        return self.features.device

    def sample(self, kind: str, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(len(idx), D) float32 features of one random ``kind`` view of each fit row in ``idx``."""
        return self.features[idx.to(self.features.device)]

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode}


class BankViews(FeatureViews):
    """Draws one of the V precomputed views per row (uniformly, from the given generator)."""

    mode = "bank"

    def __init__(self, features: torch.Tensor, weak: torch.Tensor, strong: torch.Tensor, info: dict) -> None:
        super().__init__(features)
        self.views = {"weak": weak, "strong": strong}  # (V, n, D) each, float16 in RAM
        self.info = info

    def sample(self, kind: str, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        bank = self.views[kind]
        v = torch.randint(0, bank.shape[0], (len(idx),), generator=generator)
        return bank[v, idx.cpu()].to(self.features.device, torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, **self.info}


class OnlineViews(FeatureViews):
    """A fresh view per call: read the images, augment them (batched, on the device), run the backbone."""

    mode = "online"

    def __init__(self, features: torch.Tensor, source: ImageSource, backbone: Backbone, rows: np.ndarray,
                 spec: AugmentSpec, image_size: int | None, precision: str = "fp32", chunk: int = 256) -> None:
        super().__init__(features)
        self.source, self.rows, self.spec, self.precision, self.chunk = source, np.asarray(rows), spec, precision, chunk
        size = int(image_size or backbone.preprocess.size)
        self.pre = dataclasses.replace(backbone.preprocess, size=size, resize=backbone.preprocess.resize)
        self.backbone = backbone.to(features.device).eval()
        self.batches = ImageBatches(source, self.rows, size, self.pre, None)

    def _images(self, idx: np.ndarray) -> torch.Tensor:
        # images that vanished since feature extraction are black: the batch keeps its shape
        return self.batches.uint8(idx, channels_last=True)[0]

    @torch.no_grad()
    def sample(self, kind: str, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dev = self.features.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        g = torch.Generator(device=dev).manual_seed(seed)  # augmentation runs on the device
        out = []
        idx_np = idx.cpu().numpy()
        for s in range(0, len(idx_np), self.chunk):
            x = augment(self._images(idx_np[s:s + self.chunk]).to(dev), kind, g, self.spec).float().div_(255.0)
            c = x.shape[1]  # normalise on the device, as Preprocess.to_tensor does on the CPU
            mean = torch.tensor(self.pre.mean[:c], device=dev).view(1, -1, 1, 1)
            std = torch.tensor(self.pre.std[:c], device=dev).view(1, -1, 1, 1)
            x = (x - mean) / std
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out.append(self.backbone(x).float())
        return torch.cat(out) if out else self.features[:0]

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "image_size": self.pre.size, "spec": dataclasses.asdict(self.spec)}


def make_feature_views(features: np.ndarray | torch.Tensor, ctx: Any, *, mode: str = "auto", n_views: int = 2,
                       image_size: int | None = None, spec: AugmentSpec = DEFAULT_SPEC,
                       device: torch.device | None = None) -> FeatureViews:
    """The view provider for a fit: ``mode`` in ``auto | bank | online | none`` (see module docstring).

    ``auto``: ``online`` on a GPU, ``bank`` on a CPU, ``none`` (with a warning) when the fit
    has no images (precomputed features). The views are backbone features, so the fitted
    features must be the backbone's own (no PCA).
    """
    if mode not in VIEW_MODES:
        raise InputError(f"views must be one of {', '.join(VIEW_MODES)}; got {mode!r}")
    dev = device or resolve_device(getattr(ctx, "device", "cpu"))
    x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(features, np.float32))
    x = x.to(dev)
    # ctx: a methods.base.FitContext (duck-typed: this lower layer does not import methods)
    source, backbone, rows = (getattr(ctx, key, None) for key in ("source", "backbone", "rows"))
    if mode == "none":
        return FeatureViews(x)
    if source is None or backbone is None or rows is None:
        if mode == "auto":
            warnings.warn("no images behind these features (precomputed features): training without augmented "
                          "views (views=none)", stacklevel=2)
            return FeatureViews(x)
        raise InputError(f"views={mode} needs the images (fit on a folder, archive or source, not on features)")
    if x.shape[1] != backbone.dim:
        raise InputError(f"augmented views are {backbone.dim}-d backbone features but the fitted features are "
                         f"{x.shape[1]}-d (PCA?); turn PCA off or use views=none")
    rows = np.asarray(rows)
    if image_size and int(image_size) != backbone.preprocess.size:
        warnings.warn(f"views at {image_size} px but the fitted features at {backbone.preprocess.size} px: the heads "
                      "train on one feature distribution and predict on another (set image_size for both)",
                      stacklevel=2)
    if mode == "auto":
        mode = "online" if dev.type == "cuda" else "bank"
    if mode == "online":
        return OnlineViews(x, source, backbone, rows, spec, image_size, getattr(ctx, "precision", "fp32"))
    bank = build_view_bank(source, backbone, getattr(ctx, "work_dir", None), n_views=n_views,
                           seed=getattr(ctx, "seed", 0), spec=spec, image_size=image_size,
                           batch_size=getattr(ctx, "batch_size", 64), device=str(dev),
                           precision=getattr(ctx, "precision", "fp32"), workers=getattr(ctx, "workers", None),
                           progress=getattr(ctx, "progress", True))
    fallback = x.cpu().numpy()
    return BankViews(x, bank.gather("weak", rows, fallback), bank.gather("strong", rows, fallback), bank.info)


# ---------------------------------------------------------------------------- contrastive view bank
CONTRASTIVE_BANK_FORMAT = 1


def contrastive_view_bank(features: np.ndarray, source: ImageSource, backbone: Backbone, rows: np.ndarray, *,
                          views: int, size: int, crop_scale: float, seed: int, work_dir: str | Path | None,
                          device: torch.device, workers: int | None = None, batch_size: int = 64,
                          progress: bool = True, desc: str = "view bank") -> tuple[np.ndarray, dict[str, Any]]:
    """(V, N, D) frozen-backbone features of ``views`` contrastive views (:func:`~imgclust.data.augment.
    contrastive_augment`: crop, flip, colour, blur) of every image, and a record of the cache.

    ICBPL's ``aug="views"`` bank; unlike :func:`build_view_bank` (SPICE's weak / strong views, one
    resumable feature-cache entry per view) it is one ``.npy`` file,
    ``<work_dir>/icbpl-views-<key>.npy``, written atomically and reused when its shape matches (the
    key hashes the backbone, size, views, crop scale, seed, source and rows). An image that no
    longer decodes gets its own ``features`` row in every view.
    """
    key = hashlib.sha256(json.dumps({
        "format": CONTRASTIVE_BANK_FORMAT, "backbone": backbone.cache_key(), "size": size, "views": views,
        "crop_scale": crop_scale, "seed": int(seed), "source": source.fingerprint(),
        "rows": hashlib.sha256(rows.tobytes()).hexdigest()}, sort_keys=True).encode()).hexdigest()[:24]
    path = None if work_dir is None else Path(work_dir) / f"icbpl-views-{key}.npy"
    if path is not None and path.is_file():
        try:
            bank = np.load(path, mmap_mode="r", allow_pickle=False)
            if bank.shape == (views, len(features), features.shape[1]) and bank.dtype == np.float32:
                return bank, {"path": str(path), "cache": "hit"}
        except (OSError, ValueError):
            pass
    bb = copy.deepcopy(backbone).to(device).eval()
    images = ImageBatches(source, rows, size, backbone.preprocess, workers)
    aug = contrastive_augment(size, 1 if images.pre.grayscale else 3, crop_scale)
    bank = np.zeros((views, len(features), features.shape[1]), np.float32)
    t0 = time.perf_counter()
    bar = progress_bar(views * len(rows), desc, unit="img", enable=progress)
    with ThreadPoolExecutor(max_workers=images.workers) as pool:
        for s in range(0, len(rows), batch_size):
            idx = np.arange(s, min(s + batch_size, len(rows)))
            img, ok = images.batch(idx, pool)
            for v in range(views):
                xa = seeded_augment(aug, img, int(seed) * 1_000_003 + v * 7919 + s)
                with torch.inference_mode():
                    f = bb(images.normalize(xa).to(device)).float().cpu().numpy()
                f[~ok] = features[idx[~ok]]  # an image that no longer decodes: its own features
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
    return bank, info
