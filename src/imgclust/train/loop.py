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

3. inside an epoch that runs longer than ``spec.checkpoint_every_s`` (default
   :data:`MID_EPOCH_CHECKPOINT_S`, 10 minutes): a mid-epoch checkpoint every that many seconds,
   which also holds the step within the epoch, the epoch's running sums, and the RNG states at
   the epoch's start (issue 20: one epoch of 50 heads on 10M rows is ~1.6 h of two cores, and an
   epoch-level checkpoint alone would lose all of it to a kill).

On start the loop loads a matching checkpoint and continues after its last finished epoch, or
inside the epoch it was saved in, so a run killed at any point resumes to bit-identical
parameters and history: batches of an epoch are drawn either from generators restored to their
state at that epoch's start, or from a permutation derived from ``(seed, epoch)`` alone
(:func:`epoch_permutation`). A mid-epoch resume rebuilds the epoch's batch iterator from the
start-of-epoch RNG states, skips the batches already trained on, then restores the RNG states
saved at the checkpoint, so the draws made inside the steps (neighbours, augmentations, dropout)
continue where they stopped.
"""

from __future__ import annotations

import itertools
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

MID_EPOCH_CHECKPOINT_S = 600.0  # seconds between mid-epoch checkpoints (only epochs longer than this get one)


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
    checkpoint_every_s: float | None = None  # mid-epoch checkpoints (None: MID_EPOCH_CHECKPOINT_S; <= 0: every step)
    steps_per_epoch: int | None = None  # known: the progress bar counts steps (ETA inside a long epoch)


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
    resumed_at_step: int | None = None  # the global step a mid-epoch checkpoint resumed at (None: none)


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


def _rng_states(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    return {"generators": [g.get_state() for g in generators], "torch_rng": torch.get_rng_state(),
            "numpy_rng": _np_state()}


def _set_rng_states(generators: Sequence[torch.Generator], s: Mapping[str, Any]) -> None:
    for g, gs in zip(generators, s["generators"], strict=True):
        g.set_state(gs)
    torch.set_rng_state(s["torch_rng"])
    _set_np_state(s["numpy_rng"])


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
    resumed_at_step = None
    partial: dict[str, Any] | None = None
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        for name, m in mods.items():
            m.load_state_dict(saved["modules"][name])
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_states(generators, saved)
        devices = {k: v.device for k, v in state.items() if isinstance(v, torch.Tensor)}
        state.clear()
        state.update({k: v.to(devices[k]) if k in devices and isinstance(v, torch.Tensor) else v
                      for k, v in saved["state"].items()})
        history = saved["history"]
        epoch_s = list(saved["epoch_s"])
        step, start = int(saved["step"]), int(saved["epoch"])
        resumed_from = start
        partial = saved.get("partial")  # a mid-epoch checkpoint: epoch `start` is under way

    every = MID_EPOCH_CHECKPOINT_S if spec.checkpoint_every_s is None else float(spec.checkpoint_every_s)
    saving = checkpoint is not None and checkpoint.path is not None and dist.is_main()

    def payload(epoch_done: int) -> dict[str, Any]:
        return {"epoch": epoch_done, "step": step, "history": history, "epoch_s": epoch_s, "state": state,
                "modules": {k: m.state_dict() for k, m in mods.items()}, "optimizer": optimizer.state_dict(),
                **_rng_states(generators)}

    lr = None if spec.lr is None else np.asarray(spec.lr, dtype=np.float64)
    per = int(spec.steps_per_epoch or 0)  # > 0: the bar counts steps, not epochs
    done = min(start, spec.epochs)
    bar = (progress_bar(spec.epochs * per, spec.name, unit="step",
                        initial=done * per + (int(partial["it"]) if partial is not None and done < spec.epochs else 0),
                        enable=spec.progress) if per > 0 else
           progress_bar(spec.epochs, spec.name, unit="epoch", initial=done, enable=spec.progress))
    try:
        for epoch in range(start, spec.epochs):
            sums: dict[str, float] = {}
            n_steps = skip = 0
            elapsed = 0.0
            if partial is not None and int(partial["epoch"]) == epoch:
                _set_rng_states(generators, partial["at_start"])
                sums, n_steps = {k: float(v) for k, v in partial["sums"].items()}, int(partial["n_steps"])
                skip, elapsed = int(partial["it"]), float(partial["elapsed"])
                resumed_at_step = step
            at_start = _rng_states(generators)
            t0 = time.perf_counter() - elapsed
            last_save = time.perf_counter()
            it_batches = iter(batches(epoch))
            if skip:  # the batches trained on before the checkpoint: drawn again (same RNG), not trained on
                for _ in itertools.islice(it_batches, skip):
                    pass
                _set_rng_states(generators, saved)  # back to the states at the checkpoint
            partial = None
            info = StepInfo(epoch, step, skip, state)
            for it, batch in enumerate(it_batches, start=skip):
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
                if saving and time.perf_counter() - last_save >= every:
                    checkpoint.save({**payload(epoch), "partial": {
                        "epoch": epoch, "it": it + 1, "sums": dict(sums), "n_steps": n_steps,
                        "elapsed": time.perf_counter() - t0, "at_start": at_start}})
                    last_save = time.perf_counter()
                    bar.set_postfix({"epoch": f"{epoch + 1}/{spec.epochs}", "saved": time.strftime("%H:%M")})
                if per > 0:
                    bar.update(1)
            means = {k: v / max(n_steps, 1) for k, v in sums.items()}
            for k, v in means.items():
                history.setdefault(k, []).append(v)
            extra = on_epoch_end(epoch, means, StepInfo(epoch, step, n_steps, state)) if on_epoch_end else None
            for k, v in (extra or {}).items():
                history.setdefault(k, []).append(v)
            epoch_s.append(round(time.perf_counter() - t0, 3))
            if saving:
                checkpoint.save(payload(epoch + 1))
            shown = tuple(spec.postfix) or ("loss",)
            bar.set_postfix({k: f"{means[k]:.4f}" for k in shown if k in means})
            if per <= 0:
                bar.update(1)
    finally:
        bar.close()
    return LoopResult(history, step, resumed_from, epoch_s, resumed_at_step)
