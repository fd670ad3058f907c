"""Feature extraction, computed once and cached on disk.

``extract_features(source, backbone)`` runs the frozen backbone over every image in batches
under ``torch.inference_mode()`` and writes the rows, chunk by chunk, into a memory-mapped
``features.npy``. The cache directory is keyed by (source fingerprint, backbone name +
weights digest + preprocessing); a second call with the same key memory-maps the finished
file instead of recomputing, and an interrupted extraction resumes from the last flushed
chunk.

Layout of one cache entry (``<cache_root>/features/<key>/``)::

    features.npy     float32 (N, D), open_memmap; rows of skipped images are zero
    progress.json    {"done": rows flushed so far, "skipped": [[index, reason], ...]}
    meta.json        written last: key, source/backbone description, valid count; its
                     presence marks the entry complete (and only then is it trusted)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from imgclust.backbones.base import Backbone
from imgclust.data.base import ImageSource
from imgclust.errors import BadImageError, InputError
from imgclust.progress import progress_bar
from imgclust.rundir import read_json, write_json

CACHE_FORMAT = 1


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
) -> FeatureSet:
    """Features for every image of ``source``; cached and resumable (see module docstring).

    ``precision``: ``"fp32"`` (default, exact) or ``"bf16"`` (autocast; about 2-3x faster on
    recent CPUs and on GPUs, features differ in the third decimal). bf16 is part of the
    cache key. ``workers``: threads that decode and resize images while the model runs
    (default: CPU count, at most 8).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise InputError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    n = len(source)
    if n == 0:
        raise InputError(f"{source.name}: no images")
    key = cache_key(source, backbone) + ("-bf16" if precision == "bf16" else "")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / "features" / key
    ids = source.ids()

    if use_cache:
        done = _load_complete(entry, n, backbone.dim, ids)
        if done is not None:
            return done

    t0 = time.perf_counter()
    if use_cache:
        entry.mkdir(parents=True, exist_ok=True)
        feats, start, skipped_idx = _open_partial(entry, n, backbone.dim)
    else:
        feats, start, skipped_idx = np.zeros((n, backbone.dim), np.float32), 0, {}

    dev = resolve_device(device)
    model = backbone.to(dev).eval()
    # channels_last: 1.6x faster convolutions on CPU (EfficientNet-Lite0 at 224 px: 24 vs 15 img/s).
    model = model.to(memory_format=torch.channels_last)
    pre = backbone.preprocess
    workers = workers or min(8, os.cpu_count() or 1)

    def load(i: int) -> np.ndarray | BadImageError:
        try:
            return pre.resize_image(source.read(i))
        except BadImageError as e:
            return e
        except Exception as e:  # a reader bug must not lose the run: count it as a bad image
            return BadImageError(f"unreadable ({type(e).__name__}: {e})")

    batches = [list(range(s, min(s + batch_size, n))) for s in range(start, n, batch_size)]
    bar = progress_bar(total=n, initial=start, desc=f"features {backbone.name}", unit="img", enable=progress)
    last_flush = start
    processed = 0
    t_model = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Prefetch: batch j+1 is decoded and resized (per image, in threads; Pillow releases
        # the GIL) while the model runs on batch j.
        def submit(b: list[int]) -> list:
            return [pool.submit(load, i) for i in b]

        nxt = submit(batches[0]) if batches else []
        for j, idx in enumerate(batches):
            cur, nxt = nxt, (submit(batches[j + 1]) if j + 1 < len(batches) else [])
            imgs = [f.result() for f in cur]
            good = [k for k, im in enumerate(imgs) if not isinstance(im, BadImageError)]
            for k, im in enumerate(imgs):
                if isinstance(im, BadImageError):
                    skipped_idx[idx[k]] = str(im) or "unreadable"
            if good:
                x = pre.to_tensor(np.stack([imgs[k] for k in good]))
                x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(x).float().cpu().numpy()
                if not np.all(np.isfinite(out)):
                    bad = ~np.isfinite(out).all(axis=1)
                    for k in np.flatnonzero(bad):
                        skipped_idx[idx[good[k]]] = "backbone produced non-finite features"
                    out[bad] = 0.0
                feats[[idx[k] for k in good]] = out
            processed += len(idx)
            bar.update(len(idx))
            end = idx[-1] + 1
            if use_cache and (end - last_flush >= chunk_rows or end == n):
                _flush(entry, feats, end, skipped_idx)
                last_flush = end
    bar.close()
    dt_model = time.perf_counter() - t_model
    valid = np.ones(n, dtype=bool)
    valid[list(skipped_idx)] = False
    skipped = [(i, ids[i], skipped_idx[i]) for i in sorted(skipped_idx)]
    ips = processed / dt_model if processed and dt_model > 0 else None
    if use_cache:
        write_json(
            entry / "meta.json",
            {
                "format": CACHE_FORMAT,
                "key": key,
                "n": n,
                "dim": backbone.dim,
                "n_valid": int(valid.sum()),
                "source": {k: v for k, v in source.describe().items()},
                "backbone": backbone.describe(),
                "precision": precision,
                "images_per_second": ips,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        del feats
        fs = _load_complete(entry, n, backbone.dim, ids)
        assert fs is not None
        fs.from_cache = False
        fs.seconds = time.perf_counter() - t0
        fs.images_per_second = ips
        return fs
    return FeatureSet(feats, valid, skipped, key, None, False, time.perf_counter() - t0, ips)


def _flush(entry: Path, feats: np.ndarray, done: int, skipped: dict[int, str]) -> None:
    if isinstance(feats, np.memmap):
        feats.flush()
    write_json(entry / "progress.json", {"done": done, "skipped": sorted([int(i), r] for i, r in skipped.items())})


def _open_partial(entry: Path, n: int, dim: int) -> tuple[np.ndarray, int, dict[int, str]]:
    """Open features.npy for writing, resuming after the last flushed row when possible."""
    fpath, ppath = entry / "features.npy", entry / "progress.json"
    if fpath.exists() and ppath.exists():
        try:
            prog = read_json(ppath)
            feats = open_memmap(fpath, mode="r+")
            if feats.shape == (n, dim) and feats.dtype == np.float32 and 0 <= int(prog["done"]) <= n:
                return feats, int(prog["done"]), {int(i): str(r) for i, r in prog["skipped"]}
            del feats
        except (ValueError, KeyError, OSError, json.JSONDecodeError):
            pass
    # Nothing trustworthy: start over.
    for p in entry.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    feats = open_memmap(fpath, mode="w+", dtype=np.float32, shape=(n, dim))
    _flush(entry, feats, 0, {})
    return feats, 0, {}


def _load_complete(entry: Path, n: int, dim: int, ids: list[str]) -> FeatureSet | None:
    """The finished cache entry as a read-only memmap, or None when absent/incomplete/corrupt."""
    meta_p, prog_p, feat_p = entry / "meta.json", entry / "progress.json", entry / "features.npy"
    if not (meta_p.exists() and prog_p.exists() and feat_p.exists()):
        return None
    try:
        meta, prog = read_json(meta_p), read_json(prog_p)
        feats = np.load(feat_p, mmap_mode="r")
        skipped_idx = {int(i): str(r) for i, r in prog["skipped"]}
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError):
        return None
    if feats.shape != (n, dim) or meta.get("n") != n or int(prog.get("done", -1)) != n:
        return None
    valid = np.ones(n, dtype=bool)
    valid[list(skipped_idx)] = False
    if int(valid.sum()) != meta.get("n_valid"):
        return None
    skipped = [(i, ids[i], skipped_idx[i]) for i in sorted(skipped_idx)]
    return FeatureSet(feats, valid, skipped, meta["key"], entry, True, 0.0, meta.get("images_per_second"))
