"""Loading backbone weights safely: local files, official downloads, strict key checks.

Every checkpoint goes through ``torch.load(weights_only=True)`` (only tensors and plain
containers; a pickle that would run code is refused with a WeightsError), is unwrapped from
the usual training containers, stripped of wrapper prefixes and loaded strictly, so a file
for the wrong architecture fails with the keys that do not fit instead of loading half.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from imgclust.errors import InputError, WeightsError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def file_digest(path: str | Path, limit: int | None = None) -> str:
    """sha256 of a weights file (first ``limit`` bytes + size when given, for huge files)."""
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if limit is None:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(limit))
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (``weights_only=True``) and unwrap the usual containers.

    Accepts a plain state dict or one nested under ``state_dict``/``model``/``teacher``/
    ``student``; ``.safetensors`` files are read with the safetensors package when installed.
    A file that needs arbitrary code to unpickle is refused with a WeightsError.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - optional dependency
            raise WeightsError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from e
        return load_file(str(p))
    try:
        # Training checkpoints of DINO/MoCo/SwAV store their argparse options next to the
        # weights: allow that one plain-data class, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: refuse, never execute
        first = _ANSI.sub("", str(e)).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise WeightsError(f"refusing to load {p.name}: not a plain weights file ({type(e).__name__}: {first})") from e
    return unwrap_state_dict(obj, p.name)


RANDOM_SEED = 0  # random weights are seeded so that weights_id "random" names one set of weights

# ----------------------------------------------------------------------------------------------
# weight helpers shared by the plain-torch families
# ----------------------------------------------------------------------------------------------

_CONTAINERS = ("state_dict", "model", "teacher", "student", "module")


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside the usual checkpoint containers (state_dict/model/teacher/...)."""
    for key in _CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} does not hold a state dict of tensors")
    return dict(obj)


def resolve_weights(
    weights: str | Path | None, url: str | None, pretrained: bool, label: str
) -> tuple[dict[str, torch.Tensor] | None, str, str]:
    """Return ``(state_dict or None, weights_id, source)`` for a backbone.

    A local ``weights`` file always wins (``weights_id`` = its sha256 digest); otherwise the
    official ``url`` is fetched through ``torch.hub`` (cached, ``weights_only=True``,
    ``weights_id`` = the URL) unless ``pretrained`` is False (random weights, ``"random"``).
    """
    if weights is not None:
        p = Path(weights).expanduser()
        return load_state_dict(p), file_digest(p), p.name
    if not pretrained:
        return None, "random", "random"
    if not url:
        raise WeightsError(f"backbone {label!r} has no official download; pass --weights PATH (a state dict; backbone_weights= in Python)")
    try:
        obj = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as e:  # no network, HTTP error, hash mismatch, unsafe pickle ...
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise WeightsError(
            f"could not get the {label} weights from {url} ({type(e).__name__}: {msg}); "
            "download the file yourself and pass it with --weights PATH (backbone_weights= in Python)"
        ) from e
    return unwrap_state_dict(obj, url), url, url.rsplit("/", 1)[-1]


def strip_wrappers(sd: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove any sequence of the wrapper ``prefixes`` (``module.backbone.x`` -> ``x``)."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for pre in prefixes:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        out[k] = v
    return out


def _few(keys: list[str], n: int = 4) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``sd`` into ``module``; any missing/unexpected key or wrong shape is a WeightsError.

    BatchNorm ``num_batches_tracked`` counters are optional (older checkpoints lack them).
    """
    own = module.state_dict()
    sd = dict(sd)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes (file vs model): {_few(shapes, 3)}")
    if problems:
        raise WeightsError(f"{source} does not fit backbone {what!r}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def check_options(label: str, extra: dict, allowed: Iterable[str]) -> None:
    if extra:
        raise InputError(
            f"backbone {label!r} does not take option(s) {', '.join(sorted(extra))}; "
            f"it takes: {', '.join(sorted(allowed))}"
        )


@contextmanager
def seeded_init():
    """Seed the CPU RNG (restored afterwards) so that random weights are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield
