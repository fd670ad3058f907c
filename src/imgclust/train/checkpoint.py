"""The one checkpoint format of every training loop (TEMI/ICCE heads, SPICE, ICBPL, ...).

A checkpoint is a dict of tensors and plain Python values saved with ``torch.save`` to
``<dir>/<name>-ckpt-<fingerprint>.pt``; the fingerprint (:func:`fingerprint`) hashes
everything a result depends on — method name, K, seed, the config's options and a digest of
the training data — so a file can only be resumed by the run that wrote it. Writes are atomic
(:func:`imgclust.rundir.atomic_open`: a temporary file renamed into place), loads use
``torch.load(weights_only=True)`` (no pickled code runs), and a torn, foreign or mismatched
file is ignored with one log line: training starts over, never from a wrong state.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "imgclust-train-ckpt/1"
log = logging.getLogger("imgclust.train")


def data_digest(*arrays: np.ndarray | torch.Tensor) -> str:
    """sha256 of the arrays' shapes, dtypes and bytes (the training data's identity).

    Issue 20: the bytes are hashed in row blocks of <= 64 MB (C order, so the same byte stream and the
    same digest as hashing ``tobytes()`` at once): a memory-mapped 10M x 384 feature file is read in
    place instead of copied whole into memory (15 GB)."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = a.reshape(1) if a.ndim == 0 else a  # as np.ascontiguousarray: ndim >= 1
        h.update(f"{a.shape}|{a.dtype}|".encode())
        step = max(1, (64 << 20) // max(1, a[:1].nbytes))
        for s in range(0, len(a), step):
            h.update(np.ascontiguousarray(a[s:s + step]).data)
    return h.hexdigest()


def fingerprint(**parts: Any) -> str:
    """A 24-hex key of JSON-serialisable ``parts`` (name, k, seed, options, data digest ...)."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class Checkpoint:
    """One checkpoint file; ``path=None`` switches checkpointing off (save/load do nothing)."""

    def __init__(self, path: str | Path | None, key: str) -> None:
        self.path = None if path is None else Path(path)
        self.key = key

    @classmethod
    def in_dir(cls, directory: str | Path | None, name: str, **parts: Any) -> Checkpoint:
        """``<directory>/<name>-ckpt-<fingerprint(parts)>.pt`` (off when ``directory`` is None)."""
        key = fingerprint(name=name, **parts)
        return cls(None if directory is None else Path(directory) / f"{name}-ckpt-{key}.pt", key)

    def save(self, payload: dict[str, Any]) -> None:
        """Atomically write ``payload`` (tensors, numbers, strings, lists, dicts) with the key."""
        if self.path is None:
            return
        from imgclust.rundir import atomic_open

        with atomic_open(self.path, "wb") as fh:
            torch.save({"format": FORMAT, "key": self.key, **payload}, fh)

    def load(self) -> dict[str, Any] | None:
        """The saved payload, or None when there is none or it cannot be trusted (logged)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # torn (EOFError, RuntimeError), foreign pickle (UnpicklingError), ...
            log.warning("ignoring checkpoint %s (unreadable: %s); training starts over", self.path,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != self.key:
            log.warning("ignoring checkpoint %s (another format or run); training starts over", self.path)
            return None
        return state

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
