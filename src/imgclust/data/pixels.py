"""In-memory uint8 image sets for the methods that train a network from scratch on the pixels
(PICI, CC): decoded from a source, or rebuilt from ``pixels``-backbone features.

Both give (N, 3, S, S) uint8 tensors (N x 3 x S^2 bytes, 3 MB per 1,000 images at 32 px) and an
identity string of the images, for the checkpoint fingerprint.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from imgclust.data.batches import ImageBatches
from imgclust.errors import InputError


def load_pixel_images(source: Any, rows: np.ndarray, size: int, progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Decode ``rows`` of ``source`` to (N, 3, size, size) uint8 (squash resize, bilinear, as the
    ``pixels`` backbone); returns the images and a mask of those that decoded."""
    from imgclust.backbones.base import Preprocess

    pre = Preprocess(size=int(size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="squash",
                     interpolation="bilinear")
    return ImageBatches(source, rows, int(size), pre, None).uint8(progress=progress)


def pixels_to_uint8(features: np.ndarray, size: int) -> torch.Tensor | None:
    """``pixels``-backbone features (N, 3 x size x size, values in [0, 1], channel-first) as uint8
    images (N, 3, size, size); None when the features are not such pixels."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != 3 * size * size:
        return None
    return torch.from_numpy(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)).reshape(-1, 3, size, size)


def training_images(features: np.ndarray, source: Any, rows: np.ndarray | None, size: int, *, name: str,
                    progress: bool = False) -> tuple[torch.Tensor, str]:
    """The images a from-scratch method trains on and their identity: ``rows`` of ``source`` (all must
    decode), or, without a source, the pixel ``features`` themselves; InputError naming ``name``
    otherwise."""
    if source is not None:
        rows = np.arange(len(features)) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) != len(features):
            raise InputError(f"{name}: {len(rows)} source rows for {len(features)} feature rows")
        imgs, ok = load_pixel_images(source, rows, size, progress)
        if not ok.all():
            raise InputError(f"{name}: {int((~ok).sum())} training images no longer decode")
        return imgs, hashlib.sha256(f"{source.fingerprint()}|".encode() + rows.tobytes()).hexdigest()
    imgs = pixels_to_uint8(features, size)
    if imgs is None:
        raise InputError(f"{name} learns from the images: fit on an image source (e.g. with "
                         f"--backbone pixels --image-size {size}), or pass pixel features of 3x{size}x{size}; "
                         f"got features of shape {np.shape(features)}")
    return imgs, hashlib.sha256(imgs.numpy().tobytes()).hexdigest()


__all__ = ["load_pixel_images", "pixels_to_uint8", "training_images"]
