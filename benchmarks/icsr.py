#!/usr/bin/env python
"""ICSR benchmark: base methods before / after ICSR, on fit images and held-out images.

    OMP_NUM_THREADS=1 python benchmarks/icsr.py --shared ../shared --cache-dir /tmp/bench-cache \
        --split train --fit-size 10000 --test-split test --bases kmeans icce-heads spice-self --ablation

With ``--test-split`` the base method and ICSR are fitted on ``--fit-size`` random images of
``--split`` (seeded; 10,000 train images = the subset ``benchmarks/icce_stages.py`` caches) and
scored on ``--test-size`` images of the held-out ``--test-split`` (default all) with
``predict``. Without it, one split (default CIFAR-10 ``test``, 10,000 images) is divided with a
seeded permutation into ``--fit-size`` images (default 8,000) and the rest held out.
``--e2e-option key=value`` adds a row for ICSR's end-to-end mode (``mode=end_to_end``: the
backbone fine-tuned on images after the head stage; needs ``--test-split``), e.g.
``--image-size 96 --e2e-option finetune=last_blocks --e2e-option e2e_epochs=5`` on a CPU. Features come from the feature cache (efficientnet-lite0
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
import warnings
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
    ap.add_argument("--test-split", default=None, help="score on this split (fit on --fit-size images of --split)")
    ap.add_argument("--test-size", type=int, default=0, help="random images of --test-split to score (0 = all)")
    ap.add_argument("--e2e-option", action="append", default=None,
                    help="add an end-to-end ICSR row with these extra options key=value (needs --test-split)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from imgclust import ImageClusterer
    from imgclust.data import open_source
    from imgclust.metrics import evaluate
    from imgclust.run import refine_estimator

    path = args.source or (str(Path(args.shared) / "data" / "cifar10-jpg.tar.gz") if args.shared else None)
    if path is None:
        ap.error("give --shared or --source")
    from imgclust.data.base import SubsetSource

    src = open_source(path, split=args.split)
    fe = ImageClusterer(n_clusters=args.k, backbone=args.backbone, image_size=args.image_size,
                        cache_dir=args.cache_dir, progress=True)
    if args.test_split:  # fit on sources (features from the cache), so image-level rows can read the images
        fit_src = SubsetSource.sample(src, args.fit_size, seed=0)
        held_src = open_source(path, split=args.test_split)
        if args.test_size:
            held_src = SubsetSource.sample(held_src, args.test_size, seed=0)
        y_fit, y_held = np.asarray(fit_src.labels), np.asarray(held_src.labels)
        fit_in, held_in = fit_src, held_src
        for s_ in (fit_src, held_src):
            fe.features(s_)  # extract once (progress bar) before the timed rows
        print(f"{path}: fit on {len(fit_src)} {args.split} images, held out {len(held_src)} {args.test_split} images, "
              f"{args.backbone} @ {args.image_size or 'default'} px (seed {args.seed})", file=sys.stderr)
    else:
        if args.e2e_option is not None:
            ap.error("--e2e-option needs --test-split (the end-to-end rows read the images)")
        feats, valid, fs, _ = fe.features(src)
        x, y = np.asarray(feats, np.float32)[valid], np.asarray(src.labels)[valid]
        perm = np.random.default_rng(args.seed).permutation(len(x))
        fit, held = perm[:args.fit_size], perm[args.fit_size:]
        y_fit, y_held, fit_in, held_in = y[fit], y[held], x[fit], x[held]
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
    if args.e2e_option is not None:
        variants.append(("icsr end-to-end", {**icsr_opts, "mode": "end_to_end", **parse_options(args.e2e_option)}))

    def scores(labels_fit: np.ndarray, labels_held: np.ndarray) -> str:
        a, b = evaluate(y_fit, labels_fit), evaluate(y_held, labels_held)
        return " | ".join(f"{m[k]:.3f}" for m in (a, b) for k in ("acc", "nmi", "ari"))

    print("| base | refiner | fit ACC | fit NMI | fit ARI | held-out ACC | held-out NMI | held-out ARI "
          "| R_sr 20/40/60/80 % before | after | purity before | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for base in args.bases:
        t0 = time.perf_counter()
        est = ImageClusterer(n_clusters=args.k, method=base, method_options=base_opts.get(base), seed=args.seed,
                             backbone=args.backbone, image_size=args.image_size, cache_dir=args.cache_dir,
                             progress=False).fit(fit_in)
        print(f"| {base} | - | {scores(est.labels_, est.predict(held_in))} | | | | {time.perf_counter() - t0:.0f} |",
              flush=True)
        for name, opts in variants:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # end-to-end on a CPU warns that it is slow
                new = refine_estimator(est, fit_in, opts, truth=y_fit, progress=False)
            h = new.model_.history_
            before, after = h.get("rsr_first") or {}, h.get("rsr_last") or {}

            def rsr(sr: dict) -> str:
                return "/".join(f"{v:.3f}" for v in (sr.get("mean_rsr") or {}).values())

            print(f"| {base} | {name} | {scores(new.labels_, new.predict(held_in))} | {rsr(before)} | {rsr(after)} | "
                  f"{before.get('mean_purity', float('nan')):.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
