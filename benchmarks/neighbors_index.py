#!/usr/bin/env python
"""Approximate neighbour indexes at scale (issue 20): build seconds, search seconds per 1,000 queries,
recall@50 against exact search, for the index :mod:`imgclust.neighbors` uses above 200k rows (IVF-flat,
4 sqrt(N) lists, 16 probes) and the large-N one (IVF sqrt(N) lists + 4-bit PQ fast-scan + SQ8 re-rank)
at several probes / re-rank factors — on the first ``--n`` rows of a feature file (a memmap is read
block by block, as the library does).

    nice -n 19 python benchmarks/neighbors_index.py --features /work/bench/20c/1m/features.npy --n 1000000

Search time is measured on ``--queries`` rows and extrapolated to all N (every row is a query when
neighbours are mined); build time (training + adding every row) is measured in full. CPU seconds are
the process's (both threads), so they stay comparable when other work shares the cores. Recall: 256
seeded query rows, exact top-50 by brute force (``faiss.knn``), as ``neighbors._sampled_recall``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def components(n: int, dim: int, seed: int = 0, centers: int = 100) -> np.ndarray:
    """Mixture component of each of the first ``n`` rows of ``benchmarks/scale.py``'s synthetic features,
    by replaying its generator (same seed, same draws in the same 100k-row blocks)."""
    rng = np.random.default_rng(seed)
    rng.normal(size=(centers, dim))
    out = np.empty(n, np.int64)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s:s + m] = rng.integers(0, centers, m)
        rng.normal(size=(m, dim))
    return out


def same_component(index, xn, comp: np.ndarray, k: int, seed: int = 0) -> float:
    """Share of the approximate top-k of 256 sampled rows (as the recall check) in the row's own component."""
    rows = np.sort(np.random.default_rng(seed + 7).choice(len(xn), size=min(len(xn), 256), replace=False))
    _, ids = index.search(xn[rows], k + 1)
    ok = [(comp[i[(i >= 0) & (i != r)][:k]] == comp[r]).mean() for r, i in zip(rows, ids)]
    return float(np.mean(ok))


def main() -> None:
    import imgclust.neighbors as nbm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True, help=".npy (N, D) float32; read as a memmap")
    ap.add_argument("--n", type=int, default=0, help="first n rows (default: all)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--configs", default="flat,fast:16:4,fast:8:8,fast:8:16,fast:8:8:2",
                    help="comma list: 'flat' (IVF-flat, the <4M index) or 'fast:<nprobe>:<k_factor>[:<dimensions per "
                    "PQ sub-quantizer, default 4>]'")
    ap.add_argument("--components", action="store_true", help="also the share of neighbours in the query's own "
                    "mixture component (the features must be scale.py's synthetic ones)")
    args = ap.parse_args()
    x = np.load(args.features, mmap_mode="r")
    x = x[:args.n] if args.n else x
    n = len(x)
    xn = nbm._NormalizedRows(x, None)
    rng = np.random.default_rng(1)
    q_rows = np.sort(rng.choice(n, size=min(n, args.queries), replace=False))
    q = xn[q_rows]
    rows = []
    built: dict[str, tuple] = {}
    for cfg in args.configs.split(","):
        kind, *p = cfg.split(":")
        if kind == "fast":
            nbm.FAST_NPROBE, nbm.FAST_K_FACTOR = int(p[0]), int(p[1])
            nbm.FAST_PQ_DIMS = int(p[2]) if len(p) > 2 else 4
            nbm.IVF_FAST_MIN_ROWS = 1
            kind = f"fast-pq{nbm.FAST_PQ_DIMS}"
        else:
            nbm.IVF_FAST_MIN_ROWS = 1 << 62
        if kind not in built:  # the fast index is built once; probes and re-rank factor are search-time settings
            (index, info), bw, bc = timed(lambda: nbm._build_index(xn, 0, seed=0))
            built[kind] = (index, info, bw, bc)
        index, info, bw, bc = built[kind]
        if kind.startswith("fast"):
            index.k_factor = nbm.FAST_K_FACTOR
            base = nbm.faiss.downcast_index(index.base_index)
            base.nprobe = nbm.FAST_NPROBE
            info = {**info, "nprobe": nbm.FAST_NPROBE, "k_factor": nbm.FAST_K_FACTOR}
        _, sw, sc = timed(lambda index=index: [index.search(q[s:s + 4096], args.k + 1) for s in range(0, len(q), 4096)])
        rec, rw, _ = timed(lambda index=index: nbm._sampled_recall(index, xn, args.k, seed=0))
        if args.components:
            comp = components(n, x.shape[1]) if "comp" not in built else built["comp"]
            built["comp"] = comp
            rec["same_component"] = round(same_component(index, xn, comp, args.k), 4)
        row = {"n": n, "config": cfg, **info, "build_s": round(bw, 1), "build_cpu_s": round(bc, 1),
               "search_s_per_1k": round(1000 * sw / len(q), 3), "search_cpu_s_per_1k": round(1000 * sc / len(q), 3),
               "search_all_s_est": round(sw * n / len(q), 1), "recall_at_50": rec["recall_at_k"],
               "same_component": rec.get("same_component"), "recall_check_s": round(rw, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["config", "index", "nlist", "nprobe", "build_s", "build_cpu_s", "search_s_per_1k", "search_cpu_s_per_1k",
            "search_all_s_est", "recall_at_50", "same_component"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols))


if __name__ == "__main__":
    main()
