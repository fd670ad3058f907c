"""Optimisers, learning-rate schedules and the EMA update shared by every training loop.

One no-decay rule (:func:`param_groups`): biases and 1-D parameters (norm weights, BatchNorm /
LayerNorm affine, weight-norm gains) get no weight decay, everything else gets ``weight_decay``
— DINO's / TEMI's ``get_params_groups`` rule, which the three copies in this package followed
with small differences (name suffix only, ndim only, both).

Schedules are per-step arrays (:func:`schedule`): ``constant``, ``cosine`` (base -> final over
all steps, SGDR without restarts, Loshchilov & Hutter 2017 eq. 5), ``warmup-cosine`` (linear
0 -> base over the warm-up steps, then cosine base -> final: DINO/TEMI's ``cosine_scheduler``)
and ``step`` (base x gamma at each milestone). The loop writes ``values[step]`` into every
parameter group's ``lr`` (times the group's ``lr_scale``, 1 by default) before the step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from imgclust.errors import InputError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup-cosine", "step")


def no_decay(name: str, p: torch.Tensor) -> bool:
    """The one rule: biases and 1-D parameters (norm weights) get no weight decay."""
    return name.endswith("bias") or p.ndim <= 1


def param_groups(model: nn.Module | Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Two groups (decay, no decay) of the trainable parameters, in ``named_parameters`` order.

    Example::

        >>> import torch
        >>> g = param_groups(torch.nn.Linear(3, 2), 0.1)
        >>> [(len(x["params"]), x["weight_decay"]) for x in g]
        [(1, 0.1), (1, 0.0)]
    """
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    decay, plain = [], []
    for name, p in named:
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(kind: str, params: nn.Module | list[dict], *, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``sgd`` | ``adam`` | ``adamw`` over :func:`param_groups` (or given groups).

    A module gets the no-decay rule; a list of groups is used as given (each group's own
    ``weight_decay`` wins). ``adam`` keeps torch's L2-in-the-gradient decay, ``adamw`` decouples it.
    """
    if kind not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")
    if not lr > 0:
        raise InputError(f"lr must be > 0; got {lr}")
    if weight_decay < 0:
        raise InputError(f"weight_decay must be >= 0; got {weight_decay}")
    groups = param_groups(params, weight_decay) if isinstance(params, nn.Module) else params
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def schedule(kind: str, base: float, total: int, *, final: float = 0.0, warmup: int = 0,
             milestones: Sequence[int] = (), gamma: float = 0.1) -> np.ndarray:
    """Per-step values (length ``total``) of a learning-rate (or any) schedule.

    Example::

        >>> schedule("warmup-cosine", 1.0, 6, warmup=2, final=0.0).round(3).tolist()
        [0.0, 0.5, 1.0, 0.854, 0.5, 0.146]
        >>> schedule("step", 1.0, 4, milestones=[2], gamma=0.1).tolist()
        [1.0, 1.0, 0.1, 0.1]
    """
    if kind not in SCHEDULES:
        raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}; got {kind!r}")
    total = int(total)
    if total < 0 or warmup < 0:
        raise InputError(f"schedule needs total >= 0 and warmup >= 0; got {total}, {warmup}")
    if kind == "constant":
        return np.full(total, float(base))
    if kind == "step":
        steps = np.arange(total)
        return float(base) * float(gamma) ** np.searchsorted(np.sort(np.asarray(milestones)), steps, side="right")
    warm = np.linspace(0.0, base, warmup, endpoint=False) if kind == "warmup-cosine" and warmup > 0 else np.zeros(0)
    rest = max(total - len(warm), 1)
    t = np.arange(rest) / rest
    return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))])[:total]


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float, *, copy_buffers: bool = False) -> None:
    """target <- m * target + (1 - m) * source for every parameter, in one fused ``_foreach`` call
    (many heads = one program, not one per head).

    Buffers (BatchNorm running statistics) are left alone unless ``copy_buffers``: TEMI's
    teacher runs in training mode on the same batches and keeps its own.
    """
    tp = list(target.parameters())
    sp = [p.detach() for p in source.parameters()]
    torch._foreach_lerp_(tp, sp, 1.0 - float(momentum))
    if copy_buffers:
        for tb, sb in zip(target.buffers(), source.buffers(), strict=True):
            tb.copy_(sb)
