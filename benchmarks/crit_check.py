#!/usr/bin/env python
"""Which label-free criterion ranks the default's candidates right? (issue 18)

Fits k-means, spectral-kmeans and UMAP-on-64-PCs + k-means (1 seed, and 3 seeds combined by
consensus), all without self-training, on one split's cached features, and prints each
labelling's ACC next to its `generalization`, `knn` and `balanced` scores
(:mod:`imgclust.select`) and Spearman(criterion, ACC) over the candidates. Labels are used
only for the ACC column, never by a candidate or a criterion.

    python benchmarks/crit_check.py --source $IMGCLUST_SHARED/data/cifar10-jpg.tar.gz --split test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CANDIDATES = [("kmeans", "kmeans", {}),
              ("spectral-kmeans", "spectral-kmeans", {"self_train": False}),
              ("umap64", "umap-kmeans", {"pca": 64, "self_train": False}),
              ("umap64 r3 consensus", "umap-kmeans", {"pca": 64, "runs": 3, "self_train": False})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=os.environ.get("IMGCLUST_CACHE"))
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from baselines import load
    from scipy.stats import spearmanr

    from imgclust.methods import FitContext, get_method
    from imgclust.metrics import cluster_acc
    from imgclust.select import generalization_score, knn_score

    x, y, work = load(args.source, args.split, args.backbone, args.image_size, args.cache_dir)
    ctx = FitContext(seed=args.seed, progress=False, work_dir=work)
    rows = []
    print("| candidate | ACC | generalization | knn | balanced | s |\n|---|---:|---:|---:|---:|---:|")
    for name, method, opts in CANDIDATES:
        t0 = time.perf_counter()
        lab = get_method(method)(args.k, opts).fit(x, ctx).labels_
        gen, knn = generalization_score(x, lab, seed=0), knn_score(x, lab)
        rows.append((float(cluster_acc(y, lab)), gen, knn, (gen + knn) / 2))
        print(f"| {name} | {rows[-1][0]:.4f} | {gen:.4f} | {knn:.4f} | {rows[-1][3]:.4f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    acc = [r[0] for r in rows]
    for i, crit in enumerate(("generalization", "knn", "balanced"), start=1):
        print(f"Spearman({crit}, ACC) = {spearmanr([r[i] for r in rows], acc).statistic:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
