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


def backend() -> str:
    """The process group's backend: gloo on CPU; with a GPU, NCCL for CUDA tensors *and* gloo for CPU
    ones. NCCL alone refuses CPU tensors, and some collectives here are on CPU tensors even when the
    heads train on GPUs (the extraction's start flag, CPU-second totals, heads run with --device cpu)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment; False in one process."""
    if not launched():
        return False
    import torch.distributed as d

    if not d.is_initialized():
        # issue 20: ranks wait on barriers while rank 0 alone mines neighbours (> 1 h at 10M rows on 2
        # cores) or the slowest rank finishes its extraction shard; torch's default 30 min would abort them
        from datetime import timedelta

        timeout = timedelta(seconds=float(os.environ.get("IMGCLUST_DIST_TIMEOUT_S", 6 * 3600)))
        d.init_process_group(backend(), timeout=timeout)
    return True


def shutdown(ordered: bool = True) -> None:
    """Tear the process group down (call before the process exits).

    ``ordered`` (the normal end of a job): first wait until every rank has got here, so no rank closes
    its gloo connections while a peer still works with the group; a rank that tears down while its
    peer is still in a collective or in its own teardown can abort in gloo's threads ("terminate called
    without an active exception"). After an error, ``ordered=False``: the other ranks may never arrive.
    """
    d = _dist()
    if d:
        if ordered:
            d.barrier()
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


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable) on every rank, ``obj`` itself in one process (issue 20: a result
    computed once, e.g. the consensus, instead of P identical copies competing for one machine's cores)."""
    d = _dist()
    if not d:
        return obj
    box = [obj if d.get_rank() == src else None]
    nccl_only = str(d.get_backend()) == "nccl"  # NCCL alone moves the pickled bytes through this rank's GPU
    d.broadcast_object_list(box, src=src,
                            device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if nccl_only else None)
    return box[0]


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


class _SumOverRanks(torch.autograd.Function):
    """A sum over ranks that gradients flow through (the backward of a sum is the sum of the gradients).

    Written here rather than ``torch.distributed.nn.functional.all_reduce``: that one is deprecated
    (a FutureWarning on every call), and its replacement, ``_functional_collectives``, is private API.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as d

        y = x.clone(memory_format=torch.contiguous_format)
        d.all_reduce(y, op=d.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _SumOverRanks.apply(grad)


def batch_norm(bn: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` with the batch statistics of the *global* batch (every rank's rows), in training mode.

    ``torch.nn.SyncBatchNorm`` does this on GPUs but refuses CPU tensors ("expected input tensor
    to be on GPU"), so on gloo it is written here: the mean, then the biased variance around it
    (two passes, as BatchNorm computes them), each summed over ranks with the *differentiable*
    :class:`_SumOverRanks` — its backward sums the statistics' gradients over ranks, so after
    :func:`all_reduce_grads` every parameter has the single-process gradient of the global batch.
    Running statistics are updated as BatchNorm does (unbiased variance of the global batch).
    One process, eval mode or no running process group: plain ``bn(x)``.
    """
    d = _dist()
    if d is None or d.get_world_size() == 1 or not bn.training:
        return bn(x)
    all_reduce = _SumOverRanks.apply
    n = all_reduce(torch.tensor([float(x.shape[0])], dtype=x.dtype, device=x.device))
    mean = all_reduce(x.sum(0)) / n
    var = all_reduce(((x - mean) ** 2).sum(0)) / n  # biased, as the normalisation uses
    y = (x - mean) / torch.sqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=m)
    return y
