"""Small thumbnails as ``data:`` URIs, so the report is one file with no external resources."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, features

from imgclust.data import ImageSource
from imgclust.errors import BadImageError

_FORMAT = "WEBP" if features.check("webp") else "JPEG"  # WebP: about a third smaller at equal quality


def thumbnail_uri(img: np.ndarray, size: int = 64, quality: int = 70) -> str:
    """``img`` (H, W, 3) uint8 shrunk to fit ``size`` x ``size`` (never enlarged: small images
    are scaled up by the browser, ``image-rendering: pixelated``), encoded as a data URI."""
    im = Image.fromarray(np.ascontiguousarray(img))
    if max(im.size) > size:
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format=_FORMAT, quality=quality)
    return f"data:image/{_FORMAT.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_thumbnails(source: ImageSource, indices: Sequence[int], size: int = 64, quality: int = 70,
                    workers: int = 4) -> dict[int, str]:
    """Thumbnails of the source images ``indices`` (decoded in a few threads); unreadable ones are left out."""
    idx = sorted({int(i) for i in indices})

    def one(i: int) -> tuple[int, str | None]:
        try:
            return i, thumbnail_uri(source.read(i), size, quality)
        except (BadImageError, OSError, ValueError):
            return i, None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return {i: uri for i, uri in ex.map(one, idx) if uri is not None}
