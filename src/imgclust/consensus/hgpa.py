"""HGPA, the hypergraph partitioning algorithm (Strehl & Ghosh 2002, sec. 3.2).

Every cluster of every clustering is a hyperedge over its objects; the consensus is the
balanced K-way partition of that hypergraph cutting the fewest hyperedges (KaHyPar here,
hMETIS in the paper), with an allowed imbalance of 5 %.

Two limits, both measured, shape this implementation:

* The hyperedge-cut objective saturates on large noisy clusters: once every hyperedge holds
  a few objects the other heads put elsewhere, *every* partition cuts every hyperedge and
  the partitioner has nothing to optimise (20 noisy copies of a 10-class labelling,
  2,000 objects: ARI 0.97 at 0 % noise, 0.20 at 2 %). The consensus driver keeps HGPA
  only when its ANMI wins, as Strehl & Ghosh do.
* KaHyPar's time grows quickly with the pin count (N x H): 0.5 s for 2,000 x 20, 8 s for
  8,000 x 20 on 2 cores. So the hypergraph is partitioned on a random sample of at most
  ``sample`` objects (default 4,000), and every object is then placed in the block its
  own clusters (hyperedges) point to most: each hyperedge's share of sampled members per
  block, summed over the object's H hyperedges (one sparse product, O(N H)). With N <=
  ``sample`` this is exactly HGPA.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from imgclust.consensus.ensemble import ROW_BLOCK, Ensemble, row_blocks
from imgclust.consensus.partition import kahypar_partition

HGPA_SAMPLE = 4000


def hgpa(ens: Ensemble, k: int, *, seed: int = 0, sample: int = HGPA_SAMPLE, row_block: int = ROW_BLOCK) -> np.ndarray:
    n = ens.n_objects
    rng = np.random.default_rng(seed)
    idx = np.arange(n) if n <= sample else np.sort(rng.choice(n, size=sample, replace=False))
    bs = ens.membership(rows=idx).tocsc()  # (n_s, C): column c lists the sampled members of hyperedge c
    keep = np.flatnonzero(np.diff(bs.indptr) > 0)  # hyperedges with at least one sampled member
    bs = bs[:, keep]
    part_s = kahypar_partition(bs.indptr, bs.indices, len(idx), k, seed=seed)
    if len(idx) == n:
        return part_s
    # Extension: share of each hyperedge's sampled members in each block, (C, K) ...
    onehot = sp.csr_matrix((np.ones(len(idx)), (np.arange(len(idx)), part_s)), shape=(len(idx), k))
    share = np.zeros((ens.n_columns, k))
    share[keep] = (bs.T @ onehot).toarray()
    share /= np.maximum(share.sum(1, keepdims=True), 1.0)
    # ... summed over every object's H hyperedges; the sampled objects keep their block.
    out = np.empty(n, dtype=np.int64)
    for rows in row_blocks(n, row_block):  # issue 20: blocks of objects, never B or (N, K) whole
        out[rows] = ens.project_rows(share, rows).argmax(1)
    out[idx] = part_s
    return out
