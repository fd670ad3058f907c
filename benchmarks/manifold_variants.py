#!/usr/bin/env python
"""Which UMAP + k-means variant? Chosen on the TRAIN split (issue 18, session 3).

Every variant is fitted on the fit split's cached features (CIFAR-10: the 50k train
images) and scored *transductively on that same split* (train labels may choose designs;
the test labels only report the chosen one, with ``benchmarks/baselines.py``). For each
variant the table also gives the label-free criteria of :mod:`imgclust.select`
(``generalization``, ``knn``, ``balanced``) and, at the end, Spearman(criterion, train ACC)
over all variants run — the evidence for the default criterion of ``auto``.

UMAP embeddings are read from / written to the reduce cache (``reduced-*.npy`` in the
feature-cache entry), so re-running a variant costs only its clustering/self-training.

    python benchmarks/manifold_variants.py --source $IMGCLUST_SHARED/data/cifar10-jpg.tar.gz \
        --split train --variants km,u30r1,u30r3,u30r3-st,u30r3-conf-st
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# name -> (UMAP n_neighbors, runs, pca dims, clusterer, post-processing); post: none | st | conf-st | knn
VARIANTS: dict[str, dict] = {
    "km": {"base": "kmeans"},
    "u30r1": {"nn": 30, "runs": 1},
    "u30r1-gmm": {"nn": 30, "runs": 1, "clusterer": "gmm"},
    "u30r3": {"nn": 30, "runs": 3},
    "u30r5": {"nn": 30, "runs": 5},
    "u30r3-st": {"nn": 30, "runs": 3, "post": "st"},  # the current default's large candidate
    "u30r3-conf-st": {"nn": 30, "runs": 3, "post": "conf-st"},
    "u30r5-conf-st": {"nn": 30, "runs": 5, "post": "conf-st"},
    "u30r3-knn": {"nn": 30, "runs": 3, "post": "knn"},
    "u15r1": {"nn": 15, "runs": 1},
    "u50r1": {"nn": 50, "runs": 1},
    "u100r1": {"nn": 100, "runs": 1},
    "u50r3": {"nn": 50, "runs": 3},
    "u100r3": {"nn": 100, "runs": 3},
    "u50r3-conf-st": {"nn": 50, "runs": 3, "post": "conf-st"},
    "u100r3-conf-st": {"nn": 100, "runs": 3, "post": "conf-st"},
    "u30r1-p128": {"nn": 30, "runs": 1, "pca": 128},
    "u30r1-d64": {"nn": 30, "runs": 1, "dim": 64},
    # session 4: UMAP on the full-width features (pca 0), the exact embedding
    "f30r1": {"nn": 30, "runs": 1, "pca": 0},
    "f30r3": {"nn": 30, "runs": 3, "pca": 0},
    "f30r3-st": {"nn": 30, "runs": 3, "pca": 0, "post": "st"},
    "f30r3-conf-st": {"nn": 30, "runs": 3, "pca": 0, "post": "conf-st"},
    "f30r1-st": {"nn": 30, "runs": 1, "pca": 0, "post": "st"},
    # session 6-7: the default's UMAP input, sign(x) sqrt|x| centred (manifold.embedding_input), full width;
    # -gmm: N2D's clusterer (n_init 1 / 5); -mixN: the consensus also takes N k-means runs on the features
    # (raw: as they are, sqrt: the same input as the UMAP), i.e. an ensemble across the two kinds of candidate
    "s30r1": {"nn": 30, "runs": 1, "pca": 0, "input": "sqrt"},
    "s30r1-gmm": {"nn": 30, "runs": 1, "pca": 0, "input": "sqrt", "clusterer": "gmm", "n_init": 1},
    "s30r1-gmm5": {"nn": 30, "runs": 1, "pca": 0, "input": "sqrt", "clusterer": "gmm", "n_init": 5},
    "s30r3": {"nn": 30, "runs": 3, "pca": 0, "input": "sqrt"},
    "s30r3-mix2": {"nn": 30, "runs": 3, "pca": 0, "input": "sqrt", "mix": {"raw": 2}},
    "s30r3-mix2s": {"nn": 30, "runs": 3, "pca": 0, "input": "sqrt", "mix": {"sqrt": 2}},
    "s30r3-mix4": {"nn": 30, "runs": 3, "pca": 0, "input": "sqrt", "mix": {"raw": 2, "sqrt": 2}},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--backbone-option", action="append", default=[])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="km,u30r1,u30r3,u30r3-st,u30r3-conf-st")
    ap.add_argument("--cache-dir", default=os.environ.get("IMGCLUST_CACHE"))
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per variant")
    ap.add_argument("--graph-cache", type=Path, default=None,
                    help=".npy for the 20-NN graph of the features (computed once, reused by every variant/run)")
    ap.add_argument("--save-labels", type=Path, default=None,
                    help="folder: every variant's labels as variant-<name>_s<seed>.npy (criterion_spearman.py)")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from baselines import load
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from imgclust.config import parse_options
    from imgclust.consensus import consensus
    from imgclust.methods import FitContext, get_method
    from imgclust.methods.manifold import cluster_embedding, embedding_input, pca_project
    from imgclust.metrics import cluster_acc
    from imgclust.reduce import ReduceSpec, reduce_features
    from imgclust.refine.confident import confident_self_train
    from imgclust.select import generalization_score, knn_graph, knn_score

    x, y, work = load(args.source, args.split, args.backbone, args.image_size, args.cache_dir,
                      parse_options(args.backbone_option, "--backbone-option"))
    k, seed = args.k, args.seed
    if args.graph_cache is not None and args.graph_cache.is_file():
        graph = np.load(args.graph_cache)
    else:
        graph = knn_graph(x, k_nn=20)[0]
        if args.graph_cache is not None:
            np.save(args.graph_cache, graph)
    pcs: dict[tuple, np.ndarray] = {}
    inputs = {"raw": lambda: x, "sqrt": lambda: embedding_input(x, 0.5, True)}
    rows = []
    print("| variant | train ACC | train NMI | generalization | knn | balanced | s |\n|---|---:|---:|---:|---:|---:|---:|",
          flush=True)
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        v = VARIANTS[name]
        t0 = time.perf_counter()
        extra: dict = {}
        if v.get("base") == "kmeans":
            lab = get_method("kmeans")(k, {}).fit(x, FitContext(seed=seed, progress=False, work_dir=work)).labels_
        else:
            p, inp = v.get("pca", 64), v.get("input", "raw")
            if (inp, p) not in pcs:
                xi = inputs[inp]()
                pcs[inp, p] = pca_project(xi, p) if p > 0 else xi  # 0: full width (as umap-kmeans pca=0)
            spec = ReduceSpec("umap", v.get("dim", 10), n_neighbors=v["nn"], min_dist=0.0)
            runs = []
            for r in range(v["runs"]):
                z, info = reduce_features(pcs[inp, p], spec, seed=seed + r, cache_dir=work, progress=False)
                print(f"  {name} run {r}: UMAP {info.get('cache')} {info.get('seconds')} s", file=sys.stderr, flush=True)
                runs.append(cluster_embedding(z, k, v.get("clusterer", "kmeans"), v.get("n_init", 10), seed + r))
            for kind, count in v.get("mix", {}).items():  # k-means runs on the features join the ensemble
                runs += [cluster_embedding(inputs[kind](), k, "kmeans", 10, seed + i) for i in range(count)]
            runs_a = np.stack(runs).astype(np.int32)
            if len(runs) > 1:
                lab = consensus(runs_a, k, methods=["hbgf", "mcla"], seed=seed).labels.astype(np.int64)
            else:
                lab = runs_a[0].astype(np.int64)
            extra["pre_post_acc"] = float(cluster_acc(y, lab))
            post = v.get("post", "none")
            if post == "st":
                from imgclust.refine.selftrain import self_train

                clf = self_train(x, lab, k, seed=seed).classifier
                lab = clf.predict_proba(x).argmax(1)
            elif post == "conf-st":
                res = confident_self_train(x, runs_a, lab, k, seed=seed)
                extra["confident_share"] = res.confident_share
                lab = res.labels
            elif post == "knn":
                from imgclust.refine.confident import knn_smooth

                lab = knn_smooth(None, lab, k, graph=graph)
        lab = np.asarray(lab)
        secs = time.perf_counter() - t0
        gen, knn = generalization_score(x, lab, seed=0), knn_score(None, lab, graph=[graph])
        row = {"variant": name, "acc": float(cluster_acc(y, lab)), "nmi": float(nmi(y, lab)), "generalization": gen,
               "knn": knn, "balanced": (gen + knn) / 2, "seconds": round(secs, 1), **extra}
        rows.append(row)
        print(f"| {name} | {row['acc']:.4f} | {row['nmi']:.4f} | {gen:.4f} | {knn:.4f} | {row['balanced']:.4f} | "
              f"{secs:.0f} | {json.dumps(extra)}", flush=True)
        if args.save_labels is not None:
            args.save_labels.mkdir(parents=True, exist_ok=True)
            np.save(args.save_labels / f"variant-{name}_s{seed}.npy", lab.astype(np.int32))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**row, "split": args.split, "seed": seed, "source": args.source}) + "\n")
    if len(rows) >= 3:
        from scipy.stats import spearmanr

        for c in ("generalization", "knn", "balanced"):
            rho = spearmanr([r[c] for r in rows], [r["acc"] for r in rows]).statistic
            print(f"Spearman({c}, train ACC) over {len(rows)} variants: {rho:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
