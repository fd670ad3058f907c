"""Batches of decoded, resized images of a source, for the methods that train or predict on images.

:class:`ImageBatches` reads rows of an :class:`~imgclust.data.base.ImageSource` with a thread
pool, resizes them with the backbone's :class:`~imgclust.backbones.base.Preprocess` (at its
own or another size) and flags the images that no longer decode, so a caller can give them
a fallback instead of losing the run. Used by ICBPL's fine-tuning and view bank, by the
fine-tuned (``image_level``) models' predictions from images, and (:meth:`ImageBatches.uint8`)
for the in-memory image sets of PICI / CC, ``pretrain`` and FixMatch's end-to-end views.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from imgclust.errors import BadImageError
from imgclust.progress import progress_bar


class ImageBatches:
    """Decoded, resized rows of an ImageSource as float tensors in [0, 1]; bad images flagged."""

    def __init__(self, source: Any, rows: np.ndarray, size: int, preprocess: Any, workers: int | None) -> None:
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.pre = replace(preprocess, size=int(size))
        self.workers = workers or min(8, os.cpu_count() or 1)

    def _load(self, i: int) -> np.ndarray | None:
        try:
            return self.pre.resize_image(self.source.read(int(i)))
        except BadImageError:
            return None
        except Exception:  # noqa: BLE001 - a reader bug must not lose the run: unreadable, as in features.py
            return None

    def batch(self, idx: np.ndarray, pool: ThreadPoolExecutor) -> tuple[torch.Tensor, np.ndarray]:
        """Images ``rows[idx]`` as (B, C, s, s) in [0, 1] and a mask of those that decoded."""
        imgs = list(pool.map(self._load, self.rows[idx]))
        ok = np.array([im is not None for im in imgs], dtype=bool)
        s = self.pre.size
        c = 1 if self.pre.grayscale else 3
        arr = np.zeros((len(imgs), s, s, c), np.uint8)
        for j, im in enumerate(imgs):
            if im is not None:
                arr[j] = im
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0), ok

    def uint8(self, idx: np.ndarray | None = None, *, progress: bool = False, desc: str = "decode images",
              channels_last: bool = False) -> tuple[torch.Tensor, np.ndarray]:
        """Rows ``rows[idx]`` (all by default) as (B, C, s, s) uint8, images that do not decode all
        zero, and a mask of those that decoded: the in-memory image sets that PICI / CC, pretrain
        and FixMatch's end-to-end views train on, and the online views' images.
        ``channels_last``: a (B, C, s, s) view of (B, s, s, C) memory instead of a contiguous copy
        (the layout the view makers always augmented)."""
        rows = self.rows if idx is None else self.rows[np.asarray(idx)]
        s, c = self.pre.size, 1 if self.pre.grayscale else 3
        arr = np.zeros((len(rows), s, s, c), np.uint8)
        ok = np.zeros(len(rows), dtype=bool)
        bar = progress_bar(len(rows), desc, unit="img", enable=progress)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for j, im in enumerate(pool.map(self._load, rows)):
                if im is not None:
                    arr[j], ok[j] = im, True
                bar.update(1)
        bar.close()
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        return (x if channels_last else x.contiguous()), ok

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        mean = torch.tensor(self.pre.mean[:c] if c > 1 else self.pre.mean[:1], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.pre.std[:c] if c > 1 else self.pre.std[:1], device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], n_out: int, *, batch_size: int = 64,
              device: torch.device | str = "cpu", progress: bool = True, desc: str = "predict") -> np.ndarray:
        """``fn`` (normalised images on ``device`` -> (B, n_out)) over every row, in batches, as a
        float32 array (len(rows), n_out); rows of images that do not decode stay all zero."""
        n = len(self.rows)
        out = np.zeros((n, n_out), np.float32)
        bar = progress_bar(n, desc, unit="img", enable=progress)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for s in range(0, n, batch_size):
                idx = np.arange(s, min(s + batch_size, n))
                img, ok = self.batch(idx, pool)
                if ok.any():
                    out[idx[ok]] = fn(self.normalize(img[torch.from_numpy(ok)]).to(device)).float().cpu().numpy()
                bar.update(len(idx))
        bar.close()
        return out



def fit_image_rows(source: Any, backbone: Any, rows: Any, shape: tuple[int, int], name: str, what: str) -> np.ndarray:
    """The rows of ``source`` behind a fit's (N, D) features, for a method that goes back to the images
    (``name`` ``what``: "icbpl", "finetune=all"); InputError when the fit has no images (precomputed
    features), a row count that differs, or features that are not the backbone's own (PCA)."""
    from imgclust.errors import InputError

    n, d = shape
    if source is None or backbone is None:
        raise InputError(f"{name} {what} needs the images: fit on an image source, not on precomputed features")
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) != n:
        raise InputError(f"{name}: {len(rows)} source rows for {n} feature rows")
    if backbone.dim != d:
        raise InputError(f"{what} needs the backbone's own {backbone.dim}-d features (no pca); got {d}-d")
    return rows


__all__ = ["ImageBatches", "fit_image_rows"]
