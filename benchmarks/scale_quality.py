"""Quality of a finished ``benchmarks/scale.py`` run on its synthetic features (issue 20).

The component of every row is replayed from scale.py's generator (``neighbors_index.components``).
Prints, on sampled rows:
- the share of each query's approximate neighbours that lie in the query's own component (what
  clustering needs; recall@k against exact search can be low on isotropic blobs while this stays 1.0);
- every head's ACC against the components (when the run left ``head_labels-*.npy`` in --work).

    PYTHONPATH=src python benchmarks/scale_quality.py --work /work/bench/10m [--queries 2000 --rows 200000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scale.py's --work folder")
    ap.add_argument("--seed", type=int, default=0, help="scale.py's feature seed")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=200_000, help="rows sampled for the heads' ACC")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from neighbors_index import components

    from imgclust.metrics import cluster_acc

    t0 = time.perf_counter()
    x = np.load(args.work / "features.npy", mmap_mode="r")
    comp = components(len(x), x.shape[1], args.seed)  # exact: the generator's own draws
    pick = np.random.default_rng(123)
    for nb_path in sorted(args.work.glob("neighbors-*.npz")):
        z = np.load(nb_path)
        indptr, indices = z["indptr"], z["indices"]
        q = np.sort(pick.choice(len(x), min(args.queries, len(x)), replace=False))
        sizes = indptr[q + 1] - indptr[q]
        nbrs = np.concatenate([indices[indptr[i]:indptr[i + 1]] for i in q])
        same = comp[nbrs] == np.repeat(comp[q], sizes)
        per_query = np.add.reduceat(same, np.concatenate([[0], np.cumsum(sizes)[:-1]])) / sizes
        print(f"{nb_path.name}: {len(q)} queries, {len(nbrs)} neighbours: same-component share {same.mean():.4f}; "
              f"queries with every neighbour in their component {(per_query == 1).mean():.4f}")
    for hl_path in sorted(args.work.glob("head_labels-*.npy")):
        hl = np.load(hl_path, mmap_mode="r")
        r = np.sort(pick.choice(len(x), min(args.rows, len(x)), replace=False))
        y = comp[r]
        accs = np.array([cluster_acc(y, np.asarray(hl[h, r])) for h in range(hl.shape[0])])
        print(f"{hl_path.name}: {len(r)} rows, head ACC vs the components: mean {accs.mean():.4f}, "
              f"min {accs.min():.4f}, max {accs.max():.4f}")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
