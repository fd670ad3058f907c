"""MCLA, the meta-clustering algorithm (Strehl & Ghosh 2002, sec. 3.3).

1. Meta-graph: one vertex per cluster of every clustering (C = sum_h K_h vertices), edge
   weights the Jaccard similarity of the clusters' member sets,
   J(a, b) = |a & b| / (|a| + |b| - |a & b|); the intersections are the (C, C) matrix
   B^T B (:meth:`Ensemble.cooccurrence`: O(N H^2) work, O(C^2) memory, never N x N).
   Each vertex keeps its ``max_degree`` strongest edges (default 3H; the graph stays
   symmetric): the full meta-graph is dense (C^2 = 25M edges at H = 50, K = 100) and
   METIS then takes ~20 s, while the dropped edges are the weak ones between unrelated
   clusters of noisy heads, which carry no consensus (same partitions in the tests and
   benchmarks; ``max_degree=0`` keeps all edges).
2. Partition the meta-graph into K balanced meta-clusters (METIS).
3. Collapse: object n's association with meta-cluster m is the mean of B[n, c] over the
   clusters c in m — the fraction of m's clusters that contain n.
4. Assign every object to its most associated meta-cluster (ties: the lowest index).
   Streaming (issue 20): steps 3-4 run over blocks of objects (:meth:`Ensemble.project_rows`,
   bit-identical to the product with B), so the (N, K) association matrix is never whole.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from imgclust.consensus.ensemble import ROW_BLOCK, Ensemble, row_blocks
from imgclust.consensus.partition import metis_partition


def mcla(ens: Ensemble, k: int, *, seed: int = 0, max_degree: int | None = None,
         row_block: int = ROW_BLOCK) -> np.ndarray:
    inter = ens.cooccurrence()  # (C, C); diagonal = cluster sizes
    c = len(inter)
    size = np.diag(inter).copy()
    jac = inter / np.maximum(size[:, None] + size[None, :] - inter, 1e-12)
    np.fill_diagonal(jac, 0.0)
    deg = 3 * ens.n_heads if max_degree is None else int(max_degree)
    if 0 < deg < c - 1:  # each vertex's strongest edges, then symmetrised (an edge kept by either end)
        cols = np.argpartition(-jac, deg, axis=1)[:, :deg].ravel()
        rows = np.repeat(np.arange(c), deg)
        graph = sp.csr_matrix((jac[rows, cols], (rows, cols)), shape=(c, c))
        graph = graph.maximum(graph.T).tocsr()
    else:
        graph = sp.csr_matrix(jac)
    del jac, inter
    meta = metis_partition(graph, k, seed=seed)  # (C,) meta-cluster of every cluster
    n_meta = int(meta.max()) + 1
    share = np.zeros((c, n_meta), np.float32)
    share[np.arange(c), meta] = 1.0
    share /= np.maximum(share.sum(0, keepdims=True), 1.0)  # mean over each meta-cluster's clusters
    out = np.empty(ens.n_objects, dtype=np.int64)
    for rows in row_blocks(ens.n_objects, row_block):
        out[rows] = ens.project_rows(share, rows).argmax(1)  # (n, K) association of every object
    return out
