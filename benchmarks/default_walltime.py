#!/usr/bin/env python
"""Wall time of the default method (`auto`) on cached features, with k-means as the reference (issue 18).

Nothing but the features is cached: every method runs in a fresh temporary work dir, so `auto` computes
its UMAP embeddings, the criterion's kNN graph and the self-training. k-means (n_init 10) runs just before
and just after it, and the table gives the ratio to their mean, the number that survives a noisy machine.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/default_walltime.py \
        $IMGCLUST_CACHE/features/<key>/features.npy --k 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def timed(name: str, x: np.ndarray, k: int, seed: int) -> dict:
    from imgclust.methods import FitContext, get_method

    with tempfile.TemporaryDirectory() as work:
        t, c = time.perf_counter(), time.process_time()
        m = get_method(name)(k, {}).fit(x, FitContext(seed=seed, progress=False, work_dir=work))
        row = {"method": name, "wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - c, 1)}
    chosen = (getattr(m, "history_", None) or {}).get("selection", {}).get("chosen")
    if chosen:
        row["chosen"] = chosen
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("features", help="a cached features.npy (read through a memmap)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    x = np.load(args.features, mmap_mode="r")
    before, auto, after = (timed(n, x, args.k, args.seed) for n in ("kmeans", "auto", "kmeans"))
    ref = (before["wall_s"] + after["wall_s"]) / 2
    print("| method | wall s | CPU s | x k-means |\n|---|---:|---:|---:|")
    for r in (before, auto, after):
        print(f"| {r['method']}{' (' + r['chosen'] + ')' if 'chosen' in r else ''} | {r['wall_s']} | {r['cpu_s']} "
              f"| {r['wall_s'] / ref:.1f} |")


if __name__ == "__main__":
    main()
