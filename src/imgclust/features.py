"""Feature extraction, computed once and cached on disk.

``extract_features(source, backbone)`` runs the frozen backbone over every image in batches
under ``torch.inference_mode()`` and writes the rows, chunk by chunk, into a memory-mapped
``features.npy``. The cache directory is keyed by (source fingerprint, backbone name +
weights digest + preprocessing); a second call with the same key memory-maps the finished
file instead of recomputing, and an interrupted extraction resumes from the last flushed
chunk.

Layout of one cache entry (``<cache_root>/features/<key>/``)::

    features.npy     float32 (N, D), open_memmap; rows of skipped images are zero
    progress.json    {"done": rows flushed so far, "skipped": [[index, reason], ...],
                      "chunks": [[start, end, sha256 of those rows], ...]}
    meta.json        written last: key, size and sha256 of features.npy, source/backbone
                     description, valid count; its presence marks the entry complete

Trust rules. A finished entry is used only when meta.json is present and features.npy has
the recorded size, header and digest: the full sha256 for files up to 1 GiB (about 0.65 s
per GB; k-means reads every row anyway), a digest of 65 sampled 64 KiB blocks above that
(``verify_cache=True`` forces the full check). An entry that claims to be finished but fails
the check is deleted and recomputed. A partial entry resumes only from the leading chunks
whose rows still match the digests recorded when they were flushed (the memmap is flushed
before progress.json is atomically replaced, so SIGKILL loses at most one chunk). Finished
batches are flushed when the run is interrupted (Ctrl-C, SIGTERM). An exclusive ``flock`` on
``<key>.lock`` keeps two processes from writing the same entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

from imgclust.backbones.base import Backbone
from imgclust.data.base import ImageSource
from imgclust.diskspace import reserve_path, writing
from imgclust.errors import BadImageError, DiskFullError, InputError
from imgclust.progress import progress_bar
from imgclust.rundir import clean_stale_tmp, exclusive_lock, file_sha256, read_json, write_json

CACHE_FORMAT = 2  # 2: chunk digests in progress.json, sha256 of features.npy in meta.json


def default_cache_dir() -> Path:
    """``$IMGCLUST_CACHE``, else ``$XDG_CACHE_HOME/imgclust``, else ``~/.cache/imgclust``."""
    env = os.environ.get("IMGCLUST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "imgclust"


@dataclass
class FeatureSet:
    """Features of one source under one backbone.

    ``features`` has one row per image of the source (a read-only memmap when it came from
    the cache); ``valid`` marks the images that decoded; ``skipped`` lists
    ``(index, image id, reason)`` of those that did not.
    """

    features: np.ndarray
    valid: np.ndarray
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    key: str = ""
    path: Path | None = None
    from_cache: bool = False
    seconds: float = 0.0
    images_per_second: float | None = None
    resumed_from: int = 0  # rows taken from an interrupted run's partial entry
    rows_computed: int = 0  # rows run through the backbone by this call (0 on a cache hit)
    sha256: str | None = None  # digest of the cached features.npy
    cache_status: str = ""  # hit | fresh | resumed | recomputed (...) | off

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


def cache_key(source: ImageSource, backbone: Backbone) -> str:
    h = hashlib.sha256()
    h.update(f"format={CACHE_FORMAT}\n".encode())
    h.update(source.fingerprint().encode())
    h.update(b"\n")
    h.update(backbone.cache_key().encode())
    return h.hexdigest()[:24]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return dev


def extract_features(
    source: ImageSource,
    backbone: Backbone,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    chunk_rows: int = 1024,
    progress: bool = True,
    use_cache: bool = True,
    verify_cache: bool | None = None,
    engine: str = "auto",
    to_entry: Callable[..., FeatureSet] | None = None,
) -> FeatureSet:
    """Features for every image of ``source``; cached and resumable (see module docstring).

    ``precision``: ``"fp32"`` (default, exact) or ``"bf16"`` (autocast; about 2-3x faster on
    recent CPUs and on GPUs, features differ in the third decimal). bf16 is part of the
    cache key. ``workers``: threads that decode and resize images while the model runs
    (default: CPU count, at most 8). ``chunk_rows``: rows between two flushes of the cache
    (what an interrupted run can lose). ``verify_cache``: how a finished entry is checked
    before it is trusted: ``None`` full sha256 up to 1 GiB and sampled blocks above,
    ``True`` always the full sha256, ``False`` always the sampled digest. ``engine``: auto,
    torch, openvino or onnxruntime (:mod:`imgclust.engines`; ``precision`` may then also be
    ``int8``, or ``fp16`` on CUDA). ``to_entry``: what fills the cache entry (default
    :func:`extract_to_entry`; :func:`imgclust.features_dist.extract_features` passes the sharded
    filler under torchrun, so this module never imports the distributed one).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if chunk_rows < 1:
        raise InputError(f"chunk rows must be >= 1, got {chunk_rows}")
    n = len(source)
    if n == 0:
        raise InputError(f"{source.name}: no images")
    # --- issue 19: engines. The resolved engine enters the key only for bf16/int8 (see feature_key_suffix).
    from imgclust.engines import choose_engine
    from imgclust.engines.pipeline import feature_key_suffix

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    engine = choose_engine(engine, precision, resolve_device(device), backbone, n, root / "engines")
    opts = dict(batch_size=batch_size, device=device, precision=precision, workers=workers,
                chunk_rows=chunk_rows, progress=progress, engine=engine, cache_root=root)
    if not use_cache:
        return _extract(source, backbone, None, **opts)
    key = cache_key(source, backbone) + feature_key_suffix(engine, precision)
    # issue 19 s3: the JPEG draft level enters the key only when it changes the decode (engines/pipeline.py)
    from imgclust.engines.pipeline import draft_gap_for, draft_key_suffix

    key += draft_key_suffix(draft_gap_for(source, backbone.preprocess, root, progress=progress))
    fill = to_entry or extract_to_entry  # issue 20: features_dist passes its sharded filler under torchrun
    return fill(source, backbone, root / "features" / key, key=key, verify_cache=verify_cache, **opts)


def extract_to_entry(source: ImageSource, backbone: Backbone, entry: Path | None, *, key: str,
                     verify_cache: bool | None = None, **opts: Any) -> FeatureSet:
    """Load the finished cache entry ``entry``, or compute / resume it (``opts``: see ``_extract``).

    ``entry`` None: compute in memory, no cache (issue 17: the public way for :mod:`imgclust.views`).

    One process at a time per entry: a second run of the same extraction waits and then gets
    the cache hit instead of writing the same memmap concurrently. An entry marked complete
    that fails verification is wiped and recomputed. Other caches built from features (the
    view bank of :mod:`imgclust.views`) store their entries through this too.
    """
    if entry is None:
        return _extract(source, backbone, None, **opts)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(entry.parent / f"{entry.name}.lock"):
        status = "fresh"
        if entry.is_dir():
            clean_stale_tmp(entry)
            done = _load_complete(entry, len(source), backbone.dim, source.ids(), check="full" if verify_cache else
                                  ("sampled" if verify_cache is False else "auto"))
            if done is not None:
                return done
            if (entry / "meta.json").exists():
                # Marked complete but failing verification: nothing in it can be trusted.
                _wipe(entry)
                status = "recomputed (cache entry failed verification)"
        return _extract(source, backbone, entry, status=status, key=key, **opts)


def _extract(
    source: ImageSource,
    backbone: Backbone,
    entry: Path | None,
    *,
    batch_size: int,
    device: str,
    precision: str,
    workers: int | None,
    chunk_rows: int,
    progress: bool,
    status: str = "off",
    key: str = "",
    engine: str = "torch",
    cache_root: Path | None = None,
) -> FeatureSet:
    n = len(source)
    ids = source.ids()
    t0 = time.perf_counter()
    chunks: list[list] = []
    if entry is not None:
        entry.mkdir(parents=True, exist_ok=True)
        feats, start, skipped_idx, chunks = _open_partial(entry, n, backbone.dim)
        if start > 0:
            status = "resumed"
    else:
        feats, start, skipped_idx = np.zeros((n, backbone.dim), np.float32), 0, {}

    from imgclust.engines.pipeline import make_engine, make_loader, prefetched

    pre = backbone.preprocess
    workers = workers or min(8, os.cpu_count() or 1)
    load = make_loader(source, pre, cache_root=cache_root)  # decode (JPEG draft) + resize; errors -> BadImageError
    eng = make_engine(source, backbone, load, engine=engine, precision=precision, device=resolve_device(device),
                      cache_root=cache_root or default_cache_dir(), rows=n - start) if start < n else None

    batches = [list(range(s, min(s + batch_size, n))) for s in range(start, n, batch_size)]
    bar = progress_bar(total=n, initial=start, desc=f"features {backbone.name}", unit="img", enable=progress)
    last_flush = written = start
    processed = 0
    t_model = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Decode + resize in the pool (Pillow releases the GIL), a bounded number of batches
            # ahead of the engine; batches come back in order.
            for idx, imgs in prefetched(pool, load, batches):
                write_batch(eng, idx, imgs, feats, skipped_idx)
                written = idx[-1] + 1
                processed += len(idx)
                bar.update(len(idx))
                if entry is not None and (written - last_flush >= chunk_rows or written == n):
                    _flush(entry, feats, last_flush, written, skipped_idx, chunks)
                    last_flush = written
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM, a crash): keep every finished batch for the rerun.
        if entry is not None and written > last_flush:
            with contextlib.suppress(Exception):
                _flush(entry, feats, last_flush, written, {i: r for i, r in skipped_idx.items() if i < written}, chunks)
        raise
    finally:
        bar.close()
    dt_model = time.perf_counter() - t_model
    valid = np.ones(n, dtype=bool)
    valid[list(skipped_idx)] = False
    skipped = [(i, ids[i], skipped_idx[i]) for i in sorted(skipped_idx)]
    ips = processed / dt_model if processed and dt_model > 0 else None
    if entry is None:
        return FeatureSet(feats, valid, skipped, key, None, False, time.perf_counter() - t0, ips,
                          resumed_from=0, rows_computed=processed, cache_status=status)
    fpath = entry / "features.npy"
    size = fpath.stat().st_size
    del feats
    write_json(
        entry / "meta.json",
        {
            "format": CACHE_FORMAT,
            "key": key,
            "n": n,
            "dim": backbone.dim,
            "n_valid": int(valid.sum()),
            "bytes": size,
            "sha256": file_sha256(fpath),
            "sample_sha256": _sampled_sha256(fpath, size),
            "source": {k: v for k, v in source.describe().items()},
            "backbone": backbone.describe(),
            "precision": precision,
            "engine": None if eng is None else eng.describe(),
            "images_per_second": ips,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    fs = _load_complete(entry, n, backbone.dim, ids, check="none")  # digest just computed
    assert fs is not None
    fs.from_cache = False
    fs.seconds = time.perf_counter() - t0
    fs.images_per_second = ips
    fs.resumed_from = start
    fs.rows_computed = processed
    fs.cache_status = status
    return fs


def write_batch(eng: Any, idx: list[int], imgs: list[Any], feats: np.ndarray, skipped: dict[int, str]) -> None:
    """Run one decoded batch through ``eng`` into rows ``idx`` of ``feats``; unreadable images and
    non-finite outputs are recorded in ``skipped`` (their rows stay 0). Shared by the single-process
    and the sharded (features_dist) extraction."""
    good = [k for k, im in enumerate(imgs) if not isinstance(im, BadImageError)]
    for k, im in enumerate(imgs):
        if isinstance(im, BadImageError):
            skipped[idx[k]] = str(im) or "unreadable"
    if good:
        out = eng(np.stack([imgs[k] for k in good]))
        if not np.all(np.isfinite(out)):
            bad = ~np.isfinite(out).all(axis=1)
            for k in np.flatnonzero(bad):
                skipped[idx[good[k]]] = "backbone produced non-finite features"
            out[bad] = 0.0
        feats[[idx[k] for k in good]] = out


def _wipe(entry: Path) -> None:
    for p in entry.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _rows_sha256(feats: np.ndarray, a: int, b: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(feats[a:b]))).hexdigest()


def _flush(entry: Path, feats: np.ndarray, a: int, b: int, skipped: dict[int, str], chunks: list[list]) -> None:
    """Make rows ``[a, b)`` durable, then record them (with their digest) in progress.json.

    The memmap is flushed before progress.json is replaced, so progress.json never claims
    rows that are not on disk; each chunk's sha256 lets a resumed run check the rows it
    keeps.
    """
    if isinstance(feats, np.memmap):
        feats.flush()
    if b > a:
        chunks.append([int(a), int(b), _rows_sha256(feats, a, b)])
    write_json(
        entry / "progress.json",
        {"done": int(b), "skipped": sorted([int(i), r] for i, r in skipped.items()), "chunks": chunks},
    )


def _open_partial(entry: Path, n: int, dim: int) -> tuple[np.ndarray, int, dict[int, str], list[list]]:
    """Open features.npy for writing, resuming after the last flushed, verified chunk."""
    fpath, ppath = entry / "features.npy", entry / "progress.json"
    if fpath.exists() and ppath.exists():
        try:
            prog = read_json(ppath)
            feats = open_memmap(fpath, mode="r+")
            if feats.shape == (n, dim) and feats.dtype == np.float32 and 0 <= int(prog["done"]) <= n:
                _reserve_memmap(fpath, keep=True)  # an entry from an older version may still be sparse
                # Keep the leading run of chunks whose rows still match their digest.
                start, chunks = 0, []
                for a, b, digest in prog["chunks"]:
                    a, b = int(a), int(b)
                    if a != start or not start < b <= int(prog["done"]) or _rows_sha256(feats, a, b) != digest:
                        break
                    chunks.append([a, b, str(digest)])
                    start = b
                skipped = {int(i): str(r) for i, r in prog["skipped"] if int(i) < start}
                return feats, start, skipped, chunks
            del feats
        except DiskFullError:
            raise
        except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError):
            pass
    # Nothing trustworthy: start over.
    _wipe(entry)
    with writing(fpath, n * dim * 4):
        feats = open_memmap(fpath, mode="w+", dtype=np.float32, shape=(n, dim))
    _reserve_memmap(fpath)
    chunks = []
    _flush(entry, feats, 0, 0, {}, chunks)
    return feats, 0, {}, chunks


def _reserve_memmap(fpath: Path, keep: bool = False) -> None:
    """Allocate every block of the memmap file before rows are written through it.

    ``open_memmap`` leaves a sparse file; on a full file system a write through the map then
    kills the process with SIGBUS ("Bus error", no message). ``posix_fallocate`` turns that
    into an ENOSPC now, reported as one line (destination and size), and the empty file is
    removed so nothing half-made remains (``keep``: a resumable partial file stays).
    """
    reserve_path(fpath, fpath.stat().st_size, remove_on_failure=not keep)


#: Finished entries up to this size get a full sha256 check on every load (about 0.65 s
#: per GB); larger ones a digest of sampled blocks unless ``verify_cache=True``.
FULL_VERIFY_MAX_BYTES = 1 << 30
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 1 << 16


def _sampled_sha256(path: Path, size: int) -> str:
    """sha256 over the size and 65 blocks of 64 KiB spread evenly (first and last included)."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        span = max(size - _SAMPLE_BYTES, 0)
        for k in range(_SAMPLE_BLOCKS + 1):
            f.seek(span * k // _SAMPLE_BLOCKS)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _load_complete(entry: Path, n: int, dim: int, ids: list[str], check: str = "auto") -> FeatureSet | None:
    """The finished cache entry as a read-only memmap, or None when absent/incomplete/corrupt.

    ``check``: ``"auto"`` (full sha256 up to :data:`FULL_VERIFY_MAX_BYTES`, sampled above),
    ``"full"``, ``"sampled"`` or ``"none"`` (size and header only; right after writing).
    """
    meta_p, prog_p, feat_p = entry / "meta.json", entry / "progress.json", entry / "features.npy"
    if not (meta_p.exists() and prog_p.exists() and feat_p.exists()):
        return None
    try:
        meta, prog = read_json(meta_p), read_json(prog_p)
        size = feat_p.stat().st_size
        if meta.get("format") != CACHE_FORMAT or size != int(meta["bytes"]):
            return None
        if check == "auto":
            check = "full" if size <= FULL_VERIFY_MAX_BYTES else "sampled"
        if check == "full" and file_sha256(feat_p) != meta["sha256"]:
            return None
        if check == "sampled" and _sampled_sha256(feat_p, size) != meta["sample_sha256"]:
            return None
        feats = np.load(feat_p, mmap_mode="r", allow_pickle=False)
        skipped_idx = {int(i): str(r) for i, r in prog["skipped"]}
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError):
        return None
    if (feats.shape != (n, dim) or feats.dtype != np.float32 or meta.get("n") != n
            or int(prog.get("done", -1)) != n or not all(0 <= i < n for i in skipped_idx)):
        return None
    valid = np.ones(n, dtype=bool)
    valid[list(skipped_idx)] = False
    if int(valid.sum()) != meta.get("n_valid"):
        return None
    skipped = [(i, ids[i], skipped_idx[i]) for i in sorted(skipped_idx)]
    return FeatureSet(feats, valid, skipped, meta["key"], entry, True, 0.0, meta.get("images_per_second"),
                      sha256=meta["sha256"], cache_status="hit")
