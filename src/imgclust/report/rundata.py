"""Reading a finished run directory back: the files ``imgclust cluster`` wrote, and its source.

Used by ``imgclust report`` and ``imgclust export``, which run after (and apart from) the
clustering: everything they need is in the run directory (``run.json`` records the source
configuration and the feature-cache entry), so no state is passed between processes.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.data import ImageSource
from imgclust.errors import BadImageError, InputError
from imgclust.rundir import read_json


@dataclass
class RunData:
    """A run directory's contents. ``rows`` are assignments.csv's rows (valid images only)."""

    run_dir: Path
    run: dict[str, Any]
    ids: list[str]
    paths: list[str]
    clusters: np.ndarray  # (n,) int
    confidence: np.ndarray  # (n,) float
    label_names: list[str] | None  # per row, as written in assignments.csv (class name or number)
    metrics: dict[str, Any] | None = None
    choose_k: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.run.get("cluster_sizes") or []) or int(self.clusters.max()) + 1


def load_run(run_dir: str | Path) -> RunData:
    """Read ``run.json`` and ``assignments.csv`` (and ``metrics.json``/``choose_k.json`` when present)."""
    d = Path(run_dir)
    if not (d / "run.json").is_file():
        raise InputError(f"{d} is not a complete run directory (no run.json); run `imgclust cluster` first")
    if not (d / "assignments.csv").is_file():
        raise InputError(f"{d}: assignments.csv is missing")
    ids, paths, clusters, conf, labels = [], [], [], [], []
    try:  # files of a run are still files from disk: a damaged one is one line, not a KeyError
        run = read_json(d / "run.json")
        if not isinstance(run, dict):
            raise ValueError("run.json is not a JSON object")
        with open(d / "assignments.csv", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"id", "cluster", "confidence"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"assignments.csv lacks column(s) {sorted(missing)}")
            have_label = "label" in (reader.fieldnames or [])
            for r in reader:
                ids.append(r["id"])
                paths.append(r.get("path") or "")
                clusters.append(int(r["cluster"]))
                conf.append(float(r["confidence"]))
                if have_label:
                    labels.append(r["label"])
        metrics = read_json(d / "metrics.json") if (d / "metrics.json").is_file() else None
        ck = read_json(d / "choose_k.json") if (d / "choose_k.json").is_file() else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{d}: damaged run files ({type(e).__name__}: {e}); re-run `imgclust cluster`") from None
    return RunData(d, run, ids, paths, np.asarray(clusters, dtype=np.int64), np.asarray(conf, dtype=np.float64),
                   labels if have_label else None, metrics, ck)


def open_run_source(run: dict[str, Any]) -> ImageSource:
    """Re-open the run's source exactly as ``cluster`` did (same split, kind, labels, ``--limit`` subset and seed).

    Raises InputError when it cannot be opened, or when its fingerprint differs from the
    one recorded in run.json (the images changed since the run).
    """
    from imgclust.data.recorded import open_recorded_source

    cfg = run.get("config") or {}
    s = cfg.get("source") or {}
    src = open_recorded_source({"path": "", **s}, seed=int(cfg.get("seed", 0)))
    want = run.get("data_fingerprint")
    if want and src.fingerprint() != want:
        raise InputError(f"the source {s.get('path')!r} changed since this run (fingerprint differs)")
    return src


def raw_bytes(source: ImageSource, i: int) -> bytes | None:
    """The original encoded bytes of image ``i`` when it lives in an archive, else None.

    Reaches into ArchiveSource's member reader (through any SubsetSource view) so an export
    keeps the archived file byte for byte instead of re-encoding decoded pixels.
    """
    from imgclust.data.base import SubsetSource

    while isinstance(source, SubsetSource):
        i = int(source.indices[i])
        source = source.base
    reader = getattr(source, "_member_bytes", None)
    if reader is None:
        return None
    try:
        return reader(i)
    except BadImageError:
        return None


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def load_run_features(run: dict[str, Any], n_images: int) -> np.ndarray | None:
    """The run's backbone features (memory-mapped, one row per source image) from the feature
    cache entry recorded in run.json, or None when the entry is gone or does not match."""
    entry = (run.get("features") or {}).get("cache")
    if not entry:
        return None
    p = Path(entry)
    try:
        meta = read_json(p / "meta.json")
        if meta.get("key") != run["features"].get("key") or meta.get("sha256") != run["features"].get("sha256"):
            return None
        feats = np.load(p / "features.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None
    if feats.ndim != 2 or len(feats) != n_images:
        return None
    return feats
