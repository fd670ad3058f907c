"""``imgclust apply-edits RUN --out RUN2``: a new run with the reviewed labels and a retrained model.

The edits of ``RUN/edits.jsonl`` are replayed (:func:`imgclust.refine.edits.replay`) on the
original assignments, which stay untouched. The new run directory holds:

* ``assignments.csv``: the edited labels (an image no edit touched keeps its cluster, so the
  two runs differ exactly by the edits), with an ``edit`` column (``move``, ``merge``,
  ``split``, ``outlier`` or empty); ``confidence`` is the retrained model's probability of
  that cluster (1.0 for the images the user moved);
* ``changes.csv``: id, path, old cluster, new cluster and why, for every image that changed;
* ``model/``: the ``reviewed`` method (:mod:`imgclust.methods.reviewed`) self-trained on the
  edited labels with the moved images as certain labels, so ``imgclust predict`` reflects the
  corrections; ``applied_edits.jsonl`` (the log that was applied), ``run.json`` (with
  ``edited_from``, ``cluster_names`` and an ``edits`` summary), ``duplicates.csv``/``outliers.csv``
  and report.html (which lists what changed).

Lives here (a face-level module), not in ``refine/``, because writing a run needs the estimator
of :mod:`imgclust.api`.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.errors import InputError
from imgclust.refine.edits import EDITS_NAME, read_log, replay
from imgclust.report.rundata import load_run, load_run_features, open_run_source
from imgclust.rundir import clean_stale_tmp, read_json, write_csv, write_json


def run_features(run_dir: str | Path) -> tuple[Any, Any, np.ndarray | None, np.ndarray]:
    """(RunData, source, features of the run's assignment rows or None, source index of each row)."""
    data = load_run(run_dir)
    source = open_run_source(data.run)
    pos = {s: i for i, s in enumerate(source.ids())}
    missing = [i for i in data.ids if i not in pos]
    if missing:
        raise InputError(f"{len(missing)} image id(s) of assignments.csv are not in the source, e.g. {missing[0]!r}")
    rows = np.asarray([pos[i] for i in data.ids], dtype=np.int64)
    feats = load_run_features(data.run, len(source))
    return data, source, None if feats is None else np.asarray(feats[rows], dtype=np.float32), rows


def apply_edits(run_dir: str | Path, out_dir: str | Path, seed: int | None = None, progress: bool = True,
                report: bool = True) -> dict[str, Any]:
    """Write the reviewed run ``out_dir`` from ``run_dir`` and its edit log; returns its run.json summary."""
    from imgclust.api import ImageClusterer
    from imgclust.duplicates import find_quality, thumb_vectors, write_quality
    from imgclust.methods import FitContext
    from imgclust.methods.reviewed import Reviewed
    from imgclust.metrics import evaluate

    t0 = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty directory; give a new --out")
    if out.resolve() == run_dir.resolve():
        raise InputError("--out must be a new directory, not the reviewed run itself")
    log = read_log(run_dir)
    data, source, feats, src_rows = run_features(run_dir)
    if feats is None:
        raise InputError(f"{run_dir}: the run's cached features are gone; run `imgclust cluster` again to rebuild them")
    index = {s: i for i, s in enumerate(data.ids)}
    rep = replay(data.clusters, log, index, feats, data.k)
    if not rep.active:
        raise InputError(f"{run_dir} has no edits to apply (edits.jsonl is empty or every edit is undone)")
    seed = int(data.run.get("seed", 0) if seed is None else seed)
    k = int(max(rep.n_clusters, data.k))
    train = ~rep.outlier
    if train.sum() < 2:
        raise InputError("fewer than 2 images are left for retraining after the outlier marks")
    model = Reviewed(k)
    model.fit(feats[train], FitContext(seed=seed, device="cpu", progress=progress,
                                       labels=rep.labels[train], certain=rep.moved[train]))
    proba = model.predict_proba(feats)
    conf = proba[np.arange(len(feats)), rep.labels]
    conf[rep.moved] = 1.0

    params = dict(read_json(run_dir / "model" / "model.json")["params"])
    est = ImageClusterer(**params)
    est.set_params(n_clusters=k, method="reviewed", method_options=model.config.to_dict(), pca=None,
                   pca_whiten=False, progress=progress)
    est.model_ = model
    est.n_features_in_ = feats.shape[1]
    n_src = len(source)
    est.labels_ = np.full(n_src, -1, np.int64)
    est.labels_[src_rows] = rep.labels
    est.confidences_ = np.zeros(n_src, np.float32)
    est.confidences_[src_rows] = conf
    est.source_ = source
    est.get_backbone()  # model.json records the backbone's weights digest, checked on load

    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    header = ["id", "path", "cluster", "confidence"] + (["label"] if data.label_names is not None else []) + ["edit"]
    rows = []
    for i in range(len(data.ids)):
        r = [data.ids[i], data.paths[i], int(rep.labels[i]), f"{conf[i]:.4f}"]
        if data.label_names is not None:
            r.append(data.label_names[i])
        rows.append(r + [rep.reason[i]])
    write_csv(out / "assignments.csv", header, rows)
    changed = np.flatnonzero((rep.labels != data.clusters) | rep.outlier | rep.moved)
    write_csv(out / "changes.csv", ["id", "path", "old_cluster", "new_cluster", "edit"],
              [(data.ids[i], data.paths[i], int(data.clusters[i]), int(rep.labels[i]), rep.reason[i]) for i in changed])
    if (run_dir / "skipped.csv").is_file():
        shutil.copyfile(run_dir / "skipped.csv", out / "skipped.csv")
    shutil.copyfile(run_dir / EDITS_NAME, out / "applied_edits.jsonl")
    if (run_dir / "config.toml").is_file():
        shutil.copyfile(run_dir / "config.toml", out / "config.toml")
    metrics = None
    if source.labels is not None and (np.asarray(source.labels)[src_rows] >= 0).any():
        y = np.asarray(source.labels)[src_rows]
        metrics = evaluate(y, rep.labels)
        write_json(out / "metrics.json", metrics)
    est.save(out / "model")
    q = find_quality(feats, thumbs=thumb_vectors(source, src_rows), seed=seed)
    write_quality(out, q, data.ids, data.paths, rep.labels)
    sizes = np.bincount(rep.labels, minlength=k)
    summary = dict(data.run)
    summary.update({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "edited_from": str(run_dir.resolve()),
        "cluster_sizes": sizes.tolist(),
        "empty_clusters": [int(c) for c in np.flatnonzero(sizes == 0)],
        "cluster_names": {str(c): n for c, n in sorted(rep.names.items())},
        "metrics": metrics,
        "edits": {"n_applied": len(rep.active), "ops": dict(Counter(e["op"] for e in rep.active)),
                  "n_changed": int((rep.labels != data.clusters).sum()), "n_moved": int(rep.moved.sum()),
                  "n_outliers_marked": int(rep.outlier.sum()), "metrics_before": data.metrics,
                  "model": model.history_, "file": "changes.csv"},
        "out_dir": str(out.resolve()),
    })
    summary["timings_s"] = {**(data.run.get("timings_s") or {}), "apply_edits": round(time.perf_counter() - t0, 3)}
    write_json(out / "run.json", summary)
    if report:
        try:
            from imgclust.report import build_report

            summary["report"] = build_report(out, map_method="pca" if len(feats) < 2000 else "auto", seed=seed)
        except Exception as e:  # noqa: BLE001 - the run is written; the report is a view of it
            summary["report"] = {"error": f"{type(e).__name__}: {e}"}
    return summary
