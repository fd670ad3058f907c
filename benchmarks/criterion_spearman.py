#!/usr/bin/env python
"""Can the label-free criterion be trusted? Spearman(criterion, ACC) on the FIT split (issue 18 item 4).

Reads every saved labelling of the fit split (``baselines.py --save-labels DIR`` writes
``<row>_s<seed>.npy``; ``manifold_variants.py --json`` lines are added with ``--variants``),
scores each with the criteria of :mod:`imgclust.select` (``generalization``, ``knn``,
``balanced``) — no labels — and with its ACC/NMI against the fit split's labels, then prints
the Spearman rank correlation of each criterion with ACC over all labellings. Labels of the
fit (train) split may choose the criterion; the test split is never read here.

    python benchmarks/criterion_spearman.py --source $IMGCLUST_SHARED/data/cifar10-jpg.tar.gz --split train \
        --labels /work/bench/18c/labels_c10 --variants /work/bench/18c/variants_c10train.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--backbone-option", action="append", default=[])
    ap.add_argument("--labels", type=Path, required=True, help="folder of <name>.npy fit-split labellings")
    ap.add_argument("--variants", type=Path, default=None, help="manifold_variants.py --json output (scores reused)")
    ap.add_argument("--graph-cache", type=Path, default=None)
    ap.add_argument("--cache-dir", default=os.environ.get("IMGCLUST_CACHE"))
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from baselines import load
    from scipy.stats import spearmanr
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from imgclust.config import parse_options
    from imgclust.metrics import cluster_acc
    from imgclust.select import generalization_score, knn_graph, knn_score

    x, y, _ = load(args.source, args.split, args.backbone, args.image_size, args.cache_dir,
                   parse_options(args.backbone_option, "--backbone-option"))
    if args.graph_cache is not None and args.graph_cache.is_file():
        graph = np.load(args.graph_cache)
    else:
        graph = knn_graph(x, k_nn=20)[0]
        if args.graph_cache is not None:
            np.save(args.graph_cache, graph)
    rows = []
    print("| labelling | fit-split ACC | fit-split NMI | generalization | knn | balanced |\n|---|---:|---:|---:|---:|---:|")
    for p in sorted(args.labels.glob("*.npy")):
        lab = np.load(p)
        if len(lab) != len(y):
            continue
        gen, knn = generalization_score(x, lab, seed=0), knn_score(None, lab, graph=[graph])
        rows.append({"name": p.stem, "acc": float(cluster_acc(y, lab)), "nmi": float(nmi(y, lab)),
                     "generalization": gen, "knn": knn, "balanced": (gen + knn) / 2})
    if args.variants is not None and args.variants.is_file():
        for line in args.variants.read_text().splitlines():
            r = json.loads(line)
            rows.append({"name": f"variant {r['variant']} s{r['seed']}", **{k: r[k] for k in
                         ("acc", "nmi", "generalization", "knn", "balanced")}})
    for r in rows:
        print(f"| {r['name']} | {r['acc']:.4f} | {r['nmi']:.4f} | {r['generalization']:.4f} | {r['knn']:.4f} | "
              f"{r['balanced']:.4f} |")
    if len(rows) >= 3:
        print()
        for c in ("generalization", "knn", "balanced"):
            rho = spearmanr([r[c] for r in rows], [r["acc"] for r in rows]).statistic
            print(f"Spearman({c}, fit-split ACC) over {len(rows)} labellings: {rho:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
