#!/usr/bin/env python
"""Issue 17 (shared training loop): do temi / icce-heads / spice-self / icbpl give the same
clusters before and after their port onto :mod:`imgclust.train`? Fits each method with its
default options and a fixed seed on cached features, prints ACC / NMI / ARI per row and
saves the labels, so two checkouts can be compared label for label::

    PYTHONPATH=/path/to/old/src python benchmarks/train_port.py --out /tmp/before
    PYTHONPATH=src              python benchmarks/train_port.py --out /tmp/after --compare /tmp/before

``--source digits --backbone pixels --image-size 8`` runs on scikit-learn's digits instead of
CIFAR-10 test (the default: ``$IMGCLUST_SHARED/data/cifar10-jpg.tar.gz``, EfficientNet-Lite0
features from the cache). No checkpoint is written (no work directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=os.path.join(os.environ.get("IMGCLUST_SHARED", ""), "data/cifar10-jpg.tar.gz"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--methods", default="temi,icce-heads,spice-self,icbpl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, default=None, help="a previous --out: report label agreement")
    a = ap.parse_args(argv)
    from baselines import load
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from imgclust.methods import FitContext, get_method
    from imgclust.metrics import cluster_acc

    x, y, _ = load(a.source, a.split, a.backbone, a.image_size, os.environ.get("IMGCLUST_CACHE"))
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"{'method':12} {'ACC':>6} {'NMI':>6} {'ARI':>6} {'s':>7}  same labels as --compare", flush=True)
    for name in a.methods.split(","):
        t0 = time.perf_counter()
        m = get_method(name)(10, {}).fit(x, FitContext(seed=a.seed, progress=False))
        dt = time.perf_counter() - t0
        np.save(a.out / f"{name}.npy", m.labels_)
        same = ""
        if a.compare is not None and (a.compare / f"{name}.npy").is_file():
            same = str(bool((np.load(a.compare / f"{name}.npy") == m.labels_).all()))
        print(f"{name:12} {cluster_acc(y, m.labels_):6.4f} {normalized_mutual_info_score(y, m.labels_):6.4f} "
              f"{adjusted_rand_score(y, m.labels_):6.4f} {dt:7.1f}  {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
