"""What every inference engine shares: the uint8-in graph, the weights digest and the on-disk
cache of converted / compiled models.

An engine maps a batch of resized images, ``(B, S, S, C)`` uint8 exactly as
:meth:`Preprocess.resize_image` returns them, to ``(B, dim)`` float32 features. Scaling to
[0, 1] and the mean/std normalisation live *inside* the exported graph (:class:`UInt8Input`),
so the Python side only stacks uint8 arrays (4x less memory traffic than float32 batches)
and an exported ``model.onnx`` takes the pixels Pillow gives, nothing else.

Compiled-model cache: ``<cache_root>/engines/<key>/`` where ``key`` hashes the backbone
name, a sha256 of its *actual* weights (every tensor of the state dict, not the label the
backbone reports), the preprocessing (input size, mean, std, channels), the precision, the
engine and its version, and :data:`ENGINE_CACHE_FORMAT`; a change of any gives a new entry.
An entry is built in a temporary directory and renamed into place, under an exclusive
``flock``, so a killed conversion never leaves a half-written model that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclust.backbones.base import Backbone
from imgclust.rundir import exclusive_lock

ENGINE_CACHE_FORMAT = 1


class UInt8Input(nn.Module):
    """``(B, S, S, C)`` uint8 -> the backbone's features: scale, normalise, NCHW, then the backbone."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        pre = backbone.preprocess
        c = 1 if pre.grayscale else 3
        mean = torch.tensor(pre.mean[:c], dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(pre.std[:c], dtype=torch.float32).view(1, c, 1, 1)
        # (x / 255 - mean) / std == x * a + b, folded into one multiply-add.
        self.register_buffer("a", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("b", -mean / std, persistent=False)
        self.backbone = backbone
        self.channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        return self.backbone(x * self.a + self.b)


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes, bytes): changes with the weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_key(backbone: Backbone, **parts: Any) -> str:
    """The compiled-model cache key of ``backbone`` plus ``parts`` (engine, version, precision, ...)."""
    # Recomputed on every call (EfficientNet-Lite0: ~20 ms), never memoised: a method that fine-tunes
    # the backbone in place must not get the compiled model of its old weights.
    digest = weights_digest(backbone)
    desc = {"format": ENGINE_CACHE_FORMAT, "name": backbone.name, "dim": backbone.dim, "weights": digest,
            "pre": backbone.preprocess.key(), **parts}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def cached_artifact(root: Path, key: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """The directory ``root/key``, built by ``build(tmp_dir)`` when missing; returns (dir, reused).

    ``build`` writes its files into ``tmp_dir`` and returns a description that is stored as
    ``meta.json`` (written last: its presence marks the entry complete).
    """
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    with exclusive_lock(root / f"{key}.lock"):
        if (entry / "meta.json").is_file():
            return entry, True
        if entry.exists():  # incomplete (a build killed before the rename cannot get here; be safe)
            shutil.rmtree(entry, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".build", dir=root))
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True, indent=1, default=str))
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry, False


class Engine:
    """A runnable feature extractor: ``engine(batch_uint8_nhwc) -> (B, dim) float32``."""

    name: str = "engine"
    precision: str = "fp32"  # what was asked for
    effective_precision: str = "fp32"  # what runs (bf16 falls back to fp32 where the hardware lacks it)
    artifact: Path | None = None  # compiled-model cache entry, if any
    reused: bool = False  # True when the compiled model came from the cache

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "precision": self.precision, "effective_precision": self.effective_precision,
                "artifact": None if self.artifact is None else str(self.artifact), "reused": self.reused}


def engine_threads() -> int:
    """Threads for an engine's inference: torch's setting (which ``--threads`` / OMP_NUM_THREADS control)."""
    return max(1, int(torch.get_num_threads()))
