#!/usr/bin/env python
"""SPICE benchmarks: k-means vs SPICE-Self vs SPICE, the loss ablation, and SPICE-Self's cost.

    # k-means / spice-self / spice, fit on one split, scored on it and (with --eval-split) on another
    python benchmarks/spice.py --shared ../shared --cache-dir /tmp/bench-cache --split test --option views=none
    python benchmarks/spice.py --shared ../shared --cache-dir /tmp/bench-cache --split train --limit 5000 \
        --eval-split test --eval-limit 5000 --image-size 96 --option n_views=1
    # DS-CE vs CE vs temperature CE (paper Table 4), SPICE-Self only
    python benchmarks/spice.py --shared ../shared --cache-dir /tmp/bench-cache --ablation --seeds 0 1 2 --option views=none
    # time per epoch and peak memory for N synthetic 1280-d features (run alone: peak RSS is the process's)
    python benchmarks/spice.py --timing 50000 --option epochs=2

Everything runs through :class:`imgclust.ImageClusterer`, so features and view banks come
from the feature cache (extracted once when missing: EfficientNet-Lite0 runs at ~25-50
images/s on 2 CPU cores depending on image size; the bank costs 2 x n_views passes over
the fitted images). Rows show ACC / NMI / ARI (mean +- std over seeds) and seconds per fit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from imgclust.config import parse_options


def fmt(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float)
    return f"{a.mean():.3f} ± {a.std():.3f}" if len(a) > 1 else f"{a.mean():.3f}"


def timing(n: int, opts: dict, k: int = 10, d: int = 1280) -> int:
    import torch

    from imgclust.methods import FitContext, get_method

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(k, d)).astype(np.float32)
    lab = rng.integers(0, k, n)
    x = rng.standard_normal((n, d), dtype=np.float32)  # built in place: the peak RSS is the fit's, not this
    x *= 2.0
    for s in range(0, n, 4096):
        x[s:s + 4096] += centers[lab[s:s + 4096]]
    np.maximum(x, 0.0, out=x)  # non-negative, like pooled post-ReLU CNN features
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = get_method("spice-self")(k, {"views": "none", **opts})
    t = time.perf_counter()
    m.fit(x, FitContext(seed=0, progress=False))
    wall = time.perf_counter() - t
    h = m.history_
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = os.getloadavg()[0]
    print(f"| N | D | heads | M | m2 | epochs | s / epoch (train + selection) | fit s | peak RSS MB (features {x.nbytes / 2**20:.0f} MB) "
          f"| load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {n:,} | {d} | {m.config.heads} | {h['pool_size']} | {h['batch_size']} | {len(h['epoch_s'])} | "
          f"{np.mean(h['epoch_s']):.2f} | {wall:.1f} | {peak:.0f} (before fit {rss0:.0f}) | {load:.1f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("IMGCLUST_SHARED"), help="shared data dir")
    ap.add_argument("--source", default=None, help="image source (default: {shared}/data/cifar10-jpg.tar.gz)")
    ap.add_argument("--split", default="test", help="split to fit on")
    ap.add_argument("--limit", type=int, default=None, help="seeded random subset of the fit split")
    ap.add_argument("--eval-split", default=None, help="also score predictions on this split")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None, help="backbone input size (features and views)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--pca", type=int, default=None, help="PCA to this many dimensions before clustering")
    ap.add_argument("--pca-whiten", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=["kmeans", "spice-self", "spice"])
    ap.add_argument("--option", action="append", default=[], help="spice option for every row, key=value")
    ap.add_argument("--ablation", action="store_true", help="DS-CE vs CE vs TCE rows (spice-self)")
    ap.add_argument("--timing", type=int, default=None, help="time SPICE-Self on N synthetic features and exit")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    opts = parse_options(args.option)
    if args.timing:
        return timing(args.timing, opts, args.k)

    from imgclust import ImageClusterer
    from imgclust.data import open_source
    from imgclust.data.base import SubsetSource
    from imgclust.metrics import evaluate

    src = args.source or (str(Path(args.shared) / "data" / "cifar10-jpg.tar.gz") if args.shared else None)
    if src is None:
        print("give --source or --shared", file=sys.stderr)
        return 2
    fit_src = open_source(src, split=args.split)
    if args.limit:
        fit_src = SubsetSource.sample(fit_src, args.limit, seed=0)
    eval_src = None
    if args.eval_split:
        eval_src = open_source(src, split=args.eval_split)
        if args.eval_limit:
            eval_src = SubsetSource.sample(eval_src, args.eval_limit, seed=0)

    if args.ablation:
        rows = [("DS-CE (spice-self)", "spice-self", {"loss": "dsce"}),
                ("CE", "spice-self", {"loss": "ce"}),
                ("TCE (T = 0.2)", "spice-self", {"loss": "tce"}),
                ("non-overlap (DS-CE)", "spice-self", {"overlap": False})]
        rows = [("k-means", "kmeans", {})] + rows
    else:
        rows = [(m, m, {}) for m in args.methods]

    results = []
    for label, method, extra in rows:
        per = {"fit": [], "eval": [], "s": [], "info": []}
        for seed in args.seeds:
            mopts = {} if method == "kmeans" else {**opts, **extra}
            est = ImageClusterer(n_clusters=args.k, method=method, backbone=args.backbone, image_size=args.image_size,
                                 method_options=mopts, cache_dir=args.cache_dir, seed=seed, progress=True,
                                 pca=args.pca, pca_whiten=args.pca_whiten)
            t = time.perf_counter()
            est.fit(fit_src)
            per["s"].append(time.perf_counter() - t - est.timings_["features_s"])
            per["fit"].append(evaluate(fit_src.labels, est.labels_))
            if eval_src is not None:
                per["eval"].append(evaluate(eval_src.labels, est.predict(eval_src)))
            h = est.model_.history_
            per["info"].append({key: h.get(key) for key in ("best_head", "best_epoch", "reliable_per_cluster",
                                                            "reliable_total", "changed_from_self", "views_s",
                                                            "train_s", "semi_s")})
            rel = getattr(est.model_, "reliable_index_", None)
            if rel is not None and len(rel):  # how right the reliable labels are (labels used only here)
                rel_acc = evaluate(np.asarray(fit_src.labels)[est.valid_][rel], est.model_.self_labels_[rel])
                per["info"][-1]["reliable_acc"] = round(rel_acc["acc"], 4)
            print(label, seed, per["fit"][-1], per["eval"][-1] if per["eval"] else "", per["info"][-1], flush=True)
        results.append((label, per))

    head = "| method | fit ACC | fit NMI | fit ARI |" + (" eval ACC | eval NMI | eval ARI |" if eval_src else "") + " fit s |"
    print()
    print(f"fit: {fit_src.name} (n={len(fit_src)})" + (f"; eval: {eval_src.name} (n={len(eval_src)})" if eval_src else "")
          + f"; backbone {args.backbone} @ {args.image_size or 'default'} px; pca {args.pca} whiten {args.pca_whiten}; "
          f"seeds {args.seeds}; options {opts}")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, per in results:
        cells = [fmt([r[m] for r in per["fit"]]) for m in ("acc", "nmi", "ari")]
        if eval_src is not None:
            cells += [fmt([r[m] for r in per["eval"]]) for m in ("acc", "nmi", "ari")]
        print(f"| {label} | " + " | ".join(cells) + f" | {np.mean(per['s']):.1f} |")
    if args.json:
        args.json.write_text(json.dumps([{"label": lab, **per} for lab, per in results], indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
