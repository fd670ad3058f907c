"""Cluster ensembles: one consensus labelling from the H partitions of a multi-head model.

ICCE stage 2 (ICCE paper, sec. 3.2) combines the clusterings of all heads with Strehl &
Ghosh's cluster ensembles ("Cluster ensembles — a knowledge reuse framework for combining
multiple partitions", JMLR 2002): run several consensus functions and keep the labelling
with the highest average NMI to the heads (ANMI, the objective of both papers).

Consensus functions (one module each):

* ``cspa`` — co-association graph + METIS; N x N, so only for N <= ``cspa_max_n``.
* ``hgpa`` — hypergraph (clusters = hyperedges) + KaHyPar, on a sample when N is large.
* ``mcla`` — meta-clustering of the clusters (Jaccard graph + METIS), then voting.
* ``hbgf`` — bipartite object-cluster graph, spectral partition (Fern & Brodley 2004).

>>> import numpy as np
>>> truth = np.repeat(np.arange(3), 20)
>>> heads = np.stack([np.roll(np.arange(3), h)[truth] for h in range(5)])  # relabelled copies
>>> res = consensus(heads, 3, seed=0)
>>> float(res.anmi[res.method])
1.0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from imgclust.consensus.cspa import CSPA_MAX_N, cspa
from imgclust.consensus.ensemble import Ensemble, anmi, nmi_to_heads
from imgclust.consensus.hbgf import hbgf
from imgclust.consensus.hgpa import HGPA_SAMPLE, hgpa
from imgclust.consensus.mcla import mcla
from imgclust.errors import InputError
from imgclust.progress import progress_bar

METHODS = ("cspa", "hgpa", "mcla", "hbgf")


@dataclass
class ConsensusResult:
    labels: np.ndarray  # (N,) the chosen consensus, 0..K'-1 (K' <= K when a part stayed empty)
    method: str  # which consensus function produced it
    anmi: dict[str, float] = field(default_factory=dict)  # ANMI of every candidate that ran
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it did not run
    candidates: dict[str, np.ndarray] = field(default_factory=dict)  # every candidate labelling

    def summary(self) -> dict:
        return {"method": self.method, "anmi": {k: round(v, 6) for k, v in self.anmi.items()},
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "skipped": self.skipped}


def consensus(
    head_labels: np.ndarray,
    k: int,
    *,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    cspa_max_n: int = CSPA_MAX_N,
    hgpa_sample: int = HGPA_SAMPLE,
    progress: bool = False,
) -> ConsensusResult:
    """Consensus of ``head_labels`` (H, N) into ``k`` clusters; the candidate with the best ANMI wins.

    Ties in ANMI go to the earlier method in ``methods``. Candidates that cannot run (CSPA
    above ``cspa_max_n`` objects) are listed in ``skipped`` with the reason.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"unknown consensus method(s) {unknown or methods}; allowed: {', '.join(METHODS)}")
    if int(k) < 2:
        raise InputError(f"K must be at least 2, got {k}")
    ens = Ensemble.from_labels(head_labels)
    runners: dict[str, Callable[[], np.ndarray]] = {
        "cspa": lambda: cspa(ens, k, seed=seed, max_n=cspa_max_n),
        "hgpa": lambda: hgpa(ens, k, seed=seed, sample=hgpa_sample),
        "mcla": lambda: mcla(ens, k, seed=seed),
        "hbgf": lambda: hbgf(ens, k, seed=seed),
    }
    res = ConsensusResult(labels=np.zeros(0, np.int64), method="")
    bar = progress_bar(len(methods), "consensus", unit="method", enable=progress)
    for m in methods:
        if m == "cspa" and ens.n_objects > cspa_max_n:
            res.skipped[m] = f"N={ens.n_objects} > cspa_max_n={cspa_max_n} (CSPA builds an N x N similarity)"
            bar.update(1)
            continue
        t0 = time.perf_counter()
        lab = np.unique(runners[m](), return_inverse=True)[1].astype(np.int64)
        res.seconds[m] = time.perf_counter() - t0
        res.anmi[m] = anmi(ens, lab)
        res.candidates[m] = lab
        bar.set_postfix(method=m, anmi=f"{res.anmi[m]:.4f}")
        bar.update(1)
    bar.close()
    best = max(res.anmi, key=lambda m: (res.anmi[m], -methods.index(m)))
    res.method, res.labels = best, res.candidates[best]
    return res


def consensus_once(head_labels: np.ndarray, k: int, **kw) -> ConsensusResult:
    """:func:`consensus`, computed once under torchrun (issue 20): rank 0 runs it and broadcasts the result
    (labels and summary; the candidates stay on rank 0, the only rank that writes), while the other ranks
    wait. Every rank holds the same head labels, so before this every rank computed the same consensus:
    on one machine P copies shared its cores (P times the CPU and the memory). In one process: consensus."""
    from imgclust.train import dist

    if dist.world_size() == 1:
        return consensus(head_labels, k, **kw)
    res = consensus(head_labels, k, **kw) if dist.is_main() else None
    slim = None if res is None else ConsensusResult(res.labels, res.method, res.anmi, res.seconds, res.skipped)
    got = dist.broadcast_object(slim)
    return res if res is not None else got


__all__ = ["METHODS", "ConsensusResult", "Ensemble", "anmi", "consensus", "consensus_once", "nmi_to_heads"]
