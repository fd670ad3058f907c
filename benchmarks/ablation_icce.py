#!/usr/bin/env python
"""ICCE stage-1 ablation (as the ICCE paper's Table 1): add the improvements one at a time.

    python benchmarks/ablation_icce.py --shared ../shared --cache-dir /tmp/bench-cache
    python benchmarks/ablation_icce.py --shared ../shared --seeds 0 1 2 --option epochs=80

Rows: k-means (reference), TEMI baseline (``temi``), + adaptive neighbours, + BatchNorm
instead of the embedding standardisation, + Sinkhorn-Knopp centring, + the CE term (=
``icce-heads``). Features come from the feature cache (extracted once if missing; the
CIFAR-10 test split with EfficientNet-Lite0 @ 224 takes ~5 minutes on 2 cores), neighbour
sets are cached next to them, and every row trains on the same features. Prints ACC / NMI /
ARI of the label-free best head (mean +- std over seeds), the mean and best ACC over all
heads (the best is an oracle that uses labels, shown only to gauge the head-selection
rule), the mean neighbour-set size and the neighbour accuracy (share of pairs with the same
label), and seconds per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from imgclust.config import parse_options

STEPS = [
    ("TEMI baseline (temi)", "temi", {}),
    ("+ adaptive neighbours", "temi", {"neighbors": "adaptive"}),
    ("+ BatchNorm", "temi", {"neighbors": "adaptive", "norm": "batchnorm"}),
    ("+ Sinkhorn-Knopp", "temi", {"neighbors": "adaptive", "norm": "batchnorm", "sinkhorn": True}),
    ("+ CE term (icce-heads)", "icce-heads", {}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("IMGCLUST_SHARED"), help="shared data dir")
    ap.add_argument("--source", default=None, help="image source (default: {shared}/data/cifar10-jpg.tar.gz)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--option", action="append", default=[], help="method option for every row, key=value")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    from imgclust.backbones import build_backbone
    from imgclust.data import open_source
    from imgclust.features import extract_features
    from imgclust.methods import FitContext, get_method
    from imgclust.metrics import evaluate
    from imgclust.neighbors import load_or_mine_neighbors

    src = args.source or (str(Path(args.shared) / "data" / "cifar10-jpg.tar.gz") if args.shared else None)
    if src is None:
        print("give --source or --shared", file=sys.stderr)
        return 2
    source = open_source(src, split=args.split)
    fs = extract_features(source, build_backbone(args.backbone), cache_dir=args.cache_dir, progress=True)
    x = np.ascontiguousarray(fs.features[fs.valid], dtype=np.float32)
    y = np.asarray(source.labels)[fs.valid]
    extra = parse_options(args.option)
    rows = []

    def record(name: str, results: list[dict], seconds: list[float], nb_info: dict | None) -> None:
        arr = {m: np.array([r[m] for r in results]) for m in ("acc", "nmi", "ari", "head_acc_mean", "head_acc_max")}
        rows.append({"step": name, **{m: (float(v.mean()), float(v.std())) for m, v in arr.items()},
                     "seconds": float(np.mean(seconds)), "neighbors": nb_info})
        print(f"  {name}: ACC {arr['acc'].mean():.4f}", file=sys.stderr, flush=True)

    res, secs = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        km = get_method("kmeans")(args.k).fit(x, FitContext(seed=seed, progress=False))
        secs.append(time.perf_counter() - t0)
        r = evaluate(y, km.labels_)
        res.append({**r, "head_acc_mean": r["acc"], "head_acc_max": r["acc"]})
    record("k-means", res, secs, None)

    for name, method, opts in STEPS:
        res, secs, nb_info = [], [], None
        for seed in args.seeds:
            m = get_method(method)(args.k, {**opts, **extra})
            t0 = time.perf_counter()
            m.fit(x, FitContext(seed=seed, progress=True, work_dir=fs.path))
            secs.append(time.perf_counter() - t0)
            r = evaluate(y, m.labels_)
            head_acc = [evaluate(y, hl)["acc"] for hl in m.head_labels_]
            res.append({**r, "head_acc_mean": float(np.mean(head_acc)), "head_acc_max": float(np.max(head_acc))})
            cfg = m.config
            nb = load_or_mine_neighbors(x, fs.path, mode=cfg.neighbors, k=cfg.k, threshold=cfg.threshold,
                                        max_neighbors=cfg.max_neighbors, seed=seed, progress=False,
                                        center=cfg.center_neighbors)
            pairs = np.repeat(np.arange(len(nb)), nb.sizes)
            nb_info = {"mean_size": nb.info["mean_size"], "pair_acc": float((y[pairs] == y[nb.indices]).mean())}
        record(name, res, secs, nb_info)

    def pm(v: tuple[float, float]) -> str:
        return f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}"

    print(f"\n{source.describe().get('name', src)} ({args.split}), {args.backbone}, N={len(x)}, K={args.k}, "
          f"seeds {args.seeds}, extra options {extra or 'none'}\n")
    print("| step | ACC % | NMI % | ARI % | head ACC mean % | head ACC best % (oracle) | neighbours: mean size, pair acc | s/run |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        nb = r["neighbors"]
        nbs = "-" if nb is None else f"{nb['mean_size']:.1f}, {100 * nb['pair_acc']:.1f}%"
        print(f"| {r['step']} | {pm(r['acc'])} | {pm(r['nmi'])} | {pm(r['ari'])} | {pm(r['head_acc_mean'])} | "
              f"{pm(r['head_acc_max'])} | {nbs} | {r['seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
