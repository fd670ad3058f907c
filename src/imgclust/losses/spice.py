"""SPICE-Self's losses and prototype pseudo-labelling, as pure functions of head outputs.

Notation of the SPICE paper (Niu et al., "SPICE: Semantic Pseudo-labeling for Image
Clustering", IEEE TIP 2022), section 3.2. For a pool of M images with embeddings
F = [f_i] (M x D; here the L2-normalised frozen features of the original images) and head
predictions P = [P_ic] (M x k) on their weakly augmented views:

Eq. (1), the n_t = r M / k most confident samples of each cluster (r = 0.5)::

    id_c = indices of the n_t largest P_ic over i

Eq. (2), the cluster prototypes::

    gamma_c = (1 / n_t) sum_{i in id_c} f_i

Eq. (3), pseudo-labels: the n = M / k samples most cosine-similar to gamma_c get label c.
With *overlap* assignment (the paper's default, better in its Table 4) a sample may be
among the nearest of several prototypes and then appears once per label; with
*non-overlap* assignment every sample gets at most one label (clusters take their nearest
free samples in turn, in a random order per pool, as the reference code's
``select_samples_v2`` does in the fixed order 0..k-1).

Eq. (4), the double-softmax cross-entropy on the labelled strong views (mini-batch m_2)::

    p_i  = softmax(z_i)              (the head's output, z_i its logits)
    p'_i = softmax(p_i)              = e^{p_i} / sum_j e^{p_j}
    L_DSCE = -(1 / m_2) sum_i log p'_{i, L_i}

Since p_i in [0, 1], p'_ic lies in [1 / (k - 1 + e), e / (k - 1 + e)], so each term lies in
[log(k - 1 + e) - 1, log(k - 1 + e)] and never reaches 0: the loss keeps pushing p_i
towards one-hot. The ablation variants (paper Table 4): plain CE on z, and CE on z / T
(temperature CE, T = 0.2).

Example::

    >>> import torch
    >>> z = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    >>> [round(v, 3) for v in cluster_loss(z, torch.tensor([0, 1]), "dsce").tolist()]
    [0.574, 0.574]
    >>> [round(v, 3) for v in dsce_bounds(3)]
    [0.551, 1.551]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imgclust.errors import InputError

LOSSES = ("dsce", "ce", "tce")


def double_softmax_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample DS-CE, Eq. (4): -log softmax(softmax(z))[L]; logits (..., K), targets (...) -> (...)."""
    p = torch.softmax(logits.float(), dim=-1)
    return -torch.log_softmax(p, dim=-1).gather(-1, targets[..., None].long()).squeeze(-1)


def dsce_bounds(n_clusters: int) -> tuple[float, float]:
    """The range of one DS-CE term: [log(k - 1 + e) - 1, log(k - 1 + e)] (paper, after Eq. (4))."""
    c = math.log(n_clusters - 1 + math.e)
    return c - 1.0, c


def cluster_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "dsce", temperature: float = 0.2) -> torch.Tensor:
    """Per-sample loss of SPICE-Self's training step: ``dsce`` (default), ``ce`` or ``tce`` (CE on z / T)."""
    if kind == "tce" and not temperature > 0:
        raise InputError(f"temperature must be > 0; got {temperature}")
    if kind == "dsce":
        return double_softmax_ce(logits, targets)
    if kind == "ce":
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten().long(), reduction="none").view(targets.shape)
    if kind == "tce":
        z = logits.float() / temperature
        return F.cross_entropy(z.flatten(0, -2), targets.flatten().long(), reduction="none").view(targets.shape)
    raise InputError(f"unknown loss {kind!r}; allowed: {', '.join(LOSSES)}")


def cluster_probs(logits: torch.Tensor, kind: str = "dsce", temperature: float = 0.2) -> torch.Tensor:
    """The head's cluster probabilities p: softmax(z), or softmax(z / T) for the temperature CE."""
    z = logits.float() / temperature if kind == "tce" else logits.float()
    return torch.softmax(z, dim=-1)


# --------------------------------------------------------------------------- pseudo-labels
def prototypes(probs: torch.Tensor, embeddings: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Eqs. (1)-(2): per head, the mean embedding of each cluster's n_t = r M / k most confident samples.

    ``probs`` (H, M, K), ``embeddings`` (M, D) -> prototypes (H, K, D). Computed as one matrix
    product with a (H*K, M) averaging matrix, so memory stays O(H K M + K D) even for M = N.
    """
    if probs.dim() != 3 or embeddings.dim() != 2 or probs.shape[1] != embeddings.shape[0]:
        raise InputError(f"prototypes need probs (H, M, K) and embeddings (M, D); got {tuple(probs.shape)} "
                         f"and {tuple(embeddings.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise InputError(f"ratio must be in (0, 1]; got {ratio}")
    h, m, k = probs.shape
    n_t = max(1, min(m, int(ratio * m / k)))
    top = probs.topk(n_t, dim=1).indices  # (H, n_t, K): the n_t largest P_ic per (head, cluster)
    weights = torch.zeros(h, k, m, dtype=embeddings.dtype, device=embeddings.device)
    weights.scatter_(2, top.permute(0, 2, 1), 1.0 / n_t)
    return torch.einsum("hkm,md->hkd", weights, embeddings)


def prototype_pseudo_labels(
    probs: torch.Tensor,
    embeddings: torch.Tensor,
    ratio: float = 0.5,
    overlap: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (3): the n = M // k samples nearest (cosine) to each prototype get its label.

    ``probs`` (H, M, K) head predictions on the pool's weak views; ``embeddings`` (M, D)
    L2-normalised features of the original images. Returns ``(index, label)``, each (H, K*n)
    int64: position in the pool and pseudo-label, grouped by cluster (label c occupies
    columns c*n .. (c+1)*n - 1). With ``overlap=False`` a sample is labelled at most once per
    head: the clusters take their nearest free samples in turn, in a random cluster order
    (``generator``).
    """
    h, m, k = probs.shape
    n = max(1, m // k)
    gamma = F.normalize(prototypes(probs, embeddings, ratio), dim=-1)
    sim = torch.einsum("hkd,md->hkm", gamma, embeddings)  # cosine similarity (embeddings are unit rows)
    labels = torch.arange(k, device=probs.device).repeat_interleave(n).expand(h, k * n)
    if overlap:
        idx = sim.topk(n, dim=2).indices  # (H, K, n)
        return idx.reshape(h, k * n), labels.clone()
    order = torch.randperm(k, generator=generator).tolist()
    taken = torch.zeros(h, m, dtype=torch.bool, device=probs.device)
    idx = torch.empty(h, k, n, dtype=torch.long, device=probs.device)
    heads = torch.arange(h, device=probs.device)[:, None]
    for c in order:  # K small steps, each vectorised over heads
        s = sim[:, c].masked_fill(taken, float("-inf"))
        pick = s.topk(min(n, m), dim=1).indices
        idx[:, c] = pick
        taken[heads, pick] = True
    return idx.reshape(h, k * n), labels.clone()


@torch.no_grad()
def selection_losses(logits: torch.Tensor, embeddings: torch.Tensor, kind: str = "dsce", temperature: float = 0.2,
                     ratio: float = 0.5) -> torch.Tensor:
    """Each head's loss over the whole data (Algorithm 1's steps 1-3 with M = N on the original
    images, overlap assignment): SPICE-Self's label-free head and epoch selection, (H,).

    ``logits`` (H, N, K) of every head on every image; ``embeddings`` (N, D) L2-normalised.

    Example::

        >>> import torch
        >>> z = torch.tensor([[[4.0, 0.0], [0.0, 4.0], [3.0, 0.0], [0.0, 3.0]]])
        >>> f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]), dim=1)
        >>> selection_losses(z, f).shape
        torch.Size([1])
    """
    probs = cluster_probs(logits, kind, temperature)
    idx, lab = prototype_pseudo_labels(probs, embeddings, ratio, overlap=True)
    sel = logits.gather(1, idx[:, :, None].expand(-1, -1, logits.shape[-1]))
    return cluster_loss(sel, lab, kind, temperature).mean(dim=1)


# --------------------------------------------------------------------------- Algorithm 1's schedule
def default_pool_size(k: int) -> int:
    """The paper's M: 1,000 / 1,500 / 2,000 / 5,000 for 10 / 15 / 20 / 200 clusters, i.e. 100 k capped at 5,000."""
    return int(min(max(100 * k, 1000), 5000))


def pool_and_batch(k: int, n: int, pool_size: int = 0, batch_size: int = 0) -> tuple[int, int, int]:
    """(M, m_2, pools per epoch): M = ``pool_size`` or the paper's value for K (capped at N), m_2 =
    ``batch_size`` or the paper's 128 (256 from K = 200), floor(N / M) pools (at least one).

    Example::

        >>> pool_and_batch(10, 50_000), pool_and_batch(200, 3_000), pool_and_batch(10, 1_000, 300, 64)
        ((1000, 128, 50), (3000, 256, 1), (300, 64, 3))
    """
    m = min(pool_size or default_pool_size(k), n)
    return m, batch_size or (256 if k >= 200 else 128), max(1, n // m)


def pools(n: int, m: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Algorithm 1's pools of one epoch: floor(N / M) disjoint random sets of M rows (at least one).

    Example::

        >>> import torch
        >>> p = pools(10, 4, torch.Generator().manual_seed(0))
        >>> [len(q) for q in p], len(set(torch.cat(p).tolist()))
        ([4, 4], 8)
    """
    perm = torch.randperm(n, generator=generator)
    return [perm[b * m:(b + 1) * m] for b in range(max(1, n // m))]


def pool_steps(index: torch.Tensor, labels: torch.Tensor, batch_size: int, repeats: int = 1,
               generator: torch.Generator | None = None):
    """Step 3's mini-batches of a pool: ``repeats`` passes, each a random order of the (H, K*n)
    pseudo-labelled columns cut into floor(K*n / m_2) batches (at least one); yields (H, m_2)
    pool positions and labels — each head its own samples.

    Example::

        >>> import torch
        >>> idx, lab = torch.arange(12).view(2, 6), torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
        >>> [tuple(b.shape) for b, _ in pool_steps(idx, lab, 4, repeats=2)]
        [(2, 4), (2, 4)]
    """
    steps = max(1, index.shape[1] // batch_size)
    for _ in range(repeats):
        order = torch.randperm(index.shape[1], generator=generator).to(index.device)
        for st in range(steps):
            cols = order[st * batch_size:(st + 1) * batch_size]
            yield index[:, cols], labels[:, cols]


def epoch_selection(select_loss: torch.Tensor, best_loss: float) -> tuple[dict, dict | None]:
    """The per-epoch (epoch, head) rule: this epoch's history record of the heads' selection losses
    (:func:`selection_losses`, (H,)) and, when its best head beats ``best_loss``, the new best
    (``best_loss``, ``best_head``, ``head_losses``); else None.

    Example::

        >>> import torch
        >>> epoch_selection(torch.tensor([0.9, 0.7]), 0.8)
        ({'select_loss': [0.9, 0.7], 'best_head_per_epoch': 1}, {'best_loss': 0.699999988079071, 'best_head': 1, 'head_losses': tensor([0.9000, 0.7000])})
        >>> epoch_selection(torch.tensor([0.9, 0.7]), 0.5)[1] is None
        True
    """
    best = int(select_loss.argmin())
    record = {"select_loss": [round(float(v), 5) for v in select_loss], "best_head_per_epoch": best}
    if not float(select_loss.min()) < best_loss:
        return record, None
    return record, {"best_loss": float(select_loss.min()), "best_head": best, "head_losses": select_loss}
