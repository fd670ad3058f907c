"""ICSR sample ranking inside clusters (ICSR paper, sec. 3.1, Algorithm 1) and its diagnostics.

Score. For sample i of cluster c and a neighbourhood size k, with d(i, i_1) <= ... <= d(i, i_k)
the distances to its k nearest *cluster-mates* (itself excluded), Eq. (5)::

    M_k(i) = mean(d(i, i_1), ..., d(i, i_k)) + median(d(i, i_1), ..., d(i, i_k))

(median of an even count: the lower middle value, as ``torch.median``). A low M means a densely
populated neighbourhood, i.e. likely *signal* (the cluster's dominant class); a high M, noise.

Voting. M depends on k, so n sorted lists are formed for k in {k_0, k_0 + k^, ..., k_{n-1}}
(k_0 = ``k_start`` N_c, the largest k about ``k_stop`` N_c, step k^ = ``k_step``; paper:
1/3, 2/3, 5). For top fractions p_1 < ... < p_m (paper: 15/35/55/75/95 %), group g_j is the
ceil(p_j N_c) samples that appear most often in the top p_j of the n lists, minus the samples
already in g_1..g_{j-1}. Samples in none of the m groups (the last ~5 %) are returned with group
index m ("unranked"); ICSR gives them weight 0, as the paper's algorithm (and the reference
code) leaves them out of training. Ties in the vote count are broken by the mean position over
the n lists (the reference code's ``torch.topk`` breaks them arbitrarily).

Distances (``metric``): ``euclidean`` |x_i - x_j| (default, Eq. 1), ``cosine`` 1 - cos(x_i, x_j),
``kl`` KL(p_i || p_j) of rows that are probability vectors (rows that are not are turned into
distributions with a softmax, as the reference code does with all its vectors).

Memory. Distances exist only inside one cluster and only for a block of ``block_rows`` rows at a
time: the block's (B, N_c) distances are sorted, M_k for every k is read from the cumulative sum
(mean) and one gather (median), and only the (N_c, n) scores are kept. Peak memory is
O(B N_c + n N_c) per cluster, never O(N^2) over the data set; time O(N_c^2 D) per cluster.
(faiss would give the k nearest neighbours, but here k reaches 2/3 of the cluster, so the
sorted full row is what is needed; a blocked matmul + sort in torch is the direct way.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imgclust.errors import InputError

METRICS = ("euclidean", "cosine", "kl")
DEFAULT_PERCENTS = (15.0, 35.0, 55.0, 75.0, 95.0)


@dataclass
class Ranking:
    """Algorithm 1's result for every sample of a partition.

    ``group[i]`` in 0..m-1 (0 = most reliable) or m (in no group: weight 0);
    ``order[i]``: the sample's position in its cluster's final order (0 = most reliable; by group,
    then mean position over the n sorted lists), used for R_sr(p).
    """

    group: np.ndarray  # (N,) int64
    order: np.ndarray  # (N,) int64 rank inside its own cluster
    n_groups: int
    n_lists: dict[int, int] = field(default_factory=dict)  # cluster -> number of k values voted over
    info: dict[str, Any] = field(default_factory=dict)


def k_values(n_c: int, k_start: float = 1 / 3, k_stop: float = 2 / 3, k_step: int = 5) -> np.ndarray:
    """{k_0, k_0 + k^, ...}: k_0 = round(k_start N_c), last <= round(k_stop N_c); all in 1..N_c - 1."""
    if n_c < 2:
        return np.zeros(0, dtype=np.int64)
    hi = max(1, min(n_c - 1, int(round(k_stop * n_c))))
    lo = max(1, min(hi, int(round(k_start * n_c))))
    return np.arange(lo, hi + 1, max(1, int(k_step)), dtype=np.int64)


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    a = np.asarray(x)
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))


def _prep(x: torch.Tensor, metric: str) -> torch.Tensor:
    x = x.double()  # distances of near-duplicates: float32 cancellation would reorder them
    if metric == "cosine":
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    if metric == "kl":
        is_prob = bool((x >= 0).all() & torch.allclose(x.sum(1), torch.ones(len(x), dtype=x.dtype), atol=1e-4))
        p = x if is_prob else torch.softmax(x, dim=1)
        return p.clamp(min=1e-12)
    return x


def _block_distances(a: torch.Tensor, b: torch.Tensor, metric: str, b_sq: torch.Tensor | None) -> torch.Tensor:
    """(len(a), len(b)) distances for prepared rows."""
    if metric == "euclidean":
        a_sq = (a * a).sum(1, keepdim=True)
        return (a_sq + b_sq[None] - 2.0 * a @ b.T).clamp_(min=0).sqrt_()
    if metric == "cosine":
        return (1.0 - a @ b.T).clamp_(min=0)
    # KL(p_a || p_b) = sum p_a log p_a - p_a . log p_b
    return ((a * a.log()).sum(1, keepdim=True) - a @ b.log().T).clamp_(min=0)


def m_scores(x: np.ndarray | torch.Tensor, ks: np.ndarray, *, metric: str = "euclidean",
             block_rows: int = 1024) -> torch.Tensor:
    """(N_c, n) scores M_k(i) of Eq. (5) for every sample of one cluster and every k in ``ks``.

    Computed in row blocks of ``block_rows``: memory O(block_rows N_c + n N_c).
    """
    if metric not in METRICS:
        raise InputError(f"unknown ranking metric {metric!r}; allowed: {', '.join(METRICS)}")
    xt = _prep(_as_tensor(x), metric)
    n_c = len(xt)
    ks_t = torch.as_tensor(np.asarray(ks, dtype=np.int64))
    if n_c < 2 or len(ks_t) == 0:
        return torch.zeros((n_c, len(ks_t)), dtype=torch.float64)
    if int(ks_t.max()) > n_c - 1 or int(ks_t.min()) < 1:
        raise InputError(f"k must lie in 1..{n_c - 1} for a cluster of {n_c}")
    b_sq = (xt * xt).sum(1) if metric == "euclidean" else None
    kmax = int(ks_t.max())
    out = torch.empty((n_c, len(ks_t)), dtype=torch.float64)
    for s in range(0, n_c, max(1, int(block_rows))):
        rows = torch.arange(s, min(s + block_rows, n_c))
        d = _block_distances(xt[rows], xt, metric, b_sq)
        d[torch.arange(len(rows)), rows] = math.inf  # itself is no neighbour
        near = torch.topk(d, kmax, dim=1, largest=False, sorted=True).values  # (B, kmax) ascending
        mean = near.cumsum(1)[:, ks_t - 1] / ks_t.double()
        median = near[:, (ks_t - 1) // 2]  # lower median of the k smallest
        out[rows] = mean + median
    return out


def vote_groups(scores: torch.Tensor, percents: tuple[float, ...] | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Majority voting of Algorithm 1 over the n sorted lists (columns of ``scores``, low = reliable).

    Returns (group (N_c,) in 0..m with m = no group, order (N_c,) final rank in the cluster).
    """
    n_c, n = scores.shape
    m = len(percents)
    group = np.full(n_c, m, dtype=np.int64)
    if n_c == 0:
        return group, np.zeros(0, dtype=np.int64)
    if n == 0:  # a cluster of one sample (or no k): nothing to compare it with, so it is trusted
        group[:] = 0
        return group, np.arange(n_c, dtype=np.int64)
    # position of every sample in every list (stable sort: equal scores keep index order)
    pos = torch.empty((n_c, n), dtype=torch.int64)
    srt = torch.argsort(scores, dim=0, stable=True)
    pos.scatter_(0, srt, torch.arange(n_c)[:, None].expand(n_c, n).contiguous())
    mean_pos = pos.double().mean(1).numpy()
    pos_np = pos.numpy()
    taken = np.zeros(n_c, dtype=bool)
    for j, p in enumerate(percents):
        top = min(n_c, int(math.ceil(p / 100.0 * n_c - 1e-9)))
        if top <= 0:
            continue
        votes = (pos_np < top).sum(1)
        best = np.lexsort((np.arange(n_c), mean_pos, -votes))[:top]  # most votes, then best mean position
        new = best[~taken[best]]
        group[new] = j
        taken[new] = True
    order = np.empty(n_c, dtype=np.int64)
    order[np.lexsort((np.arange(n_c), mean_pos, group))] = np.arange(n_c)
    return group, order


def rank_samples(
    x: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    n_clusters: int,
    *,
    percents: tuple[float, ...] | list[float] = DEFAULT_PERCENTS,
    k_start: float = 1 / 3,
    k_stop: float = 2 / 3,
    k_step: int = 5,
    metric: str = "euclidean",
    block_rows: int = 1024,
) -> Ranking:
    """Algorithm 1 in every cluster of ``labels``; distances on the rows of ``x`` (N, D)."""
    check_percents(percents)
    labels = np.asarray(labels, dtype=np.int64)
    xt = _as_tensor(x)
    if len(xt) != len(labels):
        raise InputError(f"ranking needs one label per row: {len(xt)} rows, {len(labels)} labels")
    group = np.full(len(labels), len(percents), dtype=np.int64)
    order = np.zeros(len(labels), dtype=np.int64)
    n_lists: dict[int, int] = {}
    for c in range(n_clusters):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        ks = k_values(len(idx), k_start, k_stop, k_step)
        sc = m_scores(xt[torch.from_numpy(idx)], ks, metric=metric, block_rows=block_rows)
        g, o = vote_groups(sc, percents)
        group[idx], order[idx] = g, o
        n_lists[c] = len(ks)
    return Ranking(group, order, len(percents), n_lists,
                   {"metric": metric, "percents": [float(p) for p in percents], "k_start": k_start,
                    "k_stop": k_stop, "k_step": k_step})


def check_percents(percents: Any) -> None:
    p = list(percents)
    if not p or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in p):
        raise InputError(f"percents must be a non-empty list of numbers, got {percents!r}")
    if any(not 0 < v <= 100 for v in p) or any(b <= a for a, b in zip(p[:-1], p[1:], strict=True)):
        raise InputError(f"percents must increase strictly and lie in (0, 100], got {p}")


def group_weights(n_groups: int, t: int, beta0: float = 0.02) -> np.ndarray:
    """Eq. (11): w_i(t) = 1 - ((i - 1) / m)^((1 + t) beta0) for groups i = 1..m (t = epoch from 0).

    w_1 = 1 always; w_2 > ... > w_m, each rising towards (never above) 1 as t grows.
    Returned with one extra trailing 0: the weight of samples in no group.
    """
    if n_groups < 1 or not beta0 > 0 or t < 0:
        raise InputError(f"weights need m >= 1, beta0 > 0 and t >= 0; got m={n_groups}, beta0={beta0}, t={t}")
    i = np.arange(1, n_groups + 1, dtype=np.float64)
    w = 1.0 - ((i - 1) / n_groups) ** ((1 + t) * beta0)
    return np.append(w, 0.0)


def success_rate(ranking: Ranking, pseudo: np.ndarray, truth: np.ndarray, n_clusters: int,
                 ps: tuple[int, ...] = (20, 40, 60, 80)) -> dict[str, Any]:
    """Ranking success rate R_sr(p) = S(p) / (S(p) + N(p)) (paper Eq. 15, Figure 3), per cluster.

    Signal = the cluster's dominant true class; S(p), N(p) = signal / noise samples among the
    top p % of the cluster's ranked samples. ``purity`` (R_sr of a random p %, the paper's
    Figure 3 first column) and the purity of each group are given for comparison. Labels are
    used for this diagnostic only.
    """
    pseudo = np.asarray(pseudo)
    truth = np.asarray(truth)
    per: list[dict[str, Any]] = []
    for c in range(n_clusters):
        idx = np.flatnonzero(pseudo == c)
        known = idx[truth[idx] >= 0]
        if len(known) == 0:
            continue
        dom = np.bincount(truth[known]).argmax()
        srt = known[np.argsort(ranking.order[known], kind="stable")]
        sig = truth[srt] == dom
        row = {"cluster": c, "size": int(len(idx)), "dominant": int(dom), "purity": float(sig.mean()),
               "rsr": {str(p): float(sig[:max(1, int(round(p / 100 * len(srt))))].mean()) for p in ps},
               "group_purity": [float((truth[known[ranking.group[known] == g]] == dom).mean())
                                if (ranking.group[known] == g).any() else None
                                for g in range(ranking.n_groups + 1)]}
        per.append(row)
    mean = {str(p): float(np.mean([r["rsr"][str(p)] for r in per])) if per else None for p in ps}
    return {"ps": list(ps), "mean_rsr": mean,
            "mean_purity": float(np.mean([r["purity"] for r in per])) if per else None,
            "per_cluster": per}
