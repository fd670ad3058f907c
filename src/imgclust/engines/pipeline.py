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

JPEG draft mode (:func:`imgclust.data.decode.jpeg_draft`). A JPEG whose shorter side is >= 2 x
the draft side is decoded by libjpeg's DCT scaling at the smallest 1/2, 1/4 or 1/8 scale that
keeps both sides >= the draft side = ``DRAFT_GAP`` x what the resize needs (256 px for 224 px
crops), then resized by Pillow (antialiased). Sessions 1-2 used ``DRAFT_GAP = 2`` (Pillow's
``reducing_gap=2`` idea) and kept the draft out of the key. Issue 19 session 3 made the **1x
draft** the default (``DRAFT_GAP = 1``): it decodes 2-4x fewer pixels again, and measured on
250 of the large photos of ``benchmarks/extract_speed.py`` (2000-2800 px with grain; EfficientNet-Lite0
224 px, OpenVINO fp32; ``benchmarks/draft_quality.py``) its features have cosine to the full
decode's median 0.997 (2x: 0.999), 90 % of photos >= 0.99, min 0.95 (2x: 0.976; one texture-rich
base photo), and k-means on them gives exactly the full decode's clusters (250 photos, ARI 1.000;
docs/notes/issue-19.md). The draft level enters the feature-cache key **only when it changes
the decode** (:func:`draft_gap_for`): a header scan (no pixels decoded, Pillow's own ``draft``
arithmetic) asks whether any image of the source decodes to another size at ``DRAFT_GAP`` than at
``LEGACY_DRAFT_GAP``; if none does (CIFAR-size images, every array source) the decode is
bit-identical to sessions 1-2 and the key is unchanged; otherwise the key gains ``-draft1`` and
the int8 calibration id the new gap. The scan's answer is cached per source fingerprint in
``<cache>/drafts/``.
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
DRAFT_GAP = 1
#: The gap of sessions 1-2: a source that decodes identically at both keeps its cache key.
LEGACY_DRAFT_GAP = 2
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


def draft_side(pre: Preprocess, gap: int | None = None) -> int:
    """The shorter side a JPEG may be draft-decoded down to for ``pre`` (``gap``: default ``DRAFT_GAP``)."""
    need = pre.size if pre.resize == "squash" else max(pre.size, int(round(pre.size / pre.crop_pct)))
    return (DRAFT_GAP if gap is None else gap) * need


def _encoded(source: ImageSource) -> Callable[[int], bytes | str] | None:
    """Image ``i`` -> its encoded bytes or file path; None for sources that hold no encoded files."""
    from imgclust.data.archive import ArchiveSource
    from imgclust.data.base import SubsetSource
    from imgclust.data.folder import FolderSource

    if isinstance(source, SubsetSource):
        inner = _encoded(source.base)
        return None if inner is None else (lambda i: inner(int(source.indices[i])))
    if isinstance(source, ArchiveSource):
        return source.read_bytes
    if isinstance(source, FolderSource):
        return source.path
    return None  # arrays, benchmark files, unknown wrappers: decoded exactly as in sessions 1-2


_DRAFT_MEMO: dict[tuple[str, int, int], int] = {}


def draft_gap_for(source: ImageSource, pre: Preprocess, cache_root: Path | None = None,
                  progress: bool = False) -> int:
    """``DRAFT_GAP`` if some image of ``source`` decodes to another size at ``DRAFT_GAP`` than at
    ``LEGACY_DRAFT_GAP`` (module docstring), else ``LEGACY_DRAFT_GAP`` (the decode is unchanged).

    Header scan, stopped at the first such image; its answer is memoised in the process and,
    with ``cache_root``, in ``<cache_root>/drafts/``."""
    if DRAFT_GAP == LEGACY_DRAFT_GAP:
        return DRAFT_GAP
    read = _encoded(source)
    if read is None:
        return LEGACY_DRAFT_GAP
    import hashlib

    from imgclust.data.decode import jpeg_draft_size
    from imgclust.progress import progress_bar
    from imgclust.rundir import read_json, write_json

    new, old = draft_side(pre), draft_side(pre, LEGACY_DRAFT_GAP)
    memo = (source.fingerprint(), new, old)
    if memo in _DRAFT_MEMO:
        return _DRAFT_MEMO[memo]
    path = None
    if cache_root is not None:
        name = hashlib.sha256(f"{memo[0]}:{new}:{old}".encode()).hexdigest()[:24]
        path = Path(cache_root) / "drafts" / f"{name}.json"
        try:
            gap = int(read_json(path)["gap"])
            if gap in (DRAFT_GAP, LEGACY_DRAFT_GAP):
                _DRAFT_MEMO[memo] = gap
                return gap
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: scan
    gap, first = LEGACY_DRAFT_GAP, None
    with progress_bar(len(source), "check JPEG sizes for draft decoding", unit="img", enable=progress) as bar:
        for i in range(len(source)):
            try:
                data = read(i)
            except Exception:  # noqa: BLE001 - unreadable here is unreadable in the extraction too
                continue
            if data is not None and jpeg_draft_size(data, new) != jpeg_draft_size(data, old):
                gap, first = DRAFT_GAP, i
                break
            bar.update(1)
    _DRAFT_MEMO[memo] = gap
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"gap": gap, "first_drafted": first, "n": len(source), "draft_side": new,
                              "legacy_draft_side": old})
        except OSError:
            pass  # read-only cache: the scan reruns next time
    return gap


def draft_key_suffix(gap: int) -> str:
    """What the effective draft gap adds to the feature-cache key: nothing for the legacy decode."""
    return "" if gap == LEGACY_DRAFT_GAP else f"-draft{gap}"


def make_loader(source: ImageSource, pre: Preprocess, gap: int | None = None,
                cache_root: Path | None = None) -> Callable[[int], np.ndarray | BadImageError]:
    """Image ``i`` -> resized uint8 array or BadImageError; ``gap`` None: :func:`draft_gap_for`."""
    side = draft_side(pre, draft_gap_for(source, pre, cache_root) if gap is None else gap)

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
    gap = draft_gap_for(source, backbone.preprocess, cache_root) if calib is not None else 0
    calib_id = f"{source.fingerprint()}:{CALIBRATION_IMAGES}:{gap}" if calib is not None else ""
    return build_engine(backbone, engine, precision, device, cache_root=cache_root, rows=rows,
                        calibration=calib, calibration_id=calib_id)
