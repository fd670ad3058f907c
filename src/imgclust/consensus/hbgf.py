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
"""

from __future__ import annotations

import numpy as np

from imgclust.consensus.ensemble import Ensemble


def hbgf(ens: Ensemble, k: int, *, seed: int = 0) -> np.ndarray:
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
    u = np.asarray(ens.membership(dtype=np.float32) @ proj)  # (N, K) = A V S^-1, left singular vectors
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    import faiss

    km = faiss.Kmeans(u.shape[1], k, niter=25, nredo=3, seed=int(seed) % (2**31), verbose=False)
    x = np.ascontiguousarray(u, dtype=np.float32)
    km.train(x)
    return km.index.search(x, 1)[1].ravel().astype(np.int64)
