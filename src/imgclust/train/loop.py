"""The one training loop: every method's epochs, steps, checkpoints and resume.

A method supplies a *step function* (batch -> loss, plus a dict of logged components) and a
per-epoch batch iterator; :func:`run_loop` does the rest, identically for all of them:

1. per step: learning rate from the schedule (``spec.lr[step]`` x the group's ``lr_scale``),
   ``zero_grad``, ``step_fn``, the non-finite check (:class:`~imgclust.nonfinite.NonFiniteLoss`
   names the option to lower, before a bad gradient reaches the weights), ``backward``,
   :func:`imgclust.train.dist.all_reduce_grads` (data parallel; a no-op in one process), optional
   gradient-norm clipping, ``optimizer.step()``, then the ``after_step`` hooks (teacher EMA ...);
2. per epoch: the mean of the loss and of every logged component into ``history``, the
   ``on_epoch_end`` hook's entries, the progress bar, and a checkpoint (rank 0 only) holding
   the modules, optimiser, step counter, history, the caller's ``state`` dict (running priors,
   accumulators), and the RNG states: torch's global generator, numpy's global generator and
   every ``generators`` entry (the generators that draw batches, neighbours, augmentations).

On start the loop loads a matching checkpoint and continues after its last finished epoch, so
a run killed at any point resumes to bit-identical parameters and history: batches of an epoch
are drawn either from generators restored to their state at that epoch's start, or from a
permutation derived from ``(seed, epoch)`` alone (:func:`epoch_permutation`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclust.nonfinite import check_finite
from imgclust.progress import progress_bar
from imgclust.train import dist
from imgclust.train.checkpoint import Checkpoint


@dataclass
class LoopSpec:
    """What the loop needs to know besides the model, the step and the batches."""

    epochs: int
    name: str = "train"  # progress-bar label and the stage in a non-finite error
    lr: Sequence[float] | np.ndarray | None = None  # per-step learning rate (None: leave the optimiser's)
    clip_grad_norm: float | None = None  # max global gradient norm (None: no clipping)
    option: str = "lr"  # the option a non-finite loss tells the user to lower ...
    option_value: Any = None  # ... and its current value
    progress: bool = True
    postfix: Sequence[str] = ()  # logged components shown on the progress bar (default: loss)


@dataclass
class StepInfo:
    """Passed to the step function and the hooks."""

    epoch: int
    step: int  # global step (0-based, counts across epochs and resumes)
    it: int  # step within the epoch
    state: dict[str, Any]  # the caller's carried state (checkpointed)


@dataclass
class LoopResult:
    history: dict[str, list]  # per-epoch means ("loss" and every logged component) + hook entries
    steps: int  # optimiser steps done in total
    resumed_from: int | None  # epochs already done in the loaded checkpoint (None: fresh start)
    epoch_s: list[float] = field(default_factory=list)  # wall seconds per epoch (not bit-reproducible)


StepOut = torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``n`` samples in ``epoch``: a function of (seed, epoch) only, so a resumed
    run draws exactly what an uninterrupted one draws."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def _np_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_np_state(s: Mapping[str, Any]) -> None:
    np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


def run_loop(
    model: nn.Module,
    step_fn: Callable[[Any, StepInfo], StepOut],
    batches: Callable[[int], Iterable[Any]],
    spec: LoopSpec,
    *,
    optimizer: torch.optim.Optimizer,
    after_step: Sequence[Callable[[StepInfo], None]] = (),
    on_epoch_end: Callable[[int, dict[str, float], StepInfo], Mapping[str, Any] | None] | None = None,
    modules: Mapping[str, nn.Module] | None = None,
    generators: Sequence[torch.Generator] = (),
    state: dict[str, Any] | None = None,
    checkpoint: Checkpoint | None = None,
) -> LoopResult:
    """Train ``model`` for ``spec.epochs`` epochs of ``batches(epoch)``; see the module doc.

    ``modules`` are further modules saved and restored with ``model`` (an EMA teacher);
    ``state`` is a dict the step function and hooks may update (tensors, numbers, lists) and
    that resumes with the run. ``on_epoch_end(epoch, means, info)`` may return entries to
    append to the history. Train/eval modes are the caller's (a frozen backbone stays in eval).
    """
    state = {} if state is None else state
    mods: dict[str, nn.Module] = {"model": model, **dict(modules or {})}
    params = [p for p in model.parameters() if p.requires_grad]
    history: dict[str, list] = {}
    epoch_s: list[float] = []
    step = 0
    start = 0
    resumed_from = None
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        for name, m in mods.items():
            m.load_state_dict(saved["modules"][name])
        optimizer.load_state_dict(saved["optimizer"])
        for g, s in zip(generators, saved["generators"], strict=True):
            g.set_state(s)
        torch.set_rng_state(saved["torch_rng"])
        _set_np_state(saved["numpy_rng"])
        devices = {k: v.device for k, v in state.items() if isinstance(v, torch.Tensor)}
        state.clear()
        state.update({k: v.to(devices[k]) if k in devices and isinstance(v, torch.Tensor) else v
                      for k, v in saved["state"].items()})
        history = saved["history"]
        epoch_s = list(saved["epoch_s"])
        step, start = int(saved["step"]), int(saved["epoch"])
        resumed_from = start

    lr = None if spec.lr is None else np.asarray(spec.lr, dtype=np.float64)
    bar = progress_bar(spec.epochs, spec.name, unit="epoch", initial=min(start, spec.epochs), enable=spec.progress)
    try:
        for epoch in range(start, spec.epochs):
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            n_steps = 0
            info = StepInfo(epoch, step, 0, state)
            for it, batch in enumerate(batches(epoch)):
                info = StepInfo(epoch, step, it, state)
                if lr is not None:
                    for g in optimizer.param_groups:
                        g["lr"] = float(lr[min(step, len(lr) - 1)]) * float(g.get("lr_scale", 1.0))
                optimizer.zero_grad(set_to_none=True)
                out = step_fn(batch, info)
                loss, logs = (out, {}) if isinstance(out, torch.Tensor) else out
                value = check_finite(loss, stage=spec.name, step=step, option=spec.option,
                                     option_value=spec.option_value)
                loss.backward()
                dist.all_reduce_grads(params)
                if spec.clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(params, spec.clip_grad_norm)
                optimizer.step()
                for hook in after_step:
                    hook(info)
                sums["loss"] = sums.get("loss", 0.0) + value
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + (float(v.detach()) if isinstance(v, torch.Tensor) else float(v))
                n_steps += 1
                step += 1
            means = {k: v / max(n_steps, 1) for k, v in sums.items()}
            for k, v in means.items():
                history.setdefault(k, []).append(v)
            extra = on_epoch_end(epoch, means, StepInfo(epoch, step, n_steps, state)) if on_epoch_end else None
            for k, v in (extra or {}).items():
                history.setdefault(k, []).append(v)
            epoch_s.append(round(time.perf_counter() - t0, 3))
            if checkpoint is not None and dist.is_main():
                checkpoint.save({
                    "epoch": epoch + 1, "step": step, "history": history, "epoch_s": epoch_s, "state": state,
                    "modules": {k: m.state_dict() for k, m in mods.items()},
                    "optimizer": optimizer.state_dict(),
                    "generators": [g.get_state() for g in generators],
                    "torch_rng": torch.get_rng_state(), "numpy_rng": _np_state(),
                })
            shown = tuple(spec.postfix) or ("loss",)
            bar.set_postfix({k: f"{means[k]:.4f}" for k in shown if k in means})
            bar.update(1)
    finally:
        bar.close()
    return LoopResult(history, step, resumed_from, epoch_s)
