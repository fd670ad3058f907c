"""Process-group helpers for data-parallel work under ``torchrun`` (NCCL on GPU, gloo on CPU).

Every function is a no-op (or the identity) in a single process, so callers never branch on
whether they run distributed. Statistics that span the batch (cluster-prior EMAs, Sinkhorn-Knopp
marginals, teacher-agreement weights) go through :func:`all_reduce_sum` / :func:`all_reduce_mean` /
:func:`all_gather_cat` so that P processes with a per-rank batch B compute what one process computes
on the global batch P x B.
"""

from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as d

    return d if d.is_available() and d.is_initialized() else None


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    """True on rank 0 (the only rank that writes outputs)."""
    return rank() == 0


def launched() -> bool:
    """True when started by torchrun with more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment; False in one process."""
    if not launched():
        return False
    import torch.distributed as d

    if not d.is_initialized():
        d.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shutdown() -> None:
    """Tear the process group down (call before the process exits)."""
    d = _dist()
    if d:
        d.destroy_process_group()


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place, and return it."""
    d = _dist()
    if d:
        d.all_reduce(t, op=d.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks, in place, and return it."""
    d = _dist()
    if d:
        d.all_reduce(t, op=d.ReduceOp.SUM)
        t /= d.get_world_size()
    return t


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on every rank) along ``dim``, in rank order.
    Gradients do not flow through the other ranks' parts."""
    d = _dist()
    if not d:
        return t
    parts = [torch.empty_like(t) for _ in range(d.get_world_size())]
    d.all_gather(parts, t.contiguous())
    parts[d.get_rank()] = t
    return torch.cat(parts, dim=dim)


def all_reduce_grads(params) -> None:
    """Average the gradients of ``params`` over ranks (the data-parallel step, without DDP's
    wrapper so batched multi-head modules and step functions stay plain)."""
    d = _dist()
    if not d:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    d.all_reduce(flat, op=d.ReduceOp.SUM)
    flat /= d.get_world_size()
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i : i + n].view_as(g))
        i += n


def shard(n: int, r: int | None = None, w: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that rank ``r`` of ``w`` owns (deterministic)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    lo = n * r // w
    hi = n * (r + 1) // w
    return range(lo, hi)
