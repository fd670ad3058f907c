"""Shared pytest fixtures."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The report's map uses PCA in tests: UMAP's first call per process compiles for ~30 s.
os.environ.setdefault("IMGCLUST_REPORT_MAP", "pca")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared data folder, from ``$IMGCLUST_SHARED`` (skips when unset).

    A relative value is resolved against the current directory, then the repository root
    (CI sets ``IMGCLUST_SHARED=../shared``).
    """
    value = os.environ.get("IMGCLUST_SHARED")
    if not value:
        pytest.skip("IMGCLUST_SHARED is not set")
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    pytest.skip(f"IMGCLUST_SHARED={value} is not a folder")


@pytest.fixture(scope="session")
def digits_xy():
    """scikit-learn's 1,797 8x8 digits as (float32 features, labels)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.fixture
def anon_growth_mb() -> Callable:
    """``measure(fn)`` -> (``fn()``, the peak growth in MB of this process's anonymous memory while it
    ran): what a memory-mapped input must not be copied into (sampled every 10 ms, and at the end)."""

    def measure(fn: Callable):
        base, peak, stop = _anon_mb(), [0.0], threading.Event()

        def watch() -> None:
            while not stop.wait(0.01):
                peak[0] = max(peak[0], _anon_mb())

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            out = fn()
        finally:
            stop.set()
            t.join()
        return out, max(peak[0], _anon_mb()) - base

    return measure
