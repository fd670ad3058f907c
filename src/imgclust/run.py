"""Jobs that write run directories: cluster, refine, choose-k, apply-edits (issue 17).

:mod:`imgclust.api` holds the estimator (:class:`~imgclust.api.ImageClusterer`: fit / predict /
save / load); this module runs it as a job over a recorded config and writes what a run is:

* :func:`cluster` — ``imgclust cluster``: ``assignments.csv``, ``skipped.csv``, ``metrics.json``,
  ``model/``, ``config.toml``, ``run.json`` (last), ``report.html``;
* :func:`refine_model` / :func:`refine_estimator` — ``imgclust refine``: any registered refiner
  (:mod:`imgclust.refine.base`) on a saved model;
* :func:`choose_k_scores` — ``imgclust choose-k``;
* :func:`apply_edits` — ``imgclust apply-edits`` (:mod:`imgclust.review.apply`).

Sources are re-opened from a recorded config by :func:`imgclust.data.recorded.open_recorded_source`
(the one place). Lower layers (data, backbones, features, train, losses, heads, refine, consensus)
never import this module (tests/test_imports.py).
"""

from __future__ import annotations

import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import imgclust
from imgclust.api import ImageClusterer, as_source
from imgclust.backbones import Backbone
from imgclust.config import RunConfig
from imgclust.data import ImageSource, open_source
from imgclust.data.recorded import open_recorded_source
from imgclust.errors import InputError
from imgclust.metrics import evaluate
from imgclust.rundir import clean_stale_tmp, read_json, write_csv, write_json

# --------------------------------------------------------------------- cluster
_IN_RANK_SCRATCH: list[bool] = []  # issue 20: set while a rank > 0 runs into its scratch folder


def cluster(cfg: RunConfig, out_dir: str | Path, progress: bool = True, overwrite: bool = True) -> dict[str, Any]:
    """Run a whole clustering job and write its directory; returns the run summary.

    Writes ``assignments.csv`` (id, path, cluster, confidence[, label]), ``skipped.csv``
    (images that could not be read, with the reason), ``metrics.json`` when labels are
    known, ``run.json`` (config, seed, versions, data fingerprint, feature-cache digest,
    empty clusters, timings, peak memory) and the fitted model under ``model/``.

    Every file is written atomically. ``run.json`` is written last and the previous one is
    removed just before the first output is replaced, so a directory holding ``run.json``
    is a complete run; temporary files a killed run left behind are removed on the next run.

    Everything is validated before any image is read or any file written
    (:func:`imgclust.validate.check_run_config`), and ``out_dir`` must follow the
    output-directory policy of :mod:`imgclust.outdir` (``overwrite``: replace a finished run).
    """
    # --- issue 20: under torchrun only rank 0 writes the run directory; the other ranks take part
    # in the sharded extraction and the data-parallel heads and write into a scratch folder.
    from imgclust.train import dist

    if dist.init_from_env() and not dist.is_main() and not _IN_RANK_SCRATCH:
        import dataclasses
        import tempfile

        _IN_RANK_SCRATCH.append(True)
        try:
            with tempfile.TemporaryDirectory(prefix=f"imgclust-rank{dist.rank()}-") as scratch:
                # no report: it takes no part in any collective, and rank 0 writes the one a user reads
                return cluster(dataclasses.replace(cfg, report=False), Path(scratch) / "run", progress=False,
                               overwrite=True)
        finally:
            _IN_RANK_SCRATCH.clear()
    # --- end issue 20
    t0 = time.perf_counter()
    out = Path(out_dir)
    from imgclust.outdir import check_out_dir
    from imgclust.validate import check_run_config

    check_out_dir(out, overwrite, cfg.source.path if isinstance(cfg.source.path, str) else None)
    backbone = check_run_config(cfg)  # method, options, backbone (+ options), K, seed, ranges: before any work
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    clean_stale_tmp(out)
    clean_stale_tmp(out / "model")
    if cfg.k != "auto" and (not isinstance(cfg.k, int) or cfg.k < 2):
        raise InputError(f"K must be at least 2 (or 'auto'), got {cfg.k!r}")
    from imgclust.runlog import LOG_NAME, RunLog

    log = RunLog(out / LOG_NAME, fresh=False)  # JSON lines, one per event; appended: a re-run keeps the old record
    log.event("run_start", out_dir=str(out), config=cfg.to_dict())
    from imgclust.progress import record_progress

    with record_progress(log):  # every progress bar of the run also writes "progress" events to log.jsonl
        return _cluster_run(cfg, out, progress, log, t0, backbone)


def _cluster_run(cfg: RunConfig, out: Path, progress: bool, log: Any, t0: float, backbone: Backbone) -> dict[str, Any]:
    s = cfg.source
    source = open_recorded_source(s, seed=cfg.seed)
    if cfg.k != "auto" and cfg.k > len(source):
        raise InputError(f"K={cfg.k} is larger than the number of images ({len(source)})")
    t_open = time.perf_counter() - t0
    from imgclust.config import portable
    from imgclust.data.notices import mixed_splits_note

    notes = [n for n in (mixed_splits_note(source, s.split),) if n]
    for n in notes:  # said at once (before the long steps), logged, and kept in run.json
        warnings.warn(n, stacklevel=2)
        log.event("note", message=n)

    fp = source.fingerprint()
    if s.fingerprint is not None and s.fingerprint != fp:  # re-run of a recorded config on other images
        msg = (f"the images at {s.path} changed since the config was written (fingerprint {fp[:12]}, "
               f"recorded {s.fingerprint[:12]}); results will differ from that run")
        warnings.warn(msg, stacklevel=2)
        log.event("warning", message=msg)
    cfg = portable(cfg, fp)  # absolute paths + fingerprint: config.toml re-runs from any folder (issue 24)
    cfg_requested, k_choice, tree, t_choose_k = cfg, None, None, None
    if cfg.k == "auto":  # merge tree of an over-clustering (imgclust.hierarchy); classic criteria beside it
        import dataclasses

        t_ck = time.perf_counter()
        with log.stage("choose_k") as info:
            k_choice, tree = _choose_k(cfg, source, progress)
            info["k"] = k_choice["k"]
        t_choose_k = time.perf_counter() - t_ck
        cfg = dataclasses.replace(cfg, k=k_choice["k"])
    est = ImageClusterer.from_config(cfg, progress=progress)
    est.backbone_ = backbone  # built (and checked) above
    small = _small_images_note(cfg, source, est)
    if small:
        warnings.warn(small, stacklevel=2)
        log.event("note", message=small)
        notes.append(small)
    with log.stage("fit") as info:
        est.fit(source)
        info.update(est.timings_)
    log.history("method", est.model_.history_)
    for fb in (est.model_.history_ or {}).get("fallbacks") or []:
        log.event("warning", stage=fb.get("stage"), message=f"{fb.get('message')}; kept {fb.get('kept')}")
    t_write = time.perf_counter()
    ids = source.ids()
    paths = [source.path(i) or "" for i in range(len(source))]
    has_labels = source.labels is not None
    header = ["id", "path", "cluster", "confidence"] + (["label"] if has_labels else [])
    rows = []
    for i in np.flatnonzero(est.valid_):
        row = [ids[i], paths[i], int(est.labels_[i]), f"{est.confidences_[i]:.4f}"]
        if has_labels:
            lab = int(source.labels[i])
            row.append(source.class_names[lab] if source.class_names and lab >= 0 else lab)
        rows.append(row)
    (out / "run.json").unlink(missing_ok=True)  # outputs change from here on: not a complete run until rewritten
    for stale in ("report.html", "choose_k.json", "hierarchy.json"):  # derived from the previous run: never shown beside this one
        (out / stale).unlink(missing_ok=True)
    if k_choice is not None:
        write_json(out / "choose_k.json", k_choice)
    if tree is not None:  # `imgclust recut` re-cuts it; leaves in assignments.csv row order
        h = tree.to_dict(include_leaves=False)
        h["leaves"] = tree.leaves.astype(int).tolist()
        h["rows"] = None if est.valid_.all() else np.flatnonzero(est.valid_).tolist()
        write_json(out / "hierarchy.json", h)
    trust = _trust(est)
    write_csv(out / "assignments.csv", header, rows)
    write_csv(out / "skipped.csv", ["id", "path", "reason"], [(ids[i], paths[i], r) for i, _, r in est.skipped_])
    metrics = None
    if has_labels and (source.labels[est.valid_] >= 0).any():
        metrics = evaluate(source.labels[est.valid_], est.labels_[est.valid_])
        metrics["nmi_geometric"] = evaluate(source.labels[est.valid_], est.labels_[est.valid_], "geometric")["nmi"]
        write_json(out / "metrics.json", metrics)
        sel = est.model_.history_.get("selection")  # issue 18: how far the label-free choice can be trusted
        if isinstance(sel, dict) and est.model_.candidate_labels_:
            from imgclust.select import add_label_diagnostics

            add_label_diagnostics(sel, est.model_.candidate_labels_, source.labels[est.valid_])
    est.save(out / "model")
    fs = est.feature_set_
    if fs is not None and int(est.valid_.sum()) >= 2:  # issue 21: near-duplicates and outliers (imgclust.duplicates)
        from imgclust.duplicates import find_quality, thumb_vectors, write_quality

        with log.stage("duplicates") as info:
            vr = np.flatnonzero(est.valid_)
            q = find_quality(np.asarray(fs.features)[vr], thumbs=thumb_vectors(source, vr), seed=cfg.seed)
            write_quality(out, q, [ids[i] for i in vr], [paths[i] for i in vr], est.labels_[vr])
            info.update(groups=q.info["n_groups"], outliers=q.info["n_outliers"])
    n_distinct = None
    if est.empty_clusters_ and fs is not None:  # explain them: how many different feature vectors?
        n_distinct = _n_distinct_rows(np.asarray(fs.features)[est.valid_])
    src_desc = source.describe()
    summary = {
        "imgclust_version": imgclust.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seed": cfg.seed,
        "config": cfg_requested.to_dict(),
        "k_selection": None if k_choice is None else {"k": k_choice["k"], "per_criterion": k_choice["per_criterion"],
                                                      "file": "choose_k.json",
                                                      "candidates": (k_choice.get("hierarchy") or {}).get("candidates", [k_choice["k"]]),
                                                      "classic_k": k_choice["classic_k"],
                                                      "hierarchy": "hierarchy.json" if tree is not None else None},
        "trust": trust,
        "data_fingerprint": src_desc.get("fingerprint"),
        "source": src_desc,
        "backbone": est.backbone_.describe(),
        "n_images": len(source),
        "n_clustered": int(est.valid_.sum()),
        "n_skipped": len(est.skipped_),
        "cluster_sizes": np.bincount(est.labels_[est.valid_], minlength=cfg.k).tolist(),
        "empty_clusters": est.empty_clusters_,
        "n_distinct_features": n_distinct,
        "metrics": metrics,
        "features": {
            "cache": None if fs is None or fs.path is None else str(fs.path),
            "key": None if fs is None else fs.key,
            "sha256": None if fs is None else fs.sha256,
            "from_cache": bool(fs and fs.from_cache),
            "cache_status": None if fs is None else fs.cache_status,
            "resumed_from": 0 if fs is None else fs.resumed_from,
            "rows_computed": 0 if fs is None else fs.rows_computed,
            "images_per_second": None if fs is None else fs.images_per_second,
        },
        "timings_s": {
            "open_source": round(t_open, 3),
            **({} if t_choose_k is None else {"choose_k": round(t_choose_k, 3)}),
            "features": round(est.timings_["features_s"], 3),
            "method": round(est.timings_["method_s"], 3),
            "write": round(time.perf_counter() - t_write, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": _versions(),
        "threads": {"torch": torch.get_num_threads(), "faiss": _faiss_threads(), **_thread_limit()},
        "method_history": est.model_.history_,
        # stages that failed and were replaced by an earlier good result (e.g. SPICE-Semi -> SPICE-Self)
        "fallbacks": list((est.model_.history_ or {}).get("fallbacks") or []),
        "notes": notes,
        "out_dir": str(out.resolve()),
    }
    from imgclust.config import save_config

    save_config(cfg_requested, out / "config.toml")  # `imgclust cluster --config <run>/config.toml` re-runs it
    write_json(out / "run.json", summary)  # last of the run's outputs; report.html is a view written after it
    log.event("stage_end", stage="write", seconds=round(time.perf_counter() - t_write, 3))
    if cfg.report:
        t_rep = time.perf_counter()
        summary["report"] = _write_report(out, source, est, cfg, log, t0, progress)
        # The total covers every step, the report too (issue 24: "in 1011 s" for a 25 min run);
        # run.json is rewritten (atomically) with it.
        summary["timings_s"]["report"] = round(time.perf_counter() - t_rep, 3)
        summary["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        write_json(out / "run.json", {k: v for k, v in summary.items() if k != "report"})
    log.event("run_end", seconds=round(time.perf_counter() - t0, 3))
    log.close()
    return summary


def _choose_k(cfg: RunConfig, source: ImageSource, progress: bool) -> tuple[dict[str, Any], Any]:
    """``k = "auto"``: the merge tree of a k-means over-clustering of the backbone features picks K
    (:mod:`imgclust.hierarchy`); the classic criteria (:mod:`imgclust.choosek`) are scored beside
    it as a second opinion. Features go through the cache, so the fit that follows reads them back.
    Labels, when the source has them, only add check columns."""
    import dataclasses

    from imgclust.choosek import choose_k, parse_k_range
    from imgclust.hierarchy import build_hierarchy

    probe = ImageClusterer.from_config(dataclasses.replace(cfg, k=2), progress=progress)
    feats, valid, _, _ = probe.features(source)
    x = np.asarray(feats)[valid]
    ks = [k for k in parse_k_range(cfg.k_range) if k < len(x)]
    if len(ks) < 2:
        raise InputError(f"K range {cfg.k_range} leaves fewer than two candidates below the {len(x)} readable images")
    labels = None if source.labels is None else np.asarray(source.labels)[valid]
    try:
        tree = build_hierarchy(x, ks, seed=cfg.seed)
    except InputError as e:  # too few images to over-cluster beyond the range: the classic criteria decide
        res = choose_k(x, ks, seed=cfg.seed, progress=progress, labels=labels)
        res["classic_k"] = res["k"]
        res["rule"] = f"classic criteria alone ({e})"
        return res, None
    res = choose_k(x, ks, seed=cfg.seed, progress=progress, labels=labels)
    res["classic_k"] = res["k"]
    res["k"] = int(tree.k)
    res["rule"] = f"{tree.info['rule']} (imgclust.hierarchy); the classic curve below is a second opinion"
    res["hierarchy"] = {"k": int(tree.k), "candidates": tree.candidates, "file": "hierarchy.json"}
    return res, tree


def _trust(est: ImageClusterer) -> dict[str, Any] | None:
    """The label-free trust score of the fitted labels (imgclust.trust); None when it cannot be computed."""
    from imgclust.trust import trust_score

    fs = est.feature_set_
    if fs is None or int(est.valid_.sum()) < 12:
        return None
    heads = est.model_.head_labels_  # declared by ClusteringMethod (None when the method has no heads)
    return trust_score(np.asarray(fs.features)[est.valid_], est.labels_[est.valid_], head_labels=heads, seed=est.seed)


def _write_report(out: Path, source: ImageSource, est: ImageClusterer, cfg: RunConfig, log: Any,
                  t0: float | None = None, progress: bool = True) -> dict[str, Any]:
    """report.html from what is in memory; a failure is logged and reported, never fatal to the run."""
    from imgclust.report import build_report

    fs = est.feature_set_
    try:
        with log.stage("report") as info:
            import os

            map_method = os.environ.get("IMGCLUST_REPORT_MAP") or cfg.report_map  # e.g. "pca" in test suites
            rep = build_report(out, source=source, features=None if fs is None else fs.features,
                               rows=np.flatnonzero(est.valid_), map_method=map_method, seed=cfg.seed, run_t0=t0,
                               progress=progress)
            info.update(bytes=rep["bytes"], map_method=rep["map_method"])
        return rep
    except Exception as e:  # noqa: BLE001 - the clustering is done and saved; the report is a view of it
        return {"error": f"{type(e).__name__}: {e}"}


def _small_images_note(cfg: RunConfig, source: ImageSource, est: ImageClusterer) -> str | None:
    from imgclust.data.notices import small_images_note

    if cfg.backbone.image_size is not None or cfg.backbone.name.startswith("pixels"):
        return None
    try:
        size = int(est.get_backbone().preprocess.size)  # built once; fit reuses it
    except Exception:  # noqa: BLE001 - the fit reports a bad backbone with its own message
        return None
    return small_images_note(source, cfg.backbone.name, size, False)


def _n_distinct_rows(x: np.ndarray) -> int:
    import hashlib

    x = np.ascontiguousarray(x, dtype=np.float32)
    return len({hashlib.sha1(memoryview(r)).digest() for r in x})


def _thread_limit() -> dict[str, Any]:
    from imgclust.threads import current_threads

    return current_threads()


def _faiss_threads() -> int | None:
    try:
        import faiss

        return int(faiss.omp_get_max_threads())
    except Exception:  # noqa: BLE001
        return None


def _versions() -> dict[str, str]:
    import faiss
    import PIL
    import scipy
    import sklearn

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "faiss": getattr(faiss, "__version__", "?"),
        "pillow": PIL.__version__,
    }


# --------------------------------------------------------------------- refine
def refine_estimator(est: ImageClusterer, X: Any, options: dict | None = None, *, truth: np.ndarray | None = None,
                     seed: int | None = None, progress: bool | None = None, refiner: str = "icsr") -> ImageClusterer:
    """A copy of the fitted :class:`~imgclust.ImageClusterer` ``est``, refined by ``refiner`` on ``X``.

    ``X``: anything ``est`` accepts (images or precomputed features of the data to refine on,
    usually the data it was fitted on). The returned estimator has the refiner's method (e.g.
    ``icsr``, with the base method recorded in its options), its ``labels_`` / ``confidences_``
    on ``X``, and ``base_labels_`` (the base model's clusters). ``truth`` (true labels of ``X``,
    -1 unknown; default: the source's labels when known) feeds diagnostics only.
    """
    import copy

    from imgclust.methods import get_method
    from imgclust.refine.base import get_refiner

    info = get_refiner(refiner)
    method_cls = get_method(info.method)
    est.check_fitted()
    if est.method == info.method:  # refining a refined model: from the same base again
        base_opts = dict(est.model_.config.base_options)
        base_name = est.model_.config.base
    else:
        base_opts, base_name = dict(est.method_options or {}), est.method
    opts = {**(options or {}), "base": base_name, "base_options": base_opts}
    new = copy.copy(est)
    new.progress = est.progress if progress is None else progress
    seed = est.seed if seed is None else int(seed)
    feats, valid, fs, source = new.features(X)
    if feats.ndim != 2 or feats.shape[1] != est.n_features_in_:
        raise InputError(f"features have {feats.shape[-1]} dimensions, this model was fitted on {est.n_features_in_}")
    if not valid.any():
        raise InputError("no readable image to refine on")
    x = new.method_input(feats[valid])  # PCA, then the manifold stage (the PCA alone before issue 17)
    if est.model_.image_level:  # a fine-tuned / from-scratch network: its view of the images
        if source is None:
            raise InputError(f"this {est.method} model classifies images: refine it on images, not on features")
        base_proba = np.asarray(est.predict_proba(source), dtype=np.float32)[valid]
    else:
        base_proba = est.model_.predict_proba(x)
    if truth is None and source is not None and source.labels is not None:
        truth = np.asarray(source.labels)
    ctx = new.fit_context(source, valid, fs, seed=seed, progress=new.progress, base_proba=base_proba,
                          truth=None if truth is None else np.asarray(truth)[valid])
    model = method_cls(int(est.n_clusters), opts)
    t0 = time.perf_counter()
    model.fit(x, ctx)
    proba = model.fit_proba(x)
    new.method, new.method_options, new.seed = info.name, model.config.to_dict(), seed
    new.model_ = model
    new.labels_ = np.full(len(feats), -1, dtype=np.int64)
    new.labels_[valid] = proba.argmax(1)
    new.base_labels_ = np.full(len(feats), -1, dtype=np.int64)
    new.base_labels_[valid] = base_proba.argmax(1)
    new.confidences_ = np.zeros(len(feats), dtype=np.float32)
    new.confidences_[valid] = proba.max(1)
    new.valid_, new.feature_set_, new.source_ = valid, fs, source
    new.skipped_ = list(fs.skipped) if fs is not None else [
        (int(i), str(i), "non-finite features (NaN or inf)") for i in np.flatnonzero(~valid)]
    sizes = np.bincount(new.labels_[valid], minlength=int(est.n_clusters))
    new.empty_clusters_ = [int(c) for c in np.flatnonzero(sizes == 0)]
    new.timings_ = {"method_s": time.perf_counter() - t0}
    return new


def _resolve_model_dir(model_dir: str | Path) -> tuple[Path, Path | None]:
    """(model dir, run dir or None) for a run directory or its ``model/``."""
    d = Path(model_dir)
    if (d / "model").is_dir() and not (d / "model.json").exists():
        return d / "model", d
    run = d.parent if (d.parent / "run.json").is_file() else None
    return d, run


def refine_model(model_dir: str | Path, source: Any = None, out_dir: str | Path = "runs/refined", *,
                 options: dict | None = None, split: str | None = None, cache_dir: str | None = None,
                 seed: int | None = None, device: str | None = None, progress: bool = True,
                 refiner: str = "icsr") -> dict[str, Any]:
    """Refine a saved model (``refiner``: a name in :mod:`imgclust.refine.base`'s registry, e.g.
    ``icsr``) and write a new run directory; returns its summary (run.json).

    ``model_dir``: a run directory or its ``model/``. ``source``: the images to refine on
    (default: the source recorded in the run's ``run.json``, same split and subset). Writes
    ``assignments.csv`` (id, path, cluster, confidence, base_cluster[, label]), ``skipped.csv``,
    ``metrics.json`` (refined, with the base model's metrics under ``base``) when labels are
    known, the refiner's diagnostics (``icsr.json``: options, training history, R_sr(p)),
    ``model/`` (a model of the refiner's method that ``imgclust predict`` uses) and ``run.json`` last.
    """
    from imgclust.refine.base import get_refiner

    info = get_refiner(refiner)  # an unknown name fails before any work
    t0 = time.perf_counter()
    mdir, run_dir = _resolve_model_dir(model_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    if out.resolve() in (mdir.resolve(), *(() if run_dir is None else (run_dir.resolve(),))):
        raise InputError("the refined run needs its own output directory (not the base run's)")
    from imgclust.outdir import check_out_dir
    from imgclust.validate import check_seed

    check_out_dir(out, overwrite=True)  # a non-empty folder that is not a run is never written into
    if seed is not None:
        check_seed(seed)
    over: dict[str, Any] = {"cache_dir": cache_dir} if cache_dir else {}
    if device:
        over["device"] = device
    est = ImageClusterer.load(mdir, progress=progress, **over)
    base_run = read_json(run_dir / "run.json") if run_dir is not None else None
    if source is None:
        s = ((base_run or {}).get("config") or {}).get("source")
        if not s or not s.get("path"):
            raise InputError(f"no SOURCE given and {mdir} has no run.json naming its images; give SOURCE")
        src = open_recorded_source(s, seed=int(base_run.get("seed", 0)))
    elif isinstance(source, (str, Path)):
        src = open_source(source, split=split)
    else:
        src = as_source(source)
    new = refine_estimator(est, src, options, seed=seed, progress=progress, refiner=info.name)
    model: Any = new.model_
    clean_stale_tmp(out)
    (out / "run.json").unlink(missing_ok=True)  # not a complete run until rewritten
    ids, valid = src.ids(), new.valid_
    has_labels = src.labels is not None
    header = ["id", "path", "cluster", "confidence", "base_cluster"] + (["label"] if has_labels else [])
    rows = []
    for i in np.flatnonzero(valid):
        row = [ids[i], src.path(i) or "", int(new.labels_[i]), f"{new.confidences_[i]:.4f}", int(new.base_labels_[i])]
        if has_labels:
            lab = int(src.labels[i])
            row.append(src.class_names[lab] if src.class_names and lab >= 0 else lab)
        rows.append(row)
    write_csv(out / "assignments.csv", header, rows)
    write_csv(out / "skipped.csv", ["id", "path", "reason"],
              [(ids[i], src.path(i) or "", r) for i, _, r in new.skipped_])
    metrics = None
    if has_labels and (src.labels[valid] >= 0).any():
        y = np.asarray(src.labels)[valid]
        metrics = evaluate(y, new.labels_[valid])
        metrics["base"] = evaluate(y, new.base_labels_[valid])
        write_json(out / "metrics.json", metrics)
    diag, extra = info.outputs(model.config.to_dict(), model.history_)
    if info.diagnostics:
        write_json(out / info.diagnostics, diag)
    new.save(out / "model")
    summary = {
        "imgclust_version": imgclust.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kind": "refine",
        "refiner": info.name,
        "refined_from": str(mdir.resolve()),
        "seed": new.seed,
        "config": {**((base_run or {}).get("config") or {}), "method": info.method, "method_options": model.config.to_dict()},
        "source": src.describe(),
        "n_images": len(src),
        "n_clustered": int(valid.sum()),
        "n_skipped": len(new.skipped_),
        "cluster_sizes": np.bincount(new.labels_[valid], minlength=int(new.n_clusters)).tolist(),
        "empty_clusters": new.empty_clusters_,
        "changed_vs_base": int((new.labels_[valid] != new.base_labels_[valid]).sum()),
        "metrics": metrics,
        **extra,  # the refiner's own run.json fields (icsr: mean_rsr before / after)
        "timings_s": {"refine": round(new.timings_["method_s"], 3), "total": round(time.perf_counter() - t0, 3)},
        "versions": _versions(),
        "out_dir": str(out.resolve()),
    }
    write_json(out / "run.json", summary)
    return summary


# --------------------------------------------------------------------- choose-k
def choose_k_scores(source: ImageSource, ks: list[int], *, backbone: str = "efficientnet-lite0",
                    weights: str | None = None, image_size: int | None = None, cache_dir: str | None = None,
                    batch_size: int = 64, precision: str = "fp32", device: str = "auto", seed: int = 0,
                    sample: int = 5000, pca_dim: int = 64, runs: int = 5, progress: bool = True) -> dict[str, Any]:
    """``imgclust choose-k``: the label-free scores of every K in ``ks`` on the backbone features of
    ``source`` (through the feature cache); labels, when known, only add check columns."""
    from imgclust.choosek import choose_k

    est = ImageClusterer(n_clusters=2, backbone=backbone, backbone_weights=weights, image_size=image_size,
                         cache_dir=cache_dir, batch_size=batch_size, precision=precision, device=device,
                         seed=seed, progress=progress)
    feats, valid, _, _ = est.features(source)
    lab = None if source.labels is None else source.labels[valid]
    return choose_k(feats[valid], ks, sample=sample, pca_dim=pca_dim, n_runs=runs, seed=seed, progress=progress,
                    labels=lab)


# --------------------------------------------------------------------- apply-edits
def apply_edits(run_dir: str | Path, out_dir: str | Path, seed: int | None = None, progress: bool = True,
                report: bool = True) -> dict[str, Any]:
    """``imgclust apply-edits``: the reviewed run (see :mod:`imgclust.review.apply`)."""
    from imgclust.review.apply import apply_edits as _apply

    return _apply(run_dir, out_dir, seed=seed, progress=progress, report=report)


__all__ = ["apply_edits", "choose_k_scores", "cluster", "refine_estimator", "refine_model"]
