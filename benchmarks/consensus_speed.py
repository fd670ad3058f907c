#!/usr/bin/env python
"""Consensus (cluster ensemble) time and peak memory at N = 10k, 100k, 1M; 50 heads; K = 10, 100.

    python benchmarks/consensus_speed.py                       # the full table (~10 min on 2 cores)
    python benchmarks/consensus_speed.py --n 10000 100000 --k 10

Heads are synthetic: 50 copies of a balanced K-class labelling, each with 30 % of its
labels re-drawn at random and its cluster names permuted (a hard ensemble: no single head
has ARI above ~0.5 with the truth). Every (N, K, method) runs in a fresh subprocess so the
peak resident memory (ru_maxrss) belongs to that run alone; "extra MB" is the peak minus
the process's size once the heads are in memory (the heads themselves: 50 x N x 4 bytes).
ARI is against the truth the heads were drawn from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from sklearn.metrics import adjusted_rand_score
n, k, h, method, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], 0
rng = np.random.default_rng(seed)
y = rng.permutation(np.arange(n) % k).astype(np.int32)
heads = np.empty((h, n), np.int32)
for i in range(h):
    noisy = np.where(rng.random(n) < 0.3, rng.integers(0, k, n, dtype=np.int32), y)
    heads[i] = rng.permutation(k).astype(np.int32)[noisy]
from imgclust.consensus import Ensemble, anmi
import importlib
fn = getattr(importlib.import_module(f"imgclust.consensus.{method}"), method)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
ens = Ensemble.from_labels(heads)
lab = fn(ens, k, seed=seed, **({"max_n": n} if method == "cspa" else {}))
sec = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t1 = time.perf_counter()
score = anmi(ens, lab)
anmi_s = time.perf_counter() - t1
print(json.dumps({"seconds": sec, "peak_mb": peak, "extra_mb": peak - base, "anmi": score, "anmi_s": anmi_s,
                  "ari": adjusted_rand_score(y, lab)}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--k", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--heads", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["cspa", "hgpa", "mcla", "hbgf"])
    ap.add_argument("--cspa-max-n", type=int, default=5000, help="CSPA runs only up to this N (as the library)")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args(argv)
    print("| N | K | method | seconds | peak RSS MB | extra MB | ANMI | ARI vs truth | ANMI s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        for k in args.k:
            for m in args.methods:
                if m == "cspa" and n > args.cspa_max_n:
                    print(f"| {n:,} | {k} | {m} | skipped: N > {args.cspa_max_n} (N x N) | | | | | |", flush=True)
                    continue
                r = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), str(args.heads), m],
                                   capture_output=True, text=True, timeout=args.timeout)
                if r.returncode != 0:
                    print(f"| {n:,} | {k} | {m} | failed: {r.stderr.strip().splitlines()[-1][:80]} | | | | | |", flush=True)
                    continue
                d = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"| {n:,} | {k} | {m} | {d['seconds']:.1f} | {d['peak_mb']:.0f} | {d['extra_mb']:.0f} | "
                      f"{d['anmi']:.4f} | {d['ari']:.4f} | {d['anmi_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
