#!/usr/bin/env python
"""Self-supervised pre-training on CPU, then clustering on the learned features vs pixels vs EfficientNet-Lite0.

    OMP_NUM_THREADS=1 python benchmarks/pretrain.py --shared ../shared --cache-dir /tmp/bench-cache \
        --n 2000 --epochs 3 --out /tmp/pt-bench/simclr-r18

Trains ``--method`` (default SimCLR) ``--arch`` (default ResNet-18, small-image stem) at 32 px on
a seeded random subset of ``--n`` CIFAR-10 *train* images (``open_source(tar, split="train")``
then ``SubsetSource.sample``), reusing/resuming ``--out``; then clusters the SAME images with
k-means and ICCE stage 1 (``icce-heads``, ``--icce-epochs``) on three feature sets: raw pixels
(32 px), the pre-trained encoder (``--backbone OUT``), and EfficientNet-Lite0 (ImageNet) at
``--effnet-size`` px (96 by default, to keep extraction cheap on CPU; 224 is its native size).
Prints the training history (loss, alignment, uniformity, kNN accuracy, images/s per training
step, wall and per CPU-second of the process — the second is what one dedicated core gives on a
shared machine) and a markdown table of ACC / NMI / ARI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--shared", default=os.environ.get("IMGCLUST_SHARED", "../shared"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--warmup-epochs", type=int, default=0)
    ap.add_argument("--out", default="runs/pretrain-bench")
    ap.add_argument("--effnet-size", type=int, default=96)
    ap.add_argument("--icce-epochs", type=int, default=30)
    ap.add_argument("--no-icce", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from imgclust import ImageClusterer
    from imgclust.data import open_source
    from imgclust.data.base import SubsetSource
    from imgclust.metrics import evaluate
    from imgclust.pretrain import PretrainConfig, pretrain

    src = SubsetSource.sample(open_source(Path(a.shared) / "data" / "cifar10-jpg.tar.gz", split="train"), a.n, seed=0)
    cfg = PretrainConfig(method=a.method, arch=a.arch, image_size=32, epochs=a.epochs, batch_size=a.batch_size,
                         warmup_epochs=a.warmup_epochs)
    t0 = time.perf_counter()
    summary = pretrain(src, a.out, cfg, device="cpu", progress=False)
    t_pre = time.perf_counter() - t0
    print(f"## {a.method} {a.arch} on {len(src)} CIFAR-10 train images, 32 px, batch {a.batch_size}, "
          f"{a.epochs} epochs ({t_pre:.0f} s in this call)\n")
    print("| epoch | loss | alignment | uniformity | kNN acc (k=20) | images/s (wall) | images per CPU-second |")
    print("|---|---|---|---|---|---|---|")
    for h in summary["history"]:
        loss = f"{h['loss']:.3f}" if "loss" in h else "-"
        ips = f"{h['images_per_s']:.1f}" if "images_per_s" in h else "-"
        cps = f"{h['images_per_cpu_s']:.1f}" if "images_per_cpu_s" in h else "-"
        print(f"| {h['epoch']} | {loss} | {h['alignment']:.3f} | {h['uniformity']:.3f} | "
              f"{h.get('knn_acc', float('nan')):.3f} | {ips} | {cps} |")
    print()

    feats = [("pixels (32 px)", "pixels", 32), (f"pretrained {a.method} {a.arch} (32 px)", str(Path(a.out).resolve()), None),
             (f"efficientnet-lite0 ImageNet ({a.effnet_size} px)", "efficientnet-lite0", a.effnet_size)]
    methods = [("kmeans", {})] + ([] if a.no_icce else [("icce-heads", {"epochs": a.icce_epochs})])
    print("| features | method | ACC | NMI | ARI | seconds |")
    print("|---|---|---|---|---|---|")
    for label, bb, size in feats:
        for m, opts in methods:
            t0 = time.perf_counter()
            est = ImageClusterer(n_clusters=10, method=m, backbone=bb, image_size=size, method_options=opts,
                                 cache_dir=a.cache_dir, device="cpu", progress=False, workers=1)
            pred = est.fit_predict(src)
            r = evaluate(src.labels, pred)
            print(f"| {label} | {m} | {r['acc']:.4f} | {r['nmi']:.4f} | {r['ari']:.4f} | {time.perf_counter() - t0:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
