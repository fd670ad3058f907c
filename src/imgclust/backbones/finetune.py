"""Fine-tuning a pretrained backbone: which parameters train, a trainable copy, and a copy with
saved tuned weights.

:func:`trainable_copy` is the one place that turns the estimator's frozen backbone into a
trainable one (a deep copy: the shared backbone stays frozen), used by ICBPL
``finetune=last_blocks|all``, ICSR ``mode=end_to_end`` and SPICE ``semi_mode=end_to_end``.
Methods that fine-tune keep only the parameters they trained (``name -> tensor``) in their
state; :func:`finetuned_copy` puts them back into a copy of the estimator's pretrained
backbone for prediction from images.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from imgclust.errors import InputError

FINETUNE_SCOPES = ("last_blocks", "all")


def trainable_parameters(backbone: nn.Module, mode: str, n_blocks: int) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that ``mode`` trains: ``all``, or the last ``n_blocks`` blocks/stages
    (``last_blocks``: EfficientNet blocks + conv head, ViT blocks + final norm, ResNet stages);
    InputError for a backbone without parameters or with an unknown layout."""
    named = list(backbone.named_parameters())
    if not named:
        raise InputError(f"backbone {getattr(backbone, 'name', '?')!r} has no parameters to fine-tune; use finetune=head")
    if mode == "all":
        return named
    if mode != "last_blocks":
        raise InputError(f"unknown fine-tuning scope {mode!r}; use one of {', '.join(FINETUNE_SCOPES)}")
    prefixes: list[str]
    net = getattr(backbone, "net", None)
    if net is not None and hasattr(net, "_blocks"):  # EfficientNet(-Lite)
        nb = len(net._blocks)
        prefixes = [f"net._blocks.{i}." for i in range(max(0, nb - n_blocks), nb)] + ["net._conv_head.", "net._bn1."]
    elif isinstance(getattr(backbone, "blocks", None), nn.ModuleList):  # ViT
        nb = len(backbone.blocks)
        prefixes = [f"blocks.{i}." for i in range(max(0, nb - n_blocks), nb)] + ["norm."]
    elif hasattr(backbone, "layer4"):  # ResNet stages, last first
        stages = ["layer4", "layer3", "layer2", "layer1"][:n_blocks]
        prefixes = [f"{s}." for s in stages]
    else:
        raise InputError(f"finetune=last_blocks does not know the layer layout of backbone "
                         f"{getattr(backbone, 'name', '?')!r}; use finetune=all or head")
    out = [(n, p) for n, p in named if any(n.startswith(pf) for pf in prefixes)]
    if not out:
        raise InputError(f"no parameters found in the last {n_blocks} blocks of {getattr(backbone, 'name', '?')!r}")
    return out


def trainable_copy(backbone: nn.Module, scope: str = "all", n_blocks: int = 2, *,
                   device: torch.device | str | None = None, allow_empty: bool = False) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """A deep copy of a frozen ``backbone`` (moved to ``device`` when given, in eval mode: BatchNorm
    statistics and stochastic depth of the pretrained model) whose ``scope`` parameters (``all`` or
    the ``last_blocks``: see :func:`trainable_parameters`) have gradients on, every other parameter
    off; returns the copy and those ``(name, parameter)`` pairs. The original is never modified.
    A backbone without parameters (``pixels``) raises InputError, or gives an empty list with
    ``allow_empty`` (a caller whose head trains anyway)."""
    bb = copy.deepcopy(backbone)
    if device is not None:
        bb = bb.to(device)
    bb.eval().requires_grad_(False)
    empty = allow_empty and not any(True for _ in bb.parameters())
    named = [] if empty else trainable_parameters(bb, scope, n_blocks)
    for _, p in named:
        p.requires_grad_(True)
    return bb, named


def finetuned_copy(backbone: nn.Module, tuned: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """A frozen copy of ``backbone`` (on ``device``, eval mode) whose parameters named in ``tuned``
    are replaced by the fine-tuned values; InputError when they do not fit this backbone."""
    bb = copy.deepcopy(backbone).to(device).eval()
    bb.requires_grad_(False)
    own = dict(bb.named_parameters())
    missing = sorted(set(tuned) - set(own))
    if missing:
        raise InputError(f"the fine-tuned parameters do not fit backbone {getattr(backbone, 'name', '?')!r} "
                         f"(e.g. {missing[0]})")
    with torch.no_grad():
        for nm, t in tuned.items():
            if own[nm].shape != t.shape:
                raise InputError(f"fine-tuned parameter {nm} has shape {tuple(t.shape)}, backbone has "
                                 f"{tuple(own[nm].shape)}")
            own[nm].copy_(t)
    return bb


__all__ = ["FINETUNE_SCOPES", "finetuned_copy", "trainable_copy", "trainable_parameters"]
