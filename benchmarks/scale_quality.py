"""Quality of a finished ``benchmarks/scale.py`` run on its synthetic features (issue 20).

scale.py's features are 100 Gaussians whose centres are the first draw of ``default_rng(seed)``; the
component of a row is recovered as its nearest centre (the centres are ~27.7 apart, the noise 0.8 per
dimension, so this is exact: checked against the generator on the first block). Prints, on sampled rows:
- the share of each query's approximate neighbours that lie in the query's own component (what
  clustering needs; recall@k against exact search can be low on isotropic blobs while this stays 1.0);
- every head's ACC against the components (when the run left ``head_labels-*.npy`` in --work).

    PYTHONPATH=src python benchmarks/scale_quality.py --work /work/bench/10m [--queries 2000 --rows 200000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def components(x: np.ndarray, rows: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Nearest centre of ``x[rows]``, read from the memmap in sorted order."""
    order = np.argsort(rows)
    f = np.asarray(x[rows[order]], dtype=np.float32)
    d = (f ** 2).sum(1, keepdims=True) - 2 * f @ centers.T + (centers ** 2).sum(1)
    out = np.empty(len(rows), np.int64)
    out[order] = d.argmin(1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scale.py's --work folder")
    ap.add_argument("--seed", type=int, default=0, help="scale.py's feature seed")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=200_000, help="rows sampled for the heads' ACC")
    args = ap.parse_args(argv)
    from imgclust.metrics import cluster_acc

    t0 = time.perf_counter()
    x = np.load(args.work / "features.npy", mmap_mode="r")
    rng = np.random.default_rng(args.seed)
    centers = rng.normal(size=(100, x.shape[1])).astype(np.float32)  # scale.make_features' first draw
    first = rng.integers(0, 100, min(100_000, len(x)))  # its first block's components
    check = components(x, np.arange(min(10_000, len(x))), centers)
    print(f"nearest centre = generator component on the first {len(check)} rows: {(check == first[:len(check)]).mean():.4f}")
    pick = np.random.default_rng(123)
    for nb_path in sorted(args.work.glob("neighbors-*.npz")):
        z = np.load(nb_path)
        indptr, indices = z["indptr"], z["indices"]
        q = np.sort(pick.choice(len(x), min(args.queries, len(x)), replace=False))
        sizes = indptr[q + 1] - indptr[q]
        nbrs = np.concatenate([indices[indptr[i]:indptr[i + 1]] for i in q])
        same = components(x, nbrs, centers) == np.repeat(components(x, q, centers), sizes)
        per_query = np.add.reduceat(same, np.concatenate([[0], np.cumsum(sizes)[:-1]])) / sizes
        print(f"{nb_path.name}: {len(q)} queries, {len(nbrs)} neighbours: same-component share {same.mean():.4f}; "
              f"queries with every neighbour in their component {(per_query == 1).mean():.4f}")
    for hl_path in sorted(args.work.glob("head_labels-*.npy")):
        hl = np.load(hl_path, mmap_mode="r")
        r = np.sort(pick.choice(len(x), min(args.rows, len(x)), replace=False))
        y = components(x, r, centers)
        accs = np.array([cluster_acc(y, np.asarray(hl[h, r])) for h in range(hl.shape[0])])
        print(f"{hl_path.name}: {len(r)} rows, head ACC vs the components: mean {accs.mean():.4f}, "
              f"min {accs.min():.4f}, max {accs.max():.4f}")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
