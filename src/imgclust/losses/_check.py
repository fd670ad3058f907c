"""Argument checks shared by the loss modules: one-line :class:`~imgclust.errors.InputError`
messages (a ``ValueError``) that name the argument and the allowed values."""

from __future__ import annotations

import torch

from imgclust.errors import InputError


def positive(name: str, value: float) -> None:
    """``value`` must be a finite number > 0 (temperatures, weights of a ratio)."""
    if not (isinstance(value, (int, float)) and 0.0 < float(value) < float("inf")):
        raise InputError(f"{name} must be a number > 0; got {value!r}")


def non_negative(name: str, value: float) -> None:
    """``value`` must be a finite number >= 0 (loss weights, thresholds)."""
    if not (isinstance(value, (int, float)) and 0.0 <= float(value) < float("inf")):
        raise InputError(f"{name} must be a number >= 0; got {value!r}")


def matrix(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None, min_rows: int = 1) -> None:
    """``t`` must be a 2-d tensor (rows x cols when given) with at least ``min_rows`` rows."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(f"{name} must be a 2-d tensor (N, D); got {shape}")
    if rows is not None and t.shape[0] != rows or cols is not None and t.shape[1] != cols:
        raise InputError(f"{name} must have shape ({rows if rows is not None else 'N'}, "
                         f"{cols if cols is not None else 'D'}); got {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise InputError(f"{name} needs at least {min_rows} rows; got {t.shape[0]}")


def labels(name: str, t: torch.Tensor, n: int) -> None:
    """``t`` must be n integer labels (the range is left to ``cross_entropy``: checking it here
    would synchronise with the accelerator every step)."""
    if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(f"{name} must be {n} integer labels; got {shape}")
