"""HBGF, the hybrid bipartite graph formulation (Fern & Brodley, ICML 2004).

Objects and clusters are the two vertex sets of one bipartite graph; object n is joined to
the H clusters that contain it (the membership matrix B is its biadjacency matrix). The
consensus partitions objects *and* clusters together. As in Fern & Brodley, the partition
is spectral and works on B alone (O(N H) memory):

    A = D_o^{-1/2} B D_c^{-1/2}            (D_o = H I the object degrees, D_c the cluster sizes)
    U S V^T = the top-K singular triplets of A     (from the (C, C) matrix A^T A = V S^2 V^T)
    embedding of objects  = rows of U = A V S^{-1}, L2-normalised,

then k-means on the object embedding (Ng-Jordan-Weiss style). Cheap at 1,000,000 objects:
the only N-sized work is two sparse products.

Streaming (issue 20): up to ``whole_bytes`` (256 MB: 670,000 objects at K = 100) the (N, K)
embedding is built whole exactly as before. Above, it is computed for blocks of objects
(:meth:`Ensemble.project_rows`) and never held whole: k-means trains on a seeded sample of
K x 256 rows (faiss's own cap, ``max_points_per_centroid``: above it faiss subsampled the full
matrix anyway, with its own generator) and assigns every block (at 10M x K = 100 the whole
embedding would be 4 GB).
"""

from __future__ import annotations

import numpy as np

from imgclust.consensus.ensemble import ROW_BLOCK, Ensemble, row_blocks

KMEANS_POINTS_PER_CENTROID = 256  # faiss.ClusteringParameters().max_points_per_centroid
WHOLE_BYTES = 256 << 20  # an (N, K) float32 embedding up to this size is built whole (as before issue 20)


def hbgf(ens: Ensemble, k: int, *, seed: int = 0, row_block: int = ROW_BLOCK,
         whole_bytes: int = WHOLE_BYTES) -> np.ndarray:
    inter = ens.cooccurrence()  # B^T B
    sizes = np.diag(inter).copy()
    dc = 1.0 / np.sqrt(np.maximum(sizes, 1.0))
    g = inter * dc[:, None] * dc[None, :] / ens.n_heads  # A^T A = V S^2 V^T, (C, C)
    c = len(g)
    kk = min(k, c - 1)
    if c > 1500:  # only the top K eigenpairs are needed: Lanczos instead of a full O(C^3) solve
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).standard_normal(c)
        evals, evecs = eigsh(g, k=kk, which="LA", v0=v0)
    else:
        evals, evecs = np.linalg.eigh(g)
    top = np.argsort(evals)[::-1][:kk]
    s = np.sqrt(np.maximum(evals[top], 1e-12))
    proj = (evecs[:, top] * dc[:, None] / s / np.sqrt(ens.n_heads)).astype(np.float32)  # D_c^-1/2 V S^-1 / sqrt(H)

    def embed(rows: slice | np.ndarray) -> np.ndarray:
        u = ens.project_rows(proj, rows)  # (n, K) rows of A V S^-1, the left singular vectors
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(u, dtype=np.float32)

    import faiss

    n = ens.n_objects
    km = faiss.Kmeans(proj.shape[1], k, niter=25, nredo=3, seed=int(seed) % (2**31), verbose=False)
    cap = k * KMEANS_POINTS_PER_CENTROID
    if n <= cap or n * proj.shape[1] * 4 <= whole_bytes:  # the whole embedding: faiss samples it itself
        x = embed(slice(0, n))
        km.train(x)
        return km.index.search(x, 1)[1].ravel().astype(np.int64)
    km.train(embed(np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))))
    out = np.empty(n, dtype=np.int64)
    for rows in row_blocks(n, row_block):
        out[rows] = km.index.search(embed(rows), 1)[1].ravel()
    return out
