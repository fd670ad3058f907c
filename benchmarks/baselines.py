#!/usr/bin/env python
"""Beat the baselines a user would try first (issue 18): one table, several seeds.

    # CIFAR-10 test (features cached), transductive: fit and score on the same 10k images
    python benchmarks/baselines.py --source $IMGCLUST_SHARED/data/cifar10-jpg.tar.gz --fit-split test
    # the papers' protocol: fit on train, score on test
    python benchmarks/baselines.py --source .../cifar10-jpg.tar.gz --fit-split train --eval-split test
    # Fashion-MNIST on pixels, digits
    python benchmarks/baselines.py --source $IMGCLUST_SHARED/data/fashion-mnist --backbone pixels \
        --image-size 28 --fit-split train --eval-split test
    python benchmarks/baselines.py --source digits --backbone pixels --image-size 8 --fit-split train

Rows (``--rows``, comma list; names below): every row is a method + options, fitted with
seeds ``--seeds`` on the features of ``--fit-split`` (from the feature cache) and scored
with ACC / NMI on ``--eval-split`` (its images classified by the fitted model; the same
split = the fitted labels). ``crit`` is the label-free selection score of
:mod:`imgclust.select` (TURTLE-style generalisation, on the fit split's labels, no ground
truth); the last line is the Spearman correlation between ``crit`` and ACC over all
(row, seed) runs, i.e. whether the label-free choice can be trusted on this data.
``--backbone a,b`` combines backbones (:mod:`imgclust.multibackbone`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROWS: dict[str, tuple[str, dict]] = {
    "kmeans": ("kmeans", {}),
    "umap-kmeans": ("umap-kmeans", {"self_train": False}),  # the notebook baseline (N2D with k-means)
    "umap-gmm": ("umap-kmeans", {"self_train": False, "clusterer": "gmm"}),  # N2D proper
    "spectral-kmeans": ("spectral-kmeans", {"self_train": False}),
    "umap-kmeans+st": ("umap-kmeans", {}),
    "umap-kmeans-r3+st": ("umap-kmeans", {"runs": 3}),
    "umap64-kmeans": ("umap-kmeans", {"self_train": False, "pca": 64}),
    "umap64-kmeans-r3+st": ("umap-kmeans", {"runs": 3, "pca": 64}),
    "umap64-kmeans-r5+st": ("umap-kmeans", {"runs": 5, "pca": 64}),
    # session 3: self-training only on the images every UMAP run agrees on (refine/confident.py)
    "umap64-kmeans-r3+cst": ("umap-kmeans", {"runs": 3, "pca": 64, "st_confident": True}),
    "umap64-kmeans-r5+cst": ("umap-kmeans", {"runs": 5, "pca": 64, "st_confident": True}),
    # session 6: UMAP on the signed square root of the features, centred (the default's large candidate since)
    "umap-sqrt-kmeans": ("umap-kmeans", {"self_train": False, "power": 0.5, "centre": True}),
    "umap-sqrt-r3+st": ("umap-kmeans", {"runs": 3, "power": 0.5, "centre": True}),
    "umap-kmeans-r3+st-raw": ("umap-kmeans", {"runs": 3}),  # session 4-5's large candidate
    "spectral-kmeans+st": ("spectral-kmeans", {}),
    "spectral-kmeans-r3+st": ("spectral-kmeans", {"runs": 3}),
    "temi": ("temi", {}),
    "temi-mlp": ("temi", {"head": "mlp", "heads": 2, "epochs": 30}),
    "icce": ("icce", {}),
    "auto": ("auto", {}),
}
DEFAULT_ROWS = "kmeans,umap-kmeans,spectral-kmeans,umap-kmeans+st,spectral-kmeans+st"


def load(source: str, split: str, backbone: str, image_size: int | None, cache_dir: str | None,
         backbone_options: dict | None = None):
    from imgclust import ImageClusterer
    from imgclust.data import open_source

    src = open_source(source, split=None if split == "all" else split)
    est = ImageClusterer(backbone=backbone, image_size=image_size, cache_dir=cache_dir, progress=True,
                         backbone_options=backbone_options)
    feats, valid, fs, _ = est._features(src)
    x = np.ascontiguousarray(feats[valid], dtype=np.float32)
    y = np.asarray(src.labels)[valid]
    return x, y, (fs.path if fs is not None else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="image source: CIFAR tar, Fashion-MNIST folder, 'digits', ...")
    ap.add_argument("--fit-split", default="test")
    ap.add_argument("--eval-split", default=None, help="default: the fit split (transductive)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--backbone-option", action="append", default=[], help="key=value, e.g. grayscale=true")
    ap.add_argument("--cache-dir", default=os.environ.get("IMGCLUST_CACHE"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of: {', '.join(ROWS)}")
    ap.add_argument("--option", action="append", default=[], help="row:key=value (one row's option)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save-labels", type=Path, default=None,
                    help="folder: every run's fit-split labels as <row>_s<seed>.npy (criteria / Spearman later)")
    args = ap.parse_args(argv)

    from sklearn.metrics import normalized_mutual_info_score as nmi

    from imgclust.config import parse_options
    from imgclust.methods import FitContext, get_method
    from imgclust.metrics import cluster_acc
    from imgclust.select import generalization_score

    bopts = parse_options(args.backbone_option, "--backbone-option")
    x, y, work = load(args.source, args.fit_split, args.backbone, args.image_size, args.cache_dir, bopts)
    ev = args.eval_split or args.fit_split
    if ev != args.fit_split:
        xe, ye, _ = load(args.source, ev, args.backbone, args.image_size, args.cache_dir, bopts)
    else:
        xe, ye = x, y
    extra: dict[str, dict] = {}
    for o in args.option:
        row, _, kv = o.partition(":")
        extra.setdefault(row, {}).update(parse_options([kv]))
    rows, runs = [], []
    extras: dict[str, dict] = {}
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        method, opts = ROWS[name]
        opts = {**opts, **extra.get(name, {})}
        accs, nmis, crits, secs, fit_accs, fit_nmis = [], [], [], [], [], []
        for seed in args.seeds:
            t0 = time.perf_counter()
            m = get_method(method)(args.k, opts).fit(x, FitContext(seed=seed, progress=False, work_dir=work))
            secs.append(time.perf_counter() - t0)
            lab_fit = np.asarray(m.labels_)
            lab = lab_fit if ev == args.fit_split else m.predict(xe)
            accs.append(float(cluster_acc(ye, lab)))
            nmis.append(float(nmi(ye, lab)))
            # transductive score of the fit itself (train labels may choose designs; test labels only report)
            fit_accs.append(float(cluster_acc(y, lab_fit)))
            fit_nmis.append(float(nmi(y, lab_fit)))
            crits.append(generalization_score(x, lab_fit, seed=0))
            runs.append((crits[-1], accs[-1]))
            if args.save_labels is not None:
                args.save_labels.mkdir(parents=True, exist_ok=True)
                np.save(args.save_labels / f"{name}_s{seed}.npy", lab_fit.astype(np.int32))
            print(f"  {name} seed {seed}: ACC {accs[-1]:.4f} NMI {nmis[-1]:.4f} (fit split: ACC {fit_accs[-1]:.4f} "
                  f"NMI {fit_nmis[-1]:.4f}) crit {crits[-1]:.4f} {secs[-1]:.1f}s", file=sys.stderr, flush=True)
            cands = getattr(m, "candidate_labels_", None) or {}
            for cname, clab in cands.items():  # auto: every candidate's own result, fitted once
                sub = extras.setdefault(f"{name}:{cname}", {"acc": [], "nmi": [], "crit": [], "chosen": 0})
                chosen = cname == m.history_["selection"]["chosen"]
                cm = m.candidate_models_.get(cname)
                lab_c = clab if ev == args.fit_split else (cm.predict(xe) if cm is not None else None)
                if lab_c is not None:
                    sub["acc"].append(float(cluster_acc(ye, lab_c)))
                    sub["nmi"].append(float(nmi(ye, lab_c)))
                sub["crit"].append(generalization_score(x, clab, seed=0))
                if args.save_labels is not None:
                    safe = "".join(ch if ch.isalnum() or ch in "-=" else "_" for ch in cname)
                    np.save(args.save_labels / f"{name}-{safe}_s{seed}.npy", np.asarray(clab, dtype=np.int32))
                sub["chosen"] += int(chosen)
        rows.append({"row": name, "method": method, "options": opts, "acc": accs, "nmi": nmis, "crit": crits,
                     "seconds": secs, "fit_acc": fit_accs, "fit_nmi": fit_nmis})

    def pm(v: list[float]) -> str:
        return f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}"

    print(f"\n{args.source} fit={args.fit_split} ({len(x)}) eval={ev} ({len(xe)}), {args.backbone}, K={args.k}, "
          f"seeds {args.seeds}\n")
    print("| row | ACC % | NMI % | ACC per seed | fit-split ACC % | fit-split NMI % | label-free crit | s/run |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        per = " / ".join(f"{a:.3f}" for a in r["acc"])
        print(f"| {r['row']} | {pm(r['acc'])} | {pm(r['nmi'])} | {per} | {pm(r['fit_acc'])} | {pm(r['fit_nmi'])} | "
              f"{np.mean(r['crit']):.4f} | {np.mean(r['seconds']):.1f} |")
    for cname, sub in extras.items():
        if sub["acc"]:
            print(f"| {cname} (candidate; chosen {sub['chosen']}/{len(sub['crit'])}) | {pm(sub['acc'])} | "
                  f"{pm(sub['nmi'])} | {' / '.join(f'{a:.3f}' for a in sub['acc'])} | {np.mean(sub['crit']):.4f} | - |")
        else:
            print(f"| {cname} (candidate; chosen {sub['chosen']}/{len(sub['crit'])}; eval split needs its model) | - | - "
                  f"| - | {np.mean(sub['crit']):.4f} | - |")
    if len(runs) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr([c for c, _ in runs], [a for _, a in runs]).statistic
        print(f"\nSpearman(crit, ACC) over {len(runs)} runs: {rho:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "candidates": extras}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
