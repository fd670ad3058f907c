"""Fine-tuning a pretrained backbone: which parameters train, and a copy with saved tuned weights.

Methods that fine-tune (ICBPL ``finetune=last_blocks|all``, ICSR ``mode=end_to_end``) keep only
the parameters they trained (``name -> tensor``) in their state; :func:`finetuned_copy` puts
them back into a copy of the estimator's pretrained backbone for prediction from images.
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


__all__ = ["FINETUNE_SCOPES", "finetuned_copy", "trainable_parameters"]
