"""int8 vs fp32 k-means ACC on the full CIFAR-10 test (issue 19, session 3).

Reads the fp32 and the OpenVINO int8 feature-cache entries of CIFAR-10 test (EfficientNet-Lite0
224 px) from /work/cache (read-only; an unfinished int8 entry: its flushed rows), runs the
``kmeans`` method (K = 10) on both with the given seeds and prints ACC, the difference and the
agreement of the two partitions. Fill the int8 entry first with
``imgclust cluster <cifar10-jpg.tar.gz> --split test -k 10 --engine openvino --precision int8 --method kmeans``.

    PYTHONPATH=src IMGCLUST_SHARED=/work/shared python benchmarks/int8_full_acc.py 0 [1 2]
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from numpy.lib.format import open_memmap


def kmeans_labels(x: np.ndarray, seed: int) -> np.ndarray:
    from imgclust.methods import FitContext, get_method

    m = get_method("kmeans")(10, None)
    m.fit(x, FitContext(seed=seed, progress=False))
    return np.asarray(m.labels_)


def main() -> None:
    from imgclust.backbones import build_backbone
    from imgclust.data import open_source
    from imgclust.features import cache_key
    from imgclust.metrics import cluster_acc

    src = open_source(os.environ.get("IMGCLUST_SHARED", "/work/shared") + "/data/cifar10-jpg.tar.gz", split="test")
    bb = build_backbone("efficientnet-lite0")
    root = os.environ.get("IMGCLUST_CACHE", "/work/cache") + "/features/"
    key = cache_key(src, bb)
    f32 = np.asarray(open_memmap(root + key + "/features.npy", mode="r"))
    ent = root + key + "-int8-openvino"
    try:
        with open(ent + "/meta.json") as f:
            done, status = int(json.load(f)["n"]), "complete"
    except OSError:
        with open(ent + "/progress.json") as f:
            done, status = int(json.load(f)["done"]), "partial"
    i8 = np.array(open_memmap(ent + "/features.npy", mode="r")[:done])
    y = np.asarray(src.labels)[:done]
    a = f32[:done]
    cos = (a * i8).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(i8, axis=1)
    print(f"{status}: {done} rows; feature cosine int8 vs fp32 min {cos.min():.3f} median {np.median(cos):.3f}")
    print("| seed | ACC fp32 | ACC int8 | delta (points) | agreement int8 vs fp32 clusters |\n|---|---:|---:|---:|---:|")
    for seed in [int(s) for s in sys.argv[1:]] or [0]:
        lf, li = kmeans_labels(a, seed), kmeans_labels(i8, seed)
        af, ai = cluster_acc(y, lf), cluster_acc(y, li)
        print(f"| {seed} | {100 * af:.2f} | {100 * ai:.2f} | {100 * (ai - af):+.2f} | {100 * cluster_acc(lf, li):.1f} % |",
              flush=True)


if __name__ == "__main__":
    main()
