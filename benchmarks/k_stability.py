"""K by the stability of UMAP + k-means across UMAP seeds (issue 23, a candidate signal; not in the rule).

For each K in a range: k-means (``--n-init`` restarts) on each seed's UMAP-10 embedding of the default's
input (signed square root, centred: ``umap-kmeans?power=0.5&centre=true``), then the mean and minimum
pairwise ARI between the seeds' labels (stability in the sense of Lange et al., Neural Computation 2004;
ARI is chance-corrected). ACC / NMI of seed 0's labels are printed when the source has labels. UMAP
embeddings are read from / written to the reduce cache beside the features, so a second call is cheap.

    PYTHONPATH=src IMGCLUST_CACHE=... python benchmarks/k_stability.py \\
        --source ../shared/data/cifar10-jpg.tar.gz --split train --seeds 5 [--json out.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="CIFAR tar, Fashion-MNIST folder, 'digits', ...")
    ap.add_argument("--split", default="train")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--cache-dir", default=os.environ.get("IMGCLUST_CACHE"))
    ap.add_argument("--seeds", type=int, default=3, help="UMAP seeds 0..S-1")
    ap.add_argument("--k-range", default="2:20")
    ap.add_argument("--n-init", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from baselines import load
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from imgclust.methods.manifold import embedding_input
    from imgclust.metrics import cluster_acc
    from imgclust.reduce import ReduceSpec, reduce_features

    x, y, work = load(args.source, args.split, args.backbone, args.image_size, args.cache_dir)
    has_y = y is not None and (np.asarray(y) >= 0).all()
    zin = embedding_input(x, 0.5, True)
    spec = ReduceSpec("umap", 10, n_neighbors=30, min_dist=0.0)
    zs = []
    for s in range(args.seeds):
        t0 = time.perf_counter()
        z, info = reduce_features(zin, spec, seed=s, cache_dir=work, progress=False)
        print(f"# UMAP seed {s}: cache {info.get('cache')}, {time.perf_counter() - t0:.0f} s", flush=True)
        zs.append(z)
    lo, hi = (int(v) for v in args.k_range.split(":"))
    rows = []
    print("| K | stability (mean pairwise ARI) | min ARI | ACC (seed 0) | NMI (seed 0) |\n|---:|---:|---:|---:|---:|")
    for k in range(lo, hi + 1):
        labs = [KMeans(k, n_init=args.n_init, random_state=s).fit_predict(z) for s, z in enumerate(zs)]
        a = [adjusted_rand_score(p, q) for p, q in itertools.combinations(labs, 2)] or [float("nan")]
        row = {"k": k, "stability": float(np.mean(a)), "min_ari": float(np.min(a))}
        if has_y:
            row.update(acc=float(cluster_acc(y, labs[0])), nmi=float(normalized_mutual_info_score(y, labs[0])))
        rows.append(row)
        print(f"| {k} | {row['stability']:.4f} | {row['min_ari']:.4f} | {row.get('acc', float('nan')):.4f} | "
              f"{row.get('nmi', float('nan')):.4f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
