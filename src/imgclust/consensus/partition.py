"""Balanced graph and hypergraph partitioning through maintained libraries.

Strehl & Ghosh solve CSPA and MCLA with METIS (graph partitioning) and HGPA with hMETIS
(hypergraph partitioning), both external binaries. Here: ``pymetis`` (the METIS 5 library
with Python bindings) for graphs and ``kahypar`` (KaHyPar, the successor of hMETIS-style
multilevel hypergraph partitioning, on PyPI) for hypergraphs; both install from wheels.

KaHyPar's wheel ships no preset configuration and a configuration with a missing or wrong
key terminates the process, so :data:`KAHYPAR_CONFIG` is a complete one (the published
``cut_kKaHyPar`` preset of KaHyPar 1.3, with the flow-based refinement replaced by plain
k-way FM, which is much faster on the huge hyperedges of a cluster ensemble), written to a
temporary file for every call.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import scipy.sparse as sp

from imgclust.errors import InputError

# Complete configuration (KaHyPar 1.3.x keys), objective = hyperedge cut as HGPA asks.
KAHYPAR_CONFIG = """\
# general
mode=direct
objective=cut
seed=-1
cmaxnet=-1
vcycles=0
# main -> preprocessing -> min hash sparsifier
p-use-sparsifier=false
p-sparsifier-min-median-he-size=28
p-sparsifier-max-hyperedge-size=1200
p-sparsifier-max-cluster-size=10
p-sparsifier-min-cluster-size=2
p-sparsifier-num-hash-func=5
p-sparsifier-combined-num-hash-func=100
# main -> preprocessing -> community detection
p-detect-communities=true
p-detect-communities-in-ip=true
p-reuse-communities=false
p-max-louvain-pass-iterations=100
p-min-eps-improvement=0.0001
p-louvain-edge-weight=hybrid
p-large-he-threshold=1000
# main -> preprocessing -> large he removal
p-smallest-maxnet-threshold=50000
p-maxnet-removal-factor=0.01
# main -> coarsening
c-type=ml_style
c-s=1
c-t=160
# main -> coarsening -> rating
c-rating-score=heavy_edge
c-rating-use-communities=true
c-rating-heavy_node_penalty=no_penalty
c-rating-acceptance-criterion=best_prefer_unmatched
c-fixed-vertex-acceptance-criterion=fixed_vertex_allowed
# main -> initial partitioning
i-mode=recursive
i-technique=multi
# initial partitioning -> coarsening
i-c-type=ml_style
i-c-s=1
i-c-t=150
# initial partitioning -> coarsening -> rating
i-c-rating-score=heavy_edge
i-c-rating-use-communities=true
i-c-rating-heavy_node_penalty=no_penalty
i-c-rating-acceptance-criterion=best_prefer_unmatched
i-c-fixed-vertex-acceptance-criterion=fixed_vertex_allowed
# initial partitioning -> initial partitioning
i-algo=pool
i-runs=20
# initial partitioning -> bin packing
i-bp-algorithm=worst_fit
i-bp-heuristic-prepacking=false
i-bp-early-restart=true
i-bp-late-restart=true
# initial partitioning -> local search
i-r-type=twoway_fm
i-r-runs=-1
i-r-fm-stop=simple
i-r-fm-stop-i=50
# main -> local search
r-type=kway_fm
r-runs=-1
r-fm-stop=adaptive_opt
r-fm-stop-alpha=1
r-fm-stop-i=350
"""


def metis_partition(adj: sp.csr_matrix, k: int, *, seed: int = 0, ufactor: int = 50,
                    vweights: np.ndarray | None = None) -> np.ndarray:
    """Balanced k-way partition of an undirected weighted graph (METIS, via pymetis).

    ``adj`` is a symmetric sparse matrix of non-negative weights (the diagonal is ignored;
    weights are scaled to integers 1..1000 as METIS needs). ``ufactor`` is METIS's allowed
    imbalance in 1/1000 (50 = 5 %, the UBfactor Strehl & Ghosh use). Returns (n,) parts.
    """
    import pymetis

    n = adj.shape[0]
    if k < 2 or n <= k:
        return np.arange(n) % max(k, 1)
    a = sp.csr_matrix(adj, dtype=np.float64)
    a.setdiag(0)
    a.eliminate_zeros()
    if a.nnz == 0:  # no edges: METIS would fail; spread the vertices evenly
        return np.arange(n) % k
    w = a.data
    scaled = np.maximum(np.rint(w / w.max() * 1000.0), 1).astype(np.int64)
    opts = pymetis.Options(seed=int(seed) % (2**31), ufactor=int(ufactor))
    kwargs = {}
    if vweights is not None:
        kwargs["vweights"] = np.asarray(vweights, dtype=np.int64)
    graph = pymetis.CSRAdjacency(a.indptr.astype(np.int64), a.indices.astype(np.int64))
    part = pymetis.part_graph(int(k), graph, eweights=scaled, options=opts, **kwargs)
    return np.asarray(part[1], dtype=np.int64)


def kahypar_partition(edge_index: np.ndarray, edges: np.ndarray, n_nodes: int, k: int, *, seed: int = 0,
                      epsilon: float = 0.05) -> np.ndarray:
    """Balanced k-way hypergraph partition minimising the hyperedge cut (KaHyPar).

    Hyperedge e holds the nodes ``edges[edge_index[e]:edge_index[e + 1]]``. Returns (n_nodes,).
    """
    try:
        import kahypar
    except ImportError as e:  # pragma: no cover - it is a dependency; keep a clear message anyway
        raise InputError("HGPA needs the 'kahypar' package (pip install kahypar)") from e
    if k < 2 or n_nodes <= k:
        return np.arange(n_nodes) % max(k, 1)
    hg = kahypar.Hypergraph(int(n_nodes), int(len(edge_index) - 1), np.asarray(edge_index, np.int64).tolist(),
                            np.asarray(edges, np.int64).tolist(), int(k))
    ctx = kahypar.Context()
    fd, path = tempfile.mkstemp(suffix=".ini", prefix="imgclust-kahypar-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(KAHYPAR_CONFIG)
        ctx.loadINIconfiguration(path)
    finally:
        os.unlink(path)
    ctx.setK(int(k))
    ctx.setEpsilon(float(epsilon))
    ctx.setSeed(int(seed) % (2**31))
    ctx.suppressOutput(True)
    kahypar.partition(hg, ctx)
    return np.fromiter((hg.blockID(i) for i in range(n_nodes)), dtype=np.int64, count=n_nodes)
