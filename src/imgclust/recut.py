"""``imgclust recut RUN --k N --out RUN2``: cut a finished run's merge tree at another K.

No training and no feature extraction: the run's ``hierarchy.json`` holds every image's leaf
and the merges (:class:`imgclust.hierarchy.MergeTree`), so the new clusters are one
union-find pass and one lookup per image; ``assignments.csv`` is rewritten with them. The
trust score is recomputed when the run's feature-cache entry is still there, and
``metrics.json`` when the run has labels. A recut run has no ``model/``: its clusters are
unions of the leaves, not a model that predicts (re-run ``imgclust cluster --k N`` for one).
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.errors import InputError
from imgclust.hierarchy import MergeTree
from imgclust.rundir import read_json, write_csv, write_json

HIERARCHY_NAME = "hierarchy.json"


def load_tree(run_dir: str | Path) -> tuple[MergeTree, dict[str, Any]]:
    """The run's merge tree and the raw hierarchy.json dict."""
    p = Path(run_dir) / HIERARCHY_NAME
    if not p.is_file():
        raise InputError(f"{run_dir} has no {HIERARCHY_NAME}: only runs made with --k auto can be re-cut")
    try:
        d = read_json(p)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{p}: expected a JSON object")
    return MergeTree.from_dict(d), d


def recut_run(run_dir: str | Path, k: int, out: str | Path, *, report: bool = True, map_method: str = "pca") -> dict[str, Any]:
    """Write ``out`` as ``run_dir`` cut at ``k`` clusters; returns the new run summary."""
    t0 = time.perf_counter()
    src, dst = Path(run_dir), Path(out)
    if not (src / "run.json").is_file() or not (src / "assignments.csv").is_file():
        raise InputError(f"{src} is not a complete run directory (run.json and assignments.csv expected)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError("--out must be a new directory, not the run being re-cut")
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / "run.json").is_file())):
        raise InputError(f"{dst} exists and is not an imgclust run directory; choose another --out")
    tree, hdict = load_tree(src)
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= tree.n_leaves:
        raise InputError(f"--k must be between 2 and the tree's {tree.n_leaves} leaves, got {k!r}")
    run = read_json(src / "run.json")
    with open(src / "assignments.csv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    if len(rows) != len(tree.leaves):
        raise InputError(f"{src}: assignments.csv has {len(rows)} rows but the hierarchy {len(tree.leaves)} leaves")
    if header[:4] != ["id", "path", "cluster", "confidence"]:
        raise InputError(f"{src}: unexpected assignments.csv columns {header}")
    labels = tree.cut(k)
    t_cut = time.perf_counter() - t0

    trust = None
    feats = _features(run, hdict, len(rows))
    if feats is not None:
        from imgclust.trust import trust_score

        trust = trust_score(feats, labels, seed=int(run.get("seed", 0)))
    per = (trust or {}).get("per_cluster") or [None] * k
    # no per-image model after a recut: an image's confidence is its cluster's trust (clipped to [0, 1])
    conf = [f"{min(max(per[c] if per[c] is not None else 1.0, 0.0), 1.0):.4f}" for c in range(k)]
    for r, c in zip(rows, labels):
        r[2] = str(int(c))
        r[3] = conf[int(c)]

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "run.json").unlink(missing_ok=True)
    for stale in ("report.html", "metrics.json", "choose_k.json", "skipped.csv"):
        (dst / stale).unlink(missing_ok=True)
    if (dst / "model").is_dir() and (dst / "model" / "model.json").is_file():
        shutil.rmtree(dst / "model")  # a previous full run in this folder: its model predicts other clusters
    write_csv(dst / "assignments.csv", header, rows)
    for name in ("skipped.csv", "choose_k.json", "config.toml"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    hdict = dict(hdict, k=int(k))
    write_json(dst / HIERARCHY_NAME, hdict)
    metrics = None
    if len(header) > 4 and header[4] == "label":
        from imgclust.metrics import evaluate

        names = [r[4] for r in rows]
        known = np.array([n not in ("", "-1") for n in names])
        if known.any():
            y = np.full(len(names), -1, np.int64)
            y[known] = np.unique(np.asarray(names)[known], return_inverse=True)[1]
            metrics = evaluate(y, labels)
            write_json(dst / "metrics.json", metrics)
    summary = dict(run)
    summary.update({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cluster_sizes": np.bincount(labels, minlength=k).tolist(),
        "empty_clusters": [],
        "metrics": metrics,
        "trust": trust,
        "recut": {"from": str(src.resolve()), "k": int(k), "k_original": len(run.get("cluster_sizes") or []),
                  "candidates": tree.candidates, "cut_s": round(t_cut, 4)},
        "method_history": {},
        "out_dir": str(dst.resolve()),
    })
    summary["timings_s"] = dict(run.get("timings_s") or {}, recut=round(time.perf_counter() - t0, 3))
    write_json(dst / "run.json", summary)
    if report:
        from imgclust.report import build_report

        try:
            summary["report"] = build_report(dst, map_method=map_method)
        except Exception as e:  # noqa: BLE001 - the recut is written; the report is a view of it
            summary["report"] = {"error": f"{type(e).__name__}: {e}"}
    summary["timings_s"]["total_with_report"] = round(time.perf_counter() - t0, 3)
    return summary


def _features(run: dict[str, Any], hdict: dict[str, Any], n_rows: int) -> np.ndarray | None:
    """The run's features for the assignments rows, from its feature-cache entry (None when gone)."""
    from imgclust.report.rundata import load_run_features

    feats = load_run_features(run, int(run.get("n_images", n_rows)))
    if feats is None:
        return None
    rows = hdict.get("rows")
    idx = np.arange(n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(idx) != n_rows or (len(idx) and idx.max() >= len(feats)):
        return None
    return np.asarray(feats[idx], dtype=np.float32)
