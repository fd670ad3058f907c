#!/usr/bin/env python
"""End-to-end feature-extraction speed (decode included): bare PyTorch loops vs imgclust's
engines, measured interleaved, plus the effect of bf16/int8 on k-means ACC.

    python benchmarks/extract_speed.py --cifar /path/cifar10-jpg.tar.gz            # defaults below
    python benchmarks/extract_speed.py --cifar ... --n-cifar 2000 --n-large 500 --budget-s 480

Data: (a) ``--n-cifar`` CIFAR-10 test JPEGs (evenly spaced over the split) at 224 px;
(b) ``--n-large`` large JPEG photos (2000-2800 px wide, 4:3) built once into ``--large-dir``
from scikit-image's bundled sample photos with random crops, flips, resizes and mild noise.

Contestants (EfficientNet-Lite0, ``--threads`` threads each):

* ``bare torch fp32`` / ``bare torch bf16``: the loop everyone writes - decode each image in
  turn with Pillow (full decode), resize, normalise, channels_last, ``model(x)`` (bf16:
  ``torch.autocast``). On (b) the fp32 one is the "naive full-decode loop".
* ``imgclust <engine> <precision>``: imgclust's producer path exactly as ``extract_features``
  runs it (``engines.pipeline``: decode pool with bounded prefetch, JPEG draft mode, the
  engine); ``imgclust default`` is ``--engine auto --precision fp32``.

Interleaving: the images are cut into chunks of ``--chunk``; every round each contestant
processes the next chunk (the same images for all), in a rotated order, until
``--budget-s`` is spent. Throughput = images / seconds summed over the rounds, so a load
spike from other processes hits every contestant alike; ratios are the figure of merit.
Setup (model conversion, compilation, int8 calibration) is timed separately: it is paid
once per backbone and cached.

ACC (``--acc-n`` images of (a)'s subset, 0 to skip): features from OpenVINO fp32, OpenVINO
int8, ONNX Runtime int8 (and bf16 where the CPU has it) on the same decoded batches; k-means
(K=10, spherical, n_init=10, seed 0), Hungarian ACC against the labels (labels only score,
nothing is tuned on them), agreement with the fp32 clusters, feature cosine to fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclust.backbones import build_backbone
from imgclust.data import open_source
from imgclust.data.base import SubsetSource
from imgclust.engines.pipeline import make_engine, make_loader, prefetched
from imgclust.errors import BadImageError

BATCH = 64


def build_large(out: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG photos >= 2000 x 1500 made from skimage's bundled colour photos (idempotent)."""
    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.jpg"))) >= n:
        return out
    import skimage.data as sd

    bases = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "cat", "colorwheel", "skin", "lily"):
        try:
            a = np.asarray(getattr(sd, name)())
        except Exception:  # noqa: BLE001 - not bundled in this version (would need a download)
            continue
        if a.ndim == 3 and a.shape[2] >= 3:
            bases.append(np.ascontiguousarray(a[:, :, :3].astype(np.uint8)))
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = out / f"photo_{i:04d}.jpg"
        if p.exists():
            continue
        a = bases[i % len(bases)]
        h, w = a.shape[:2]
        f = rng.uniform(0.55, 1.0)
        ch, cw = max(16, int(h * f)), max(16, int(w * f))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        a = a[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            a = a[:, ::-1]
        if rng.random() < 0.3:
            a = a[::-1]
        W = int(rng.integers(2000, 2801))
        H = W * 3 // 4
        img = Image.fromarray(np.ascontiguousarray(a)).resize((W, H), Image.Resampling.BILINEAR)
        # Mild grain (a tiled 256 px patch, cheap): upscaled sample photos are too smooth to decode like real ones.
        grain = np.tile(rng.integers(-6, 7, (256, 256, 1), dtype=np.int16), (H // 256 + 1, W // 256 + 1, 1))[:H, :W]
        Image.fromarray(np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8)).save(p, quality=90)
    return out


class Bare:
    """The plain loop: serial full decode + resize, then the eager model."""

    def __init__(self, bb, precision: str, source) -> None:
        self.name = f"bare torch {precision}"
        self.source, self.pre, self.precision = source, bb.preprocess, precision
        self.model = bb.eval().to(memory_format=torch.channels_last)
        self.setup_s = 0.0

    def run(self, idx: list[int]) -> np.ndarray:
        outs = []
        for s in range(0, len(idx), BATCH):
            imgs = []
            for i in idx[s:s + BATCH]:
                path = self.source.path(i)
                if path:  # a file: the textbook Pillow lines
                    with Image.open(path) as im:
                        imgs.append(np.asarray(im.convert("RGB").resize((self.pre.size,) * 2, Image.Resampling.BICUBIC)))
                else:  # an archive member: full decode, then the same resize
                    imgs.append(self.pre.resize_image(self.source.read(i)))
            x = self.pre.to_tensor(np.stack(imgs)).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                outs.append(self.model(x).float().numpy())
        return np.concatenate(outs)


class Imgclust:
    """imgclust's producer path (the code extract_features runs), engine built once."""

    def __init__(self, bb, engine: str, precision: str, source, cache: Path, workers: int, label: str = "") -> None:
        self.name = label or f"imgclust {engine} {precision}"
        self.load = make_loader(source, bb.preprocess)
        t = time.perf_counter()
        self.engine = make_engine(source, bb, self.load, engine=engine, precision=precision,
                                  device=torch.device("cpu"), cache_root=cache, rows=10**9)
        self.setup_s = time.perf_counter() - t
        self.name += f" [{self.engine.name}/{self.engine.effective_precision}]" if engine == "auto" else ""
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def run(self, idx: list[int]) -> np.ndarray:
        outs = []
        batches = [idx[s:s + BATCH] for s in range(0, len(idx), BATCH)]
        for _, imgs in prefetched(self.pool, self.load, batches):
            good = [im for im in imgs if not isinstance(im, BadImageError)]
            outs.append(self.engine(np.stack(good)))
        return np.concatenate(outs)


def interleaved(contestants: list, n: int, chunk: int, budget_s: float) -> dict[str, tuple[int, float]]:
    done = {c.name: [0, 0.0] for c in contestants}
    t_start = time.perf_counter()
    for r, s in enumerate(range(0, n, chunk)):
        idx = list(range(s, min(s + chunk, n)))
        order = contestants[r % len(contestants):] + contestants[:r % len(contestants)]  # rotated
        for c in order:
            part = idx[:max(1, round(len(idx) * getattr(c, "share", 1.0)))]
            t = time.perf_counter()
            c.run(part)
            done[c.name][0] += len(part)
            done[c.name][1] += time.perf_counter() - t
        el = time.perf_counter() - t_start
        print(f"  round {r + 1}: {s + len(idx)} images each, {el:.0f} s elapsed, load {os.getloadavg()[0]:.1f}", flush=True)
        if el > budget_s:
            break
    return {k: (v[0], v[1]) for k, v in done.items()}


def table(title: str, res: dict, ref: str, setup: dict) -> None:
    print(f"\n{title}")
    print(f"{'contestant':52s} {'images':>7s} {'img/s':>8s} {'x ' + ref[:20]:>24s} {'setup s':>8s}")
    base = res[ref][0] / res[ref][1]
    for k, (n, s) in res.items():
        ips = n / s
        print(f"{k:52s} {n:7d} {ips:8.2f} {ips / base:24.2f} {setup.get(k, 0.0):8.1f}")


def acc_of(feats: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, np.ndarray]:
    from imgclust.methods.base import FitContext
    from imgclust.methods.kmeans import KMeans
    from imgclust.metrics import cluster_acc

    km = KMeans(10, {"n_init": 10})
    km.fit(feats, FitContext(seed=seed, device="cpu", progress=False, work_dir=None))
    return float(cluster_acc(y, km.labels_)), km.labels_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", default=os.environ.get("IMGCLUST_SHARED", "/nonexistent") + "/data/cifar10-jpg.tar.gz")
    ap.add_argument("--n-cifar", type=int, default=2000)
    ap.add_argument("--n-large", type=int, default=500)
    ap.add_argument("--large-dir", type=Path, default=Path(tempfile.gettempdir()) / "imgclust-large-photos")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=480.0, help="per data set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--acc-n", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=None, help="compiled-model cache (default: $IMGCLUST_CACHE)")
    ap.add_argument("--only", choices=("a", "b", "acc"), action="append")
    ap.add_argument("--bf16-share", type=float, default=1.0, help="(a): share of each chunk the bare bf16 loop runs")
    ap.add_argument("--full-b", action="store_true", help="(b): also imgclust torch fp32 and openvino int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from imgclust.features import default_cache_dir

    cache = args.cache or default_cache_dir()
    only = set(args.only or ("a", "b", "acc"))
    print(f"# extract_speed: {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}, "
          f"load {os.getloadavg()}", flush=True)
    bb = build_backbone("efficientnet-lite0")
    cifar = open_source(args.cifar, split="test") if {"a", "acc"} & only else None

    if "a" in only:
        src = SubsetSource(cifar, np.linspace(0, len(cifar) - 1, args.n_cifar).round().astype(int))
        slow = Bare(bb, "bf16", src)
        # bf16 autocast without native bf16 (AVX2-only CPUs) is emulated and many times slower:
        # it takes the first --bf16-share of every chunk so a round stays short (still interleaved).
        slow.share = args.bf16_share
        cs = [Bare(bb, "fp32", src), slow,
              Imgclust(bb, "auto", "fp32", src, cache, args.threads, "imgclust default"),
              Imgclust(bb, "torch", "fp32", src, cache, args.threads)]
        for eng in ("openvino", "onnxruntime"):
            for prec in ("fp32", "bf16", "int8") if eng == "openvino" else ("fp32", "int8"):
                cs.append(Imgclust(bb, eng, prec, src, cache, args.threads))
        setup = {c.name: c.setup_s for c in cs}
        res = interleaved(cs, len(src), args.chunk, args.budget_s)
        table(f"(a) CIFAR-10 test JPEGs (32 px) -> 224 px, {len(src)} images, load {os.getloadavg()[0]:.1f}",
              res, "bare torch fp32", setup)
        b16 = res["bare torch bf16"][0] / res["bare torch bf16"][1]
        d = next(k for k in res if k.startswith("imgclust default"))
        print(f"imgclust default / bare bf16: {res[d][0] / res[d][1] / b16:.2f}")
    if "b" in only:
        large = build_large(args.large_dir, args.n_large)
        src = open_source(str(large))
        cs = [Bare(bb, "fp32", src), Imgclust(bb, "auto", "fp32", src, cache, args.threads, "imgclust default")]
        if args.full_b:  # where the (b) speed-up comes from: draft decode + pool alone, and int8
            cs += [Imgclust(bb, "torch", "fp32", src, cache, args.threads),
                   Imgclust(bb, "openvino", "int8", src, cache, args.threads)]
        setup = {c.name: c.setup_s for c in cs}
        res = interleaved(cs, len(src), max(16, args.chunk // 4), args.budget_s)
        table(f"(b) large JPEG photos (2000-2800 px), {len(src)} images, load {os.getloadavg()[0]:.1f}",
              res, "bare torch fp32", setup)
    if "acc" in only and args.acc_n:
        # Engines are built (int8: calibrated) on the --n-cifar subset, as in (a), so the cached
        # quantised models are reused; ACC is scored on --acc-n images of it, decoded once.
        src = SubsetSource(cifar, np.linspace(0, len(cifar) - 1, args.n_cifar).round().astype(int))
        rows = np.linspace(0, len(src) - 1, min(args.acc_n, len(src))).round().astype(int)
        y = np.asarray(src.labels)[rows]
        pairs = [("openvino", "fp32"), ("openvino", "int8"), ("onnxruntime", "int8")]
        import openvino as ov

        if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # else bf16 runs fp32 here
            pairs.append(("openvino", "bf16"))
        runners = [Imgclust(bb, e, p, src, cache, args.threads) for e, p in pairs]
        feats = {r.name: [] for r in runners}
        t = time.perf_counter()
        for s in range(0, len(rows), BATCH):
            batch = np.stack([runners[0].load(int(i)) for i in rows[s:s + BATCH]])
            for r in runners:
                feats[r.name].append(r.engine(batch))
        print(f"  ACC features: {time.perf_counter() - t:.0f} s", flush=True)
        feats = {k: np.concatenate(v) for k, v in feats.items()}
        ref_name = runners[0].name
        ref = feats[ref_name]
        ref_labels = None
        print(f"\nk-means ACC on {len(rows)} CIFAR-10 test images (K=10, spherical, n_init=10, seed 0)")
        print(f"{'engine/precision':32s} {'ACC':>7s} {'agree fp32':>10s} {'min cos':>8s} {'median cos':>10s}")
        from imgclust.metrics import cluster_acc

        for name, f in feats.items():
            cos = (f * ref).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref, axis=1)
            acc, labels = acc_of(f, y)
            ref_labels = labels if ref_labels is None else ref_labels
            agree = cluster_acc(ref_labels, labels)  # Hungarian-matched agreement with the fp32 clusters
            print(f"{name:32s} {100 * acc:7.2f} {100 * agree:10.2f} {cos.min():8.5f} {np.median(cos):10.5f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
