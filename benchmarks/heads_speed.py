#!/usr/bin/env python
"""Speed and memory of multi-head training (``temi`` / ``icce-heads``) on synthetic features.

    python benchmarks/heads_speed.py                          # 10k and 1M x 384, 50 heads
    python benchmarks/heads_speed.py --sizes 10000 --epochs 3 --batch-size 256 1024

Each case runs in its own process (so its peak memory is its own): it draws N synthetic
D-dimensional features (a mixture of 100 Gaussians, so neighbour sets look like real ones),
mines the neighbour sets (timed separately; cached in a temporary directory shared by the
cases, so later cases with the same N and neighbour mode reuse them), then trains
the heads for ``--epochs`` epochs and reports the median seconds per epoch, the
images per second of training, and the process's peak RSS. Feature extraction runs at
~32 img/s on 2 cores with EfficientNet-Lite0, so e.g. 1M images take ~8.7 hours to embed;
the last column shows the share of one training epoch next to that.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time

EXTRACTION_IMG_PER_S = 32.0


def child(n: int, dim: int, heads: int, method: str, batch_size: int, epochs: int, k: int, seed: int,
          work: str) -> dict:
    import numpy as np
    import torch

    from imgclust.methods import FitContext, get_method
    from imgclust.neighbors import load_or_mine_neighbors

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(100, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks, to keep the temporary small
        m = min(100_000, n - s)
        x[s:s + m] = centers[rng.integers(0, 100, m)] + 0.8 * rng.normal(size=(m, dim)).astype(np.float32)
    opts = {"heads": heads, "batch_size": batch_size, "epochs": epochs, "warmup_epochs": 0}
    model = get_method(method)(k, opts)
    cfg = model.config
    t0 = time.perf_counter()
    nb = load_or_mine_neighbors(x, work, mode=cfg.neighbors, k=cfg.k, threshold=cfg.threshold,
                                max_neighbors=cfg.max_neighbors, seed=seed, progress=False)
    t_nn = time.perf_counter() - t0
    model.fit(x, FitContext(seed=seed, progress=False, work_dir=work))
    ep = sorted(model.history_["epoch_s"])[len(model.history_["epoch_s"]) // 2]
    return {
        "n": n, "dim": dim, "heads": heads, "method": method, "batch_size": batch_size, "epochs": epochs,
        "threads": torch.get_num_threads(), "neighbors_s": t_nn, "neighbor_index": nb.info.get("index"),
        "neighbors_cached": nb.info.get("cache") == "hit",
        "mean_set_size": nb.info.get("mean_size"), "epoch_s": ep, "train_img_per_s": n / ep,
        "epoch_vs_extraction": ep / (n / EXTRACTION_IMG_PER_S),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=50)
    ap.add_argument("--k", type=int, default=10, help="clusters")
    ap.add_argument("--methods", nargs="+", default=["temi", "icce-heads"])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--epochs", type=int, default=None, help="default: 3 below 100k rows, else 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return 0
    rows = []
    work = tempfile.mkdtemp(prefix="imgclust-heads-speed-")  # neighbour sets mined once per (N, mode)
    for n in args.sizes:
        for method in args.methods:
            for bs in args.batch_size:
                spec = {"n": n, "dim": args.dim, "heads": args.heads, "method": method, "batch_size": bs,
                        "epochs": args.epochs or (3 if n < 100_000 else 1), "k": args.k, "seed": args.seed,
                        "work": work}
                print(f"[{method} n={n} bs={bs}] ...", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    shutil.rmtree(work, ignore_errors=True)
    print("| N | D | heads | method | batch | threads | neighbours s (index, mean set) | s / epoch | train img/s "
          "| epoch / extraction | peak RSS MB |")
    print("|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['dim']} | {r['heads']} | {r['method']} | {r['batch_size']} | {r['threads']} | "
              f"{'cached' if r['neighbors_cached'] else format(r['neighbors_s'], '.1f')} "
              f"({r['neighbor_index']}, {r['mean_set_size']:.1f}) | {r['epoch_s']:.2f} | "
              f"{r['train_img_per_s']:,.0f} | {100 * r['epoch_vs_extraction']:.2f}% | {r['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
