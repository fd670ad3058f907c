"""The producer side of feature extraction: decode workers, JPEG draft mode, engine set-up.

``features._extract`` keeps the cache layout, row order, chunk flushes and resume logic; it
asks this module for

* ``make_loader``: image ``i`` -> resized uint8 array (or the BadImageError), decoding JPEGs
  in draft mode at :data:`DRAFT_GAP` x the size the resize needs;
* ``prefetched``: batches decoded by a thread pool up to :data:`PREFETCH_BATCHES` ahead of the
  engine (a bounded queue: memory stays at a few batches however large the source), yielded
  in order;
* ``make_engine``: the engine, with an int8 calibration sample drawn from the source itself.

Feature-cache key policy (``feature_key_suffix``): fp32 features from every engine agree
with PyTorch fp32 to cosine >= 0.9999 (measured: >= 0.99999, tests/engines/test_engines.py), which is
float32 rounding noise, so the key stays the one PyTorch fp32 always had and a cache filled by
one engine serves the others (the engine that wrote it is recorded in meta.json). bf16 and
int8 change features visibly (cosine ~0.99-0.999): they get their own entries, with the
engine in the suffix (bf16 PyTorch keeps its historical ``-bf16``).

JPEG draft mode (:func:`imgclust.data.decode.jpeg_draft`) is not in the key either: it only
acts when the photo's shorter side is >= 2 x ``DRAFT_GAP`` x the target, and then keeps at
least ``DRAFT_GAP`` (2) x the target resolution before Pillow's antialiased resize - the same
idea as Pillow's ``reducing_gap`` (documented as indistinguishable from a full resize in most
cases). Measured on 40 of benchmarks/extract_speed.py's large photos (2000-2800 px, with
added grain, the hard case for a DCT-domain downscale) -> 224 px, EfficientNet-Lite0: pixel
mean absolute difference 0.62 / 255, feature cosine to the full decode median 0.9994, min
0.983. That is above fp32-engine noise, so draft mode is a deliberate trade (decode several
times faster on large photos) rather than "the same features"; it stays out of the key so
every cache entry of unchanged small images (CIFAR-size: never drafted) stays valid.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from imgclust.backbones.base import Backbone, Preprocess
from imgclust.data.base import ImageSource
from imgclust.data.decode import jpeg_draft
from imgclust.engines import Engine, build_engine
from imgclust.errors import BadImageError

#: JPEGs are draft-decoded to at least this multiple of the resize target's shorter side.
DRAFT_GAP = 2
#: Batches decoded ahead of the engine.
PREFETCH_BATCHES = 3
#: Images of the user's source used to calibrate int8 quantisation (NNCF's default subset).
CALIBRATION_IMAGES = 300


def feature_key_suffix(engine: str, precision: str) -> str:
    """What the resolved ``engine`` and ``precision`` add to the feature-cache key (module docstring)."""
    if precision == "fp32":
        return ""
    if engine == "torch":
        return f"-{precision}"
    return f"-{precision}-{engine}"


def draft_side(pre: Preprocess) -> int:
    """The shorter side a JPEG may be draft-decoded down to for ``pre``."""
    need = pre.size if pre.resize == "squash" else max(pre.size, int(round(pre.size / pre.crop_pct)))
    return DRAFT_GAP * need


def make_loader(source: ImageSource, pre: Preprocess) -> Callable[[int], np.ndarray | BadImageError]:
    side = draft_side(pre)

    def load(i: int) -> np.ndarray | BadImageError:
        try:
            with jpeg_draft(side):
                return pre.resize_image(source.read(i))
        except BadImageError as e:
            return e
        except Exception as e:  # a reader bug must not lose the run: count it as a bad image
            return BadImageError(f"unreadable ({type(e).__name__}: {e})")

    return load


def prefetched(pool: ThreadPoolExecutor, load: Callable[[int], object], batches: list[list[int]],
               depth: int = PREFETCH_BATCHES) -> Iterator[tuple[list[int], list]]:
    """Yield ``(indices, loaded items)`` per batch, in order, keeping ``depth`` batches in flight."""
    pending: deque[tuple[list[int], list[Future]]] = deque()
    it = iter(batches)
    for b in it:
        pending.append((b, [pool.submit(load, i) for i in b]))
        if len(pending) >= depth:
            break
    while pending:
        idx, futs = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, [pool.submit(load, i) for i in nxt]))
        yield idx, [f.result() for f in futs]


def calibration_sample(source: ImageSource, load: Callable[[int], object], n: int = CALIBRATION_IMAGES,
                       batch: int = 16) -> Callable[[], Iterable[np.ndarray]]:
    """A callable yielding uint8 batches of ``n`` images spread evenly over ``source`` (bad ones skipped)."""
    idx = np.unique(np.linspace(0, len(source) - 1, num=min(n, len(source))).round().astype(int))

    def gen() -> Iterator[np.ndarray]:
        buf: list[np.ndarray] = []
        for i in idx:
            im = load(int(i))
            if isinstance(im, np.ndarray):
                buf.append(im)
            if len(buf) == batch:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    return gen


def make_engine(source: ImageSource, backbone: Backbone, load: Callable[[int], object], *, engine: str,
                precision: str, device: torch.device, cache_root: Path, rows: int) -> Engine:
    calib = calibration_sample(source, load) if precision == "int8" else None
    calib_id = f"{source.fingerprint()}:{CALIBRATION_IMAGES}:{DRAFT_GAP}" if calib is not None else ""
    return build_engine(backbone, engine, precision, device, cache_root=cache_root, rows=rows,
                        calibration=calib, calibration_id=calib_id)
