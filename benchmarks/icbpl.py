#!/usr/bin/env python
"""ICBPL on CIFAR-10: clustering rows next to k-means, the loss ablation, and fine-tuning speed.

    python benchmarks/icbpl.py --shared ../shared --cache-dir /tmp/bench-cache
    python benchmarks/icbpl.py --shared ../shared --cache-dir /tmp/bench-cache --part finetune \
        --limit 300 --image-size 96

``--part cluster`` (default): on the cached backbone features of the split (extracted once if
missing; CIFAR-10 test with EfficientNet-Lite0 @ 224 takes ~5 minutes on 2 cores), k-means
and ICBPL in head mode with the loss combinations of the paper's Table 6 (Loss1 only,
Loss1 + Loss2, all four) and any ``--weights`` rows; every row trains on the same features
and neighbour sets. Prints ACC / NMI / ARI (mean +- std over seeds), seconds per epoch and
per run.

``--part finetune``: seconds per epoch and training throughput (images through forward and
backward per second; ICBPL runs 3 per training image: original, augmented view, one
neighbour) of ``finetune=head``, ``last_blocks`` and ``all`` on a seeded subset of ``--limit``
images at ``--image-size`` px, plus the time of one full re-encoding pass (what every
neighbour refresh and the final assignment cost).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imgclust.config import parse_options

ABLATION = [  # Table 6 of the paper; weights (MMD, augmentation, kNN, min-cosine)
    ("Loss1 (MMD)", (9.0, 0.0, 0.0, 0.0)),
    ("Loss1 + Loss2", (9.0, 1.0, 0.0, 0.0)),
    ("all four (default)", (9.0, 1.0, 2.0, 2.0)),
]


def weights_opts(w: tuple[float, ...]) -> dict:
    return dict(zip(("mmd_weight", "aug_weight", "knn_weight", "pedcc_weight"), w, strict=True))


def part_cluster(args: argparse.Namespace, source, extra: dict) -> None:
    from imgclust.backbones import build_backbone
    from imgclust.features import extract_features
    from imgclust.methods import FitContext, get_method
    from imgclust.metrics import evaluate

    fs = extract_features(source, build_backbone(args.backbone), cache_dir=args.cache_dir, progress=True)
    x = np.ascontiguousarray(fs.features[fs.valid], dtype=np.float32)
    y = np.asarray(source.labels)[fs.valid]
    rows = []
    plan = [("k-means", "kmeans", {})]
    if not args.only_extra:
        plan += [(f"ICBPL {n}", "icbpl", weights_opts(w)) for n, w in ABLATION]
    for w in args.weights:
        ws = tuple(float(v) for v in w.split(","))
        plan.append((f"ICBPL weights {w}", "icbpl", weights_opts(ws)))
    for name, method, opts in plan:
        res, secs, eps = [], [], []
        for seed in args.seeds:
            m = get_method(method)(args.k, {**opts, **(extra if method == "icbpl" else {})})
            t0 = time.perf_counter()
            m.fit(x, FitContext(seed=seed, progress=False, work_dir=fs.path, cache_dir=args.cache_dir))
            secs.append(time.perf_counter() - t0)
            res.append(evaluate(y, m.labels_))
            eps.append(m.history_.get("mean_epoch_s", float("nan")))
            empty = len(m.history_.get("empty_clusters", []))
            print(f"  {name} seed {seed}: ACC {res[-1]['acc']:.4f} ({secs[-1]:.0f} s, {empty} empty)",
                  file=sys.stderr, flush=True)
        arr = {k: np.array([r[k] for r in res]) for k in ("acc", "nmi", "ari")}
        rows.append((name, arr, float(np.mean(eps)), float(np.mean(secs))))

    def pm(v: np.ndarray) -> str:
        return f"{100 * v.mean():.2f} ± {100 * v.std():.2f}"

    print(f"\n{source.describe().get('name')} ({args.split}), {args.backbone}, N={len(x)}, K={args.k}, "
          f"seeds {args.seeds}, options {extra or 'defaults'}, torch threads {torch.get_num_threads()}\n")
    print("| row | ACC % | NMI % | ARI % | s/epoch | s/run |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, arr, ep, sec in rows:
        eps = "-" if not np.isfinite(ep) else f"{ep:.2f}"
        print(f"| {name} | {pm(arr['acc'])} | {pm(arr['nmi'])} | {pm(arr['ari'])} | {eps} | {sec:.0f} |")


def part_finetune(args: argparse.Namespace, source, extra: dict) -> None:
    from imgclust import ImageClusterer
    from imgclust.data.base import SubsetSource

    sub = SubsetSource.sample(source, args.limit, seed=0)
    print(f"\n{source.describe().get('name')} ({args.split}), {args.limit} images at {args.image_size} px, "
          f"{args.backbone}, {args.epochs} epochs, batch {args.batch_size}, torch threads {torch.get_num_threads()}\n")
    print("| finetune | trained params | s/epoch | train img/s (fwd+bwd) | images/epoch | "
          "re-encode pass s | ACC % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    from imgclust.metrics import evaluate

    for mode in args.modes:
        opts = {"finetune": mode, "epochs": args.epochs, "batch_size": args.batch_size, "refresh_every": 1,
                "image_size": args.image_size, **extra}
        est = ImageClusterer(n_clusters=args.k, method="icbpl", backbone=args.backbone, image_size=args.image_size,
                             cache_dir=args.cache_dir, method_options=opts, progress=False)
        t0 = time.perf_counter()
        est.fit(sub)
        total = time.perf_counter() - t0
        h = est.model_.history_
        ep = float(np.mean(h["epoch_s"]))
        steps = args.limit // min(args.batch_size, args.limit)
        per_epoch = 3 * steps * min(args.batch_size, args.limit) if mode != "head" else None
        ips = "-" if per_epoch is None else f"{per_epoch / ep:.1f}"
        # Everything outside the epochs: feature extraction (cached), neighbours, refresh + final passes.
        passes = args.epochs  # refresh_every=1: epochs - 1 refreshes + the final pass
        other = total - float(np.sum(h["epoch_s"])) - est.timings_["features_s"]
        enc = "-" if mode == "head" else f"{other / passes:.1f}"
        acc = evaluate(np.asarray(sub.labels), est.labels_)["acc"]
        print(f"| {mode} | {h.get('finetune_params', 0):,} | {ep:.2f} | {ips} | "
              f"{per_epoch or args.limit} | {enc} | {100 * acc:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("IMGCLUST_SHARED"), help="shared data dir")
    ap.add_argument("--source", default=None, help="image source (default: {shared}/data/cifar10-jpg.tar.gz)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--part", choices=("cluster", "finetune"), default="cluster")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--weights", action="append", default=[],
                    help="extra ICBPL row with weights 'mmd,aug,knn,min-cos', e.g. 1,9,2,2")
    ap.add_argument("--only-extra", action="store_true", help="cluster: skip the ablation rows (k-means + --weights)")
    ap.add_argument("--option", action="append", default=[], help="ICBPL option for every row, key=value")
    ap.add_argument("--limit", type=int, default=300, help="finetune: images in the subset")
    ap.add_argument("--image-size", type=int, default=96, help="finetune: input size")
    ap.add_argument("--epochs", type=int, default=2, help="finetune: epochs per mode")
    ap.add_argument("--batch-size", type=int, default=50, help="finetune: batch size")
    ap.add_argument("--modes", nargs="+", default=["head", "last_blocks", "all"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from imgclust.data import open_source

    src = args.source or (str(Path(args.shared) / "data" / "cifar10-jpg.tar.gz") if args.shared else None)
    if src is None:
        print("give --source or --shared", file=sys.stderr)
        return 2
    source = open_source(src, split=args.split)
    extra = parse_options(args.option)
    (part_cluster if args.part == "cluster" else part_finetune)(args, source, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
