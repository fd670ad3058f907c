"""Sharded feature extraction under ``torchrun``: every rank fills its part of ONE cache entry.

Launched with ``torchrun --nproc_per_node=P`` (or several nodes sharing the cache directory on
a shared filesystem), :func:`extract_features` (this module's, the one api.py and
multibackbone.py call) hands :func:`extract_sharded` to :func:`imgclust.features.extract_features`
as the entry filler; features.py itself never imports this module (one-way flow). The work is the
same list of batches a single process would run (``range(s, s + batch_size)`` for s = 0,
batch_size, ...); rank r of P takes the contiguous block ``dist.shard(n_batches)`` of that
list. Because every batch holds exactly the rows it holds in one process, each row goes
through the same kernel with the same batch shape, so the finished ``features.npy`` is byte
for byte the file a single process writes (tested: same sha256), and so is meta.json's digest.

Protocol (cache layout as in :mod:`imgclust.features`, plus one progress file per rank):

1. rank 0 takes the entry's ``flock`` (kept until the end, so a single-process run of the
   same entry waits instead of writing concurrently), checks for a finished entry (then every
   rank memory-maps it), else creates/keeps ``features.npy`` (preallocated) and tells the others;
2. every rank writes its batches through its own ``r+`` memmap of the same file and, every
   ``chunk_rows`` rows, flushes them and atomically rewrites ``shard-<r>-of-<P>.json``
   (rows ``[lo, hi)``, batch size, chunks with their sha256, skipped images);
3. barrier; rank 0 merges the shard files into ``progress.json``, writes ``meta.json``
   (size, full sha256, sampled digest) last, removes the shard files; barrier; every rank
   memory-maps the finished entry.

A rank that is killed (SIGKILL, OOM, node loss) loses at most one chunk: re-running the same
``torchrun`` command resumes every rank after its last verified chunk (tested). The shard
files are keyed by P, so a re-run with another process count recomputes. Deviation from the
single-process resume: a partial entry left by a single-process run is not reused by a sharded
run (its rows are recomputed); the finished cache is shared both ways.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

from imgclust.backbones.base import Backbone
from imgclust.data.base import ImageSource
from imgclust.diskspace import reserve_path, writing
from imgclust.progress import progress_bar
from imgclust.rundir import clean_stale_tmp, exclusive_lock, file_sha256, read_json, write_json
from imgclust.train import dist


def _rows_digest(feats: np.ndarray, a: int, b: int) -> str:
    # Same digest as features.py's chunk digests (sha256 of the rows' bytes).
    return hashlib.sha256(memoryview(np.ascontiguousarray(feats[a:b]))).hexdigest()


def _shard_path(entry: Path, r: int, w: int) -> Path:
    return entry / f"shard-{r}-of-{w}.json"


def _broadcast_flag(value: int) -> int:
    t = torch.tensor([value if dist.is_main() else 0], dtype=torch.int64)
    return int(dist.all_reduce_sum(t).item())


def _rank_device(device: str) -> str:
    if device == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def extract_features(source: ImageSource, backbone: Backbone, **kw: Any) -> Any:
    """:func:`imgclust.features.extract_features`, sharded over the ranks when launched by torchrun."""
    from imgclust import features as F

    if dist.init_from_env():
        kw.setdefault("to_entry", extract_sharded)
    return F.extract_features(source, backbone, **kw)


def extract_sharded(source: ImageSource, backbone: Backbone, entry: Path, *, key: str,
                    verify_cache: bool | None, batch_size: int, device: str, precision: str,
                    workers: int | None, chunk_rows: int, progress: bool, engine: str,
                    cache_root: Path) -> Any:
    """The finished cache entry ``entry``, computed by all ranks together (module docstring)."""
    from imgclust import features as F

    n, dim = len(source), backbone.dim
    r, w = dist.rank(), dist.world_size()
    t0 = time.perf_counter()
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = contextlib.ExitStack()
    status = "fresh"
    try:
        finished = 0
        if dist.is_main():
            lock.enter_context(exclusive_lock(entry.parent / f"{entry.name}.lock"))
            entry.mkdir(parents=True, exist_ok=True)
            clean_stale_tmp(entry)
            check = "full" if verify_cache else ("sampled" if verify_cache is False else "auto")
            if F._load_complete(entry, n, dim, source.ids(), check=check) is not None:
                finished = 1
            else:
                if (entry / "meta.json").exists():
                    F._wipe(entry)
                    status = "recomputed (cache entry failed verification)"
                _prepare_file(entry, n, dim)
        if _broadcast_flag(finished):
            dist.barrier()
            fs = F._load_complete(entry, n, dim, source.ids(), check="none")
            assert fs is not None
            return fs
        dist.barrier()  # features.npy exists and has its final size

        rows, processed, ips, eng_desc, resumed = _run_shard(
            source, backbone, entry, r, w, batch_size=batch_size, device=_rank_device(device),
            precision=precision, workers=workers, chunk_rows=chunk_rows, progress=progress, engine=engine,
            cache_root=cache_root)
        counts = torch.tensor([processed, resumed], dtype=torch.int64)
        dist.all_reduce_sum(counts)
        dist.barrier()  # every shard flushed and recorded
        if dist.is_main():
            _finalise(entry, source, backbone, key=key, w=w, precision=precision, engine_desc=eng_desc,
                      ips=ips * w if ips else None)
        dist.barrier()
    finally:
        lock.close()
    fs = F._load_complete(entry, n, dim, source.ids(), check="none")
    assert fs is not None
    fs.from_cache = False
    fs.seconds = time.perf_counter() - t0
    fs.rows_computed = int(counts[0])
    fs.resumed_from = int(counts[1])
    fs.cache_status = "resumed" if int(counts[1]) > 0 and status == "fresh" else status
    return fs


def _prepare_file(entry: Path, n: int, dim: int) -> None:
    """Keep a features.npy of the right shape (shard files may resume into it), else create it."""
    fpath = entry / "features.npy"
    if fpath.exists():
        try:
            f = np.load(fpath, mmap_mode="r", allow_pickle=False)
            if f.shape == (n, dim) and f.dtype == np.float32:
                del f
                reserve_path(fpath, fpath.stat().st_size, remove_on_failure=False)
                return
            del f
        except (ValueError, OSError):
            pass
    from imgclust import features as F

    F._wipe(entry)
    with writing(fpath, n * dim * 4):
        feats = open_memmap(fpath, mode="w+", dtype=np.float32, shape=(n, dim))
    del feats
    reserve_path(fpath, fpath.stat().st_size)


def _shard_state(entry: Path, feats: np.ndarray, r: int, w: int, lo: int, hi: int,
                 batch_size: int) -> tuple[int, list[list], dict[int, str]]:
    """Where this rank resumes: after the leading run of its recorded chunks that still verify."""
    p = _shard_path(entry, r, w)
    if p.exists():
        try:
            s = read_json(p)
            if [int(s["lo"]), int(s["hi"]), int(s["batch_size"])] == [lo, hi, batch_size]:
                start, chunks = lo, []
                for a, b, digest in s["chunks"]:
                    a, b = int(a), int(b)
                    if a != start or not start < b <= hi or _rows_digest(feats, a, b) != digest:
                        break
                    chunks.append([a, b, str(digest)])
                    start = b
                skipped = {int(i): str(why) for i, why in s["skipped"] if int(i) < start}
                return start, chunks, skipped
        except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError):
            pass
    return lo, [], {}


def _record(entry: Path, feats: np.memmap, r: int, w: int, lo: int, hi: int, batch_size: int, a: int, b: int,
            chunks: list[list], skipped: dict[int, str]) -> None:
    feats.flush()  # rows durable before the shard file claims them
    if b > a:
        chunks.append([int(a), int(b), _rows_digest(feats, a, b)])
    write_json(_shard_path(entry, r, w), {"lo": lo, "hi": hi, "batch_size": batch_size, "done": int(b),
                                          "chunks": chunks,
                                          "skipped": sorted([int(i), why] for i, why in skipped.items())})


def _run_shard(source: ImageSource, backbone: Backbone, entry: Path, r: int, w: int, *, batch_size: int,
               device: str, precision: str, workers: int | None, chunk_rows: int, progress: bool, engine: str,
               cache_root: Path) -> tuple[int, int, float | None, Any, int]:
    from imgclust.engines.pipeline import make_engine, make_loader, prefetched
    from imgclust.features import resolve_device, write_batch

    n = len(source)
    starts = list(range(0, n, batch_size))
    mine = dist.shard(len(starts), r, w)
    lo = starts[mine.start] if len(mine) else n
    hi = min(starts[mine.stop - 1] + batch_size, n) if len(mine) else n
    feats = open_memmap(entry / "features.npy", mode="r+")
    start, chunks, skipped = _shard_state(entry, feats, r, w, lo, hi, batch_size)
    resumed = start - lo
    batches = [list(range(s, min(s + batch_size, hi))) for s in range(start, hi, batch_size)]
    load = make_loader(source, backbone.preprocess)
    eng = make_engine(source, backbone, load, engine=engine, precision=precision, device=resolve_device(device),
                      cache_root=cache_root, rows=hi - start) if batches else None
    bar = progress_bar(total=hi - lo, initial=start - lo, desc=f"features {backbone.name} [rank {r}/{w}]",
                       unit="img", enable=progress)
    last = written = start
    processed = 0
    t_model = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for idx, imgs in prefetched(pool, load, batches):
                write_batch(eng, idx, imgs, feats, skipped)
                written = idx[-1] + 1
                processed += len(idx)
                bar.update(len(idx))
                if written - last >= chunk_rows or written == hi:
                    _record(entry, feats, r, w, lo, hi, batch_size, last, written, chunks, skipped)
                    last = written
        if not batches:
            _record(entry, feats, r, w, lo, hi, batch_size, start, start, chunks, skipped)
    except BaseException:
        if written > last:
            with contextlib.suppress(Exception):
                _record(entry, feats, r, w, lo, hi, batch_size, last, written, chunks,
                        {i: why for i, why in skipped.items() if i < written})
        raise
    finally:
        bar.close()
    dt = time.perf_counter() - t_model
    del feats
    return processed, processed, (processed / dt if processed and dt > 0 else None), \
        (eng.describe() if eng is not None else None), resumed


def _finalise(entry: Path, source: ImageSource, backbone: Backbone, *, key: str, w: int, precision: str,
              engine_desc: Any, ips: float | None) -> None:
    """Merge the shard files into progress.json and write meta.json (the completion mark) last."""
    from imgclust import features as F

    n = len(source)
    chunks: list[list] = []
    skipped: dict[int, str] = {}
    for r in range(w):
        s = read_json(_shard_path(entry, r, w))
        if int(s["done"]) != int(s["hi"]):
            raise RuntimeError(f"rank {r} did not finish its shard ({s['done']} of [{s['lo']}, {s['hi']}))")
        chunks += s["chunks"]
        skipped.update({int(i): str(why) for i, why in s["skipped"]})
    chunks.sort(key=lambda c: c[0])
    write_json(entry / "progress.json", {"done": n, "skipped": sorted([i, why] for i, why in skipped.items()),
                                         "chunks": chunks})
    fpath = entry / "features.npy"
    size = fpath.stat().st_size
    # The same fields as a single-process run's meta.json (features.py), plus the process count.
    write_json(entry / "meta.json", {
        "format": F.CACHE_FORMAT, "key": key, "n": n, "dim": backbone.dim, "n_valid": n - len(skipped),
        "bytes": size, "sha256": file_sha256(fpath), "sample_sha256": F._sampled_sha256(fpath, size),
        "source": dict(source.describe()), "backbone": backbone.describe(), "precision": precision,
        "engine": engine_desc, "images_per_second": ips, "processes": w,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    for p in entry.glob("shard-*-of-*.json"):
        p.unlink()
