"""One thread limit for every parallel runtime imgclust uses: torch, faiss, BLAS/OpenMP, numba.

Why: each of torch (intra-op pool), faiss (OpenMP), NumPy's BLAS and numba (UMAP) starts as
many threads as there are cores. On a busy machine (other jobs holding the cores) OpenMP's
spinning workers then wait on each other: on the 2-core development machine with a load of
~5, the k-means step on digits took 11.4 s with the default 2 threads and 0.167 s with one
(issue 24; this module's measurements are in ``docs/notes/issue-24.md`` and
``benchmarks/threads_busy.py``).

The default (``threads=None`` / ``"auto"``), in order:

1. ``IMGCLUST_THREADS`` or ``OMP_NUM_THREADS`` when set (the user already decided);
2. the CPUs this process may run on: ``os.sched_getaffinity`` (taskset, cpusets), capped by
   a cgroup CPU quota (``cpu.max`` v2, ``cpu.cfs_quota_us`` v1: containers, Slurm);
3. minus the other processes already running: the whole part of the 1-minute load average
   (when it is known) is subtracted, at least 1 (a fractional load is the lagging trace of
   processes that just ended: on an idle 2-core box at load 0.8, rounding it away halved the
   speed of an extraction, 31 vs 60 img/s). A machine whose load is at or
   above its CPU count gets 1 thread: oversubscribed OpenMP is slower than one thread.

:func:`apply_threads` sets the limit on all runtimes at once (and the environment variables
that libraries loaded later read); it is called once at the start of each command and of
``ImageClusterer.fit`` / ``predict``. Image decoding has its own ``workers`` pool (I/O bound,
mostly in Pillow without the GIL) and is not limited here.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

from imgclust.errors import InputError

#: environment variables read by libraries at import time; set for the ones not loaded yet.
_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

#: the user's own settings, read once: apply_threads writes these variables itself.
_USER_ENV = {var: os.environ.get(var, "") for var in ("IMGCLUST_THREADS", "OMP_NUM_THREADS")}
_applied: dict[str, Any] = {}
_blas_limiter: Any = None  # threadpoolctl's limiter, kept alive (the limit is global until restored)


def cpu_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), None if unlimited."""
    root = Path(root)
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if q <= 0 or p <= 0 else q / p
    return None


def available_cpus() -> int:
    """CPUs this process may use: affinity mask capped by the cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        n = os.cpu_count() or 1
    q = cpu_quota()
    if q is not None:
        n = min(n, max(1, math.floor(q)))
    return max(1, n)


def _env_threads() -> tuple[int, str] | None:
    for var in ("IMGCLUST_THREADS", "OMP_NUM_THREADS"):
        v = _USER_ENV[var].strip() if var == "OMP_NUM_THREADS" else os.environ.get(var, "").strip()
        if v:
            try:
                n = int(v.split(",")[0])
            except ValueError:
                continue
            if n >= 1:
                return n, f"${var}"
    return None


def default_threads(load: float | None = None) -> tuple[int, str]:
    """(threads, why) for ``threads="auto"``; ``load`` overrides the 1-minute load average (tests)."""
    env = _env_threads()
    if env is not None:
        return env
    n = available_cpus()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
    if load is None:
        return n, f"{n} available CPU(s)"
    free = max(1, min(n, n - math.floor(load)))
    return free, f"{n} available CPU(s), load {load:.1f}"


def resolve_threads(threads: int | str | None) -> tuple[int, str]:
    """An explicit count (>= 1) or None / "auto" / 0 -> (threads, why)."""
    if threads is None or threads == "auto" or threads == 0:
        return default_threads()
    if isinstance(threads, str):
        try:
            threads = int(threads)
        except ValueError:
            raise InputError(f"threads must be a positive integer or 'auto', got {threads!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer or 'auto', got {threads!r}")
    return threads, "requested"


def apply_threads(threads: int | str | None = None) -> dict[str, Any]:
    """Limit torch, faiss, BLAS/OpenMP and numba to one thread count; returns what was set.

    Idempotent and cheap: called at the start of every command and ``fit``. The result is
    recorded in run.json (``threads``).
    """
    global _blas_limiter
    n, why = resolve_threads(threads)
    for var in _ENV_VARS:  # for libraries (and worker processes) that read them later
        if var == "NUMBA_NUM_THREADS" and "numba" in sys.modules:
            continue  # numba read it at import; changing it now breaks numba's own checks
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op parallel work
        torch.set_num_interop_threads(n)
    info: dict[str, Any] = {"limit": n, "why": why, "torch": torch.get_num_threads()}
    try:
        import faiss

        faiss.omp_set_num_threads(n)
        info["faiss"] = int(faiss.omp_get_max_threads())
    except ImportError:  # pragma: no cover - faiss is a core dependency
        info["faiss"] = None
    try:
        from threadpoolctl import threadpool_limits

        if _blas_limiter is not None:
            _blas_limiter.restore_original_limits()
        _blas_limiter = threadpool_limits(limits=n)  # BLAS and every OpenMP runtime loaded so far
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        pass
    if "numba" in sys.modules:  # UMAP imports it; only then is its pool worth configuring
        numba = sys.modules["numba"]
        with contextlib.suppress(Exception):
            numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))
            info["numba"] = int(numba.get_num_threads())
    _applied.clear()
    _applied.update(info)
    return dict(info)


def current_threads() -> dict[str, Any]:
    """What :func:`apply_threads` last set (empty if never called), for run.json."""
    return dict(_applied)


__all__ = ["apply_threads", "available_cpus", "cpu_quota", "current_threads", "default_threads", "resolve_threads"]
