"""PICI and CC trained from scratch on a CPU-sized set: metrics after each stage and throughput.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pici.py --data digits --image-size 16 \
        --pretrain 5 --train 15 --boost 5 --cc-epochs 20

``--data digits`` = sklearn's 1,797 8x8 digits (upscaled to ``--image-size``);
``--data cifar10`` = the first ``--subset`` images of the CIFAR-10 test split from
``$IMGCLUST_SHARED/data/cifar10-jpg.tar.gz`` (``--shared``). Prints one markdown row per
(method, stage): ACC / NMI / ARI of the cluster head (argmax G_C) and of k-means on the
encoder features, mean loss terms of the stage's last epoch, and training images/s (two views
each, forward + backward, one thread).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from imgclust.methods import FitContext, get_method


def load(data: str, subset: int, shared: str | None) -> tuple[object, np.ndarray]:
    if data == "digits":
        from sklearn.datasets import load_digits

        from imgclust.data.base import ArraySource

        d = load_digits()
        n = min(subset, len(d.target))
        return ArraySource((d.images[:n] * (255 / 16)).astype(np.uint8), d.target[:n], name="digits"), d.target[:n]
    from imgclust.data import open_source

    root = shared or os.environ.get("IMGCLUST_SHARED", "../shared")
    src = open_source(os.path.join(root, "data", "cifar10-jpg.tar.gz"), split="test")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(src), size=min(subset, len(src)), replace=False))
    y = np.asarray(src.labels)[rows]
    return (src, rows), y


def run(name: str, opts: dict, data: object, y: np.ndarray, work_dir: str) -> tuple[object, float]:
    src, rows = data if isinstance(data, tuple) else (data, np.arange(len(y)))
    m = get_method(name)(10, opts)
    ctx = FitContext(seed=0, progress=False, work_dir=work_dir, source=src, rows=rows, truth=y)
    t0 = time.perf_counter()
    m.fit(np.zeros((len(rows), 1), np.float32), ctx)
    return m, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=("digits", "cifar10"), default="digits")
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--shared", default=None)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--vit-size", default="tiny")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--decoder-dim", type=int, default=64)
    ap.add_argument("--decoder-depth", type=int, default=1)
    ap.add_argument("--pretrain", type=int, default=5)
    ap.add_argument("--train", type=int, default=15)
    ap.add_argument("--boost", type=int, default=5)
    ap.add_argument("--cc-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--projector-bn", action="store_true", help="BatchNorm in the projectors (pici and cc)")
    ap.add_argument("--crop-scale", type=float, default=0.2)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load(args.data, args.subset, args.shared)
    y = data[1]
    work = args.work_dir or tempfile.mkdtemp(prefix="pici-bench-")
    pici_opts = {"image_size": args.image_size, "vit_size": args.vit_size, "depth": args.depth,
                 "decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth, "decoder_heads": 4,
                 "pretrain_epochs": args.pretrain, "train_epochs": args.train, "boost_epochs": args.boost,
                 "batch_size": args.batch_size, "lr": args.lr, "projector_bn": args.projector_bn,
                 "crop_scale": args.crop_scale}
    cc_opts = {"image_size": args.image_size, "epochs": args.cc_epochs, "batch_size": args.batch_size, "lr": args.lr,
               "projector_bn": args.projector_bn, "crop_scale": args.crop_scale}
    print(f"data={args.data} n={len(y)} image_size={args.image_size} work_dir={work}\n")
    print("| method | stage | epochs | head ACC | head NMI | head ARI | k-means ACC | k-means NMI | last-epoch losses "
          "| train img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, opts in (("pici", pici_opts), ("cc", cc_opts)):
        if name == "cc" and args.cc_epochs == 0:
            continue
        m, secs = run(name, opts, data[0], y, work)
        for stage, h in m.history_["stages"].items():
            if not h["epochs_run"]:
                continue
            met = h.get("metrics", {})
            head, km = met.get("head", {}), met.get("kmeans", {})
            losses = ", ".join(f"{k}={v[-1]:.3f}" for k, v in h.items()
                               if isinstance(v, list) and k != "images_per_s")
            ips = float(np.median(h["images_per_s"]))
            print(f"| {name} | {stage} | {h['epochs_run']} | {head.get('acc', float('nan')):.3f} | "
                  f"{head.get('nmi', float('nan')):.3f} | {head.get('ari', float('nan')):.3f} | "
                  f"{km.get('acc', float('nan')):.3f} | {km.get('nmi', float('nan')):.3f} | {losses} | {ips:.0f} |")
        print(f"<!-- {name}: {secs:.0f} s, {m.history_['parameters']:,} parameters -->")


if __name__ == "__main__":
    main()
