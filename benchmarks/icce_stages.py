#!/usr/bin/env python
"""ICCE stages side by side: best single head vs consensus vs consensus + self-training.

    python benchmarks/icce_stages.py --shared ../shared --cache-dir /tmp/bench-cache
    python benchmarks/icce_stages.py --shared ../shared --train-limit 0      # all 50,000 train images

Fits on the CIFAR-10 *train* images (``--train-limit`` random ones, default 10,000: the
full 50,000 cost ~26 min of EfficientNet-Lite0 extraction at 224 px on 2 cores) and reports
on those and on the 10,000 held-out *test* images. k-means is the reference (test images:
nearest centroid). "best head" is stage 1's label-free choice (teacher head with the lowest
loss), predicting test images itself; "consensus" exists only for the training images (a
consensus has no model); "+ self-training" is the linear classifier trained on the
consensus labels, which classifies both. ACC / NMI / ARI in %, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("IMGCLUST_SHARED"))
    ap.add_argument("--source", default=None, help="default: {shared}/data/cifar10-jpg.tar.gz")
    ap.add_argument("--train-limit", type=int, default=10000, help="random train images to fit on (0 = all)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--option", action="append", default=[], help="icce option key=value (JSON values)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from imgclust.backbones import build_backbone
    from imgclust.config import parse_options
    from imgclust.data import open_source
    from imgclust.data.base import SubsetSource
    from imgclust.features import extract_features
    from imgclust.methods import FitContext, get_method
    from imgclust.metrics import evaluate

    src = args.source or (str(Path(args.shared) / "data" / "cifar10-jpg.tar.gz") if args.shared else None)
    if src is None:
        print("give --source or --shared", file=sys.stderr)
        return 2
    bb = build_backbone(args.backbone)
    train = open_source(src, split="train")
    if args.train_limit:
        train = SubsetSource.sample(train, args.train_limit, seed=0)
    test = open_source(src, split="test")
    fs_tr = extract_features(train, bb, cache_dir=args.cache_dir, progress=True)
    fs_te = extract_features(test, bb, cache_dir=args.cache_dir, progress=True)
    x_tr = np.ascontiguousarray(fs_tr.features[fs_tr.valid], dtype=np.float32)
    y_tr = np.asarray(train.labels)[fs_tr.valid]
    x_te = np.ascontiguousarray(fs_te.features[fs_te.valid], dtype=np.float32)
    y_te = np.asarray(test.labels)[fs_te.valid]
    opts = parse_options(args.option)

    rows: dict[str, dict[str, list]] = {}

    def add(name: str, split: str, y: np.ndarray, lab: np.ndarray | None) -> None:
        r = rows.setdefault(name, {})
        if lab is None:
            r.setdefault(split, None)
            return
        e = evaluate(y, lab)
        r.setdefault(split, []).append([e["acc"], e["nmi"], e["ari"]])

    times = {}
    for seed in args.seeds:
        km = get_method("kmeans")(args.k).fit(x_tr, FitContext(seed=seed, progress=False))
        add("k-means", "train", y_tr, km.labels_)
        add("k-means", "test", y_te, km.predict(x_te))
        t0 = time.perf_counter()
        m = get_method("icce")(args.k, opts).fit(x_tr, FitContext(seed=seed, progress=True, work_dir=fs_tr.path))
        times.setdefault("icce fit s", []).append(time.perf_counter() - t0)
        add("best head (stage 1)", "train", y_tr, m.best_head_labels_)
        best = super(type(m), m).predict_proba(x_te).argmax(1)  # the best head, not the classifier
        add("best head (stage 1)", "test", y_te, best)
        add(f"consensus ({m.history_['consensus']['method']})", "train", y_tr, m.consensus_labels_)
        add(f"consensus ({m.history_['consensus']['method']})", "test", y_te, None)
        add("consensus + self-training (icce)", "train", y_tr, m.labels_)
        add("consensus + self-training (icce)", "test", y_te, m.predict(x_te))
        print(f"seed {seed}: consensus {m.history_['consensus']}, self-training lr {m.history_['self_training']['lr']}",
              file=sys.stderr)

    def cell(v: list | None) -> str:
        if v is None:
            return "- | - | -"
        a = 100 * np.array(v)
        return " | ".join(f"{a[:, i].mean():.2f} ± {a[:, i].std():.2f}" for i in range(3))

    print(f"\n{Path(src).name}: fit on {len(x_tr)} train images, test {len(x_te)}; {args.backbone}; K={args.k}; "
          f"seeds {args.seeds}; icce options {opts or 'defaults'}; icce fit {np.mean(times['icce fit s']):.0f} s\n")
    print("| stage | train ACC | train NMI | train ARI | test ACC | test NMI | test ARI |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {cell(r['train'])} | {cell(r['test'])} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "times": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
