#!/usr/bin/env python
"""ICSR benchmark: base methods before / after ICSR, on a fit part and a held-out part of one split.

    OMP_NUM_THREADS=1 python benchmarks/icsr.py --shared ../shared --cache-dir /tmp/bench-cache \
        --bases kmeans icce-heads --base-option icce-heads:epochs=30 --ablation

The split (default CIFAR-10 ``test``, 10,000 images) is divided with a seeded permutation into
``--fit-size`` images (default 8,000) that the base method and ICSR are fitted on, and the rest,
held out (scored with ``predict`` only). Features come from the feature cache (efficientnet-lite0
at its default 224 px: extracted once when missing, ~25-50 images/s on 2 CPU cores). Each row:
ACC / NMI / ARI on the fit part and the held-out part, the ranking success rate R_sr(p)
(paper Eq. 15, averaged over clusters) of the first ranking (the base model's clusters) next to
the clusters' purity (R_sr of a random p %), and seconds. ``--ablation`` adds ICSR with every
weight 1 (``weighting=uniform``: the same self-training without the ranking).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from imgclust.config import parse_options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("IMGCLUST_SHARED"), help="shared data dir")
    ap.add_argument("--source", default=None, help="image source (default: {shared}/data/cifar10-jpg.tar.gz)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--fit-size", type=int, default=8000, help="images to fit on; the rest of the split is held out")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--bases", nargs="+", default=["kmeans"], help="base methods")
    ap.add_argument("--base-option", action="append", default=[], help="METHOD:key=value")
    ap.add_argument("--option", action="append", default=[], help="ICSR option key=value")
    ap.add_argument("--ablation", action="store_true", help="also ICSR with uniform weights (no ranking)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from imgclust import ImageClusterer
    from imgclust.data import open_source
    from imgclust.metrics import evaluate
    from imgclust.refine.icsr import refine_estimator

    path = args.source or (str(Path(args.shared) / "data" / "cifar10-jpg.tar.gz") if args.shared else None)
    if path is None:
        ap.error("give --shared or --source")
    src = open_source(path, split=args.split)
    fe = ImageClusterer(n_clusters=args.k, backbone=args.backbone, image_size=args.image_size,
                        cache_dir=args.cache_dir, progress=True)
    feats, valid, fs, _ = fe._features(src)
    x, y = np.asarray(feats, np.float32)[valid], np.asarray(src.labels)[valid]
    perm = np.random.default_rng(args.seed).permutation(len(x))
    fit, held = perm[:args.fit_size], perm[args.fit_size:]
    print(f"{path} split={args.split}: {len(x)} images, {args.backbone} features ({x.shape[1]}-d, "
          f"{'cache' if fs.from_cache else 'extracted'}); fit on {len(fit)}, held out {len(held)} (seed {args.seed})",
          file=sys.stderr)
    base_opts: dict[str, dict] = {}
    for it in args.base_option:
        name, kv = it.split(":", 1)
        base_opts.setdefault(name, {}).update(parse_options([kv]))
    icsr_opts = parse_options(args.option)
    variants = [("icsr", icsr_opts)] + ([("icsr, uniform weights", {**icsr_opts, "weighting": "uniform"})]
                                        if args.ablation else [])

    def scores(labels_fit: np.ndarray, labels_held: np.ndarray) -> str:
        a, b = evaluate(y[fit], labels_fit), evaluate(y[held], labels_held)
        return " | ".join(f"{m[k]:.3f}" for m in (a, b) for k in ("acc", "nmi", "ari"))

    print("| base | refiner | fit ACC | fit NMI | fit ARI | held-out ACC | held-out NMI | held-out ARI "
          "| R_sr 20/40/60/80 % (base clusters) | purity | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for base in args.bases:
        t0 = time.perf_counter()
        est = ImageClusterer(n_clusters=args.k, method=base, method_options=base_opts.get(base), seed=args.seed,
                             progress=False).fit(x[fit])
        print(f"| {base} | - | {scores(est.labels_, est.predict(x[held]))} | | | {time.perf_counter() - t0:.0f} |",
              flush=True)
        for name, opts in variants:
            t0 = time.perf_counter()
            new = refine_estimator(est, x[fit], opts, truth=y[fit], progress=False)
            h = new.model_.history_
            sr = h.get("rsr_first") or {}
            rsr = "/".join(f"{v:.3f}" for v in (sr.get("mean_rsr") or {}).values())
            print(f"| {base} | {name} | {scores(new.labels_, new.predict(x[held]))} | {rsr} | "
                  f"{sr.get('mean_purity', float('nan')):.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
