"""CSPA, the cluster-based similarity partitioning algorithm (Strehl & Ghosh 2002, sec. 3.1).

The co-association similarity of two objects is the fraction of clusterings that put them
together, S = B B^T / H (B the binary membership matrix, see :mod:`.ensemble`); the
consensus is a balanced K-way METIS partition of the similarity graph S.

S has up to N^2 non-zeros, so CSPA is only run where N is small (``max_n``, default 5,000,
the scale Strehl & Ghosh themselves recommend it for); :func:`cspa` raises ``ValueError``
above it and the consensus driver skips it with a note.
"""

from __future__ import annotations

import numpy as np

from imgclust.consensus.ensemble import Ensemble
from imgclust.consensus.partition import metis_partition

CSPA_MAX_N = 5000


def cspa(ens: Ensemble, k: int, *, seed: int = 0, max_n: int = CSPA_MAX_N) -> np.ndarray:
    if ens.n_objects > max_n:
        raise ValueError(f"CSPA builds an N x N similarity; N={ens.n_objects} > max_n={max_n}")
    b = ens.membership()
    s = (b @ b.T).tocsr()  # integer co-occurrence counts 0..H; METIS weights are relative
    return metis_partition(s, k, seed=seed)
