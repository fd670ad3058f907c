"""The user-facing estimator, scikit-learn style, and the one-call run that the CLI uses.

>>> from imgclust import ImageClusterer
>>> est = ImageClusterer(n_clusters=10, backbone="pixels", image_size=8)
>>> labels = est.fit_predict("digits")          # a path, a source name, an ImageSource or arrays
>>> est.save("model/")                           # doctest: +SKIP
>>> ImageClusterer.load("model/").predict("new_images/")   # doctest: +SKIP

``X`` may be an :class:`~imgclust.data.base.ImageSource`, a path or source name understood by
:func:`imgclust.data.open_source`, a uint8 image array (N, H, W[, C]), or a 2-D float array
of precomputed features (then no backbone runs).
"""

from __future__ import annotations

import inspect
import json
import platform
import resource
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin

import imgclust
from imgclust.backbones import Backbone, build_backbone
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig, check_types
from imgclust.data import ArraySource, ImageSource, open_source
from imgclust.data.base import SubsetSource
from imgclust.errors import InputError
from imgclust.features import FeatureSet, extract_features
from imgclust.methods import ClusteringMethod, FitContext, get_method
from imgclust.metrics import evaluate
from imgclust.rundir import atomic_open, clean_stale_tmp, file_sha256, read_json, write_csv, write_json

MODEL_FORMAT = 1
MODEL_JSON_MAX_BYTES = 64 << 20  # a model.json is a few KB; cluster metadata grows with K only
REDUCE_ANCHORS = 5000  # fitted images kept to place new ones in the reduced space (issue 18)


class ImageClusterer(ClusterMixin, BaseEstimator):
    """Cluster images into ``n_clusters`` groups and classify new images into them.

    Parameters mirror ``imgclust cluster``; ``method_options`` holds the chosen method's
    own options (see ``imgclust methods``). After ``fit``: ``labels_`` (one per input image,
    -1 for images that could not be read), ``confidences_``, ``skipped_``,
    ``empty_clusters_`` (clusters no image was assigned to, e.g. when there are fewer
    distinct images than K) and ``feature_set_``.

    Precomputed features (a 2-D float array) with NaN or inf in a row: that row is left out
    of fitting, gets label -1 and is listed in ``skipped_`` with the reason
    ``"non-finite features (NaN or inf)"``, like an unreadable image.
    """

    def __init__(
        self,
        n_clusters: int = 10,
        method: str = "auto",  # issue 18 (was kmeans)
        backbone: str = "efficientnet-lite0",
        backbone_weights: str | None = None,
        image_size: int | None = None,
        backbone_options: dict | None = None,
        method_options: dict | None = None,
        pca: int | None = None,
        pca_whiten: bool = False,
        reduce: str | None = None,
        batch_size: int = 64,
        precision: str = "fp32",
        device: str = "auto",
        workers: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        progress: bool = True,
        chunk_rows: int = 1024,
        threads: int | str | None = None,
        engine: str = "auto",
    ) -> None:
        self.n_clusters = n_clusters
        self.method = method
        self.backbone = backbone
        self.backbone_weights = backbone_weights
        self.image_size = image_size
        self.backbone_options = backbone_options
        self.method_options = method_options
        self.pca = pca
        self.pca_whiten = pca_whiten
        self.reduce = reduce
        self.batch_size = batch_size
        self.precision = precision
        self.device = device
        self.workers = workers
        self.cache_dir = cache_dir
        self.seed = seed
        self.progress = progress
        self.chunk_rows = chunk_rows
        self.threads = threads  # None/"auto": imgclust.threads picks a safe count (CPUs, quota, load)
        self.engine = engine

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: RunConfig, progress: bool = True) -> ImageClusterer:
        f = cfg.features
        return cls(
            n_clusters=cfg.k,
            method=cfg.method,
            backbone=cfg.backbone.name,
            backbone_weights=cfg.backbone.weights,
            image_size=cfg.backbone.image_size,
            backbone_options=dict(cfg.backbone.options),
            method_options=dict(cfg.method_options),
            pca=f.pca,
            pca_whiten=f.pca_whiten,
            reduce=f.reduce,
            batch_size=f.batch_size,
            precision=f.precision,
            device=f.device,
            workers=f.workers,
            cache_dir=f.cache_dir,
            seed=cfg.seed,
            progress=progress,
            chunk_rows=f.chunk_rows,
            threads=cfg.threads,
            engine=f.engine,
        )

    def _backbone(self) -> Backbone:
        if getattr(self, "backbone_", None) is None:
            opts = dict(self.backbone_options or {})
            if self.image_size is not None:
                opts["image_size"] = int(self.image_size)
            from imgclust.multibackbone import build_combined, is_combined  # issue 18: several backbones

            if is_combined(self.backbone):
                self.backbone_ = build_combined(self.backbone, weights=self.backbone_weights, **opts)
            else:
                self.backbone_ = build_backbone(self.backbone, weights=self.backbone_weights, **opts)
        return self.backbone_

    # ----------------------------------------------------------------- features
    def _features(self, X: Any) -> tuple[np.ndarray, np.ndarray, FeatureSet | None, ImageSource | None]:
        """(features of all rows, valid mask, feature set, source) for any accepted X."""
        if isinstance(X, np.ndarray) and X.ndim == 2 and np.issubdtype(X.dtype, np.floating):
            feats = np.asarray(X, dtype=np.float32)
            valid = np.isfinite(feats).all(axis=1)
            return feats, valid, None, None
        source = as_source(X)
        from imgclust.multibackbone import CombinedBackbone, extract_combined  # issue 18: several backbones

        extract = extract_combined if isinstance(self._backbone(), CombinedBackbone) else extract_features
        fs = extract(
            source,
            self._backbone(),
            cache_dir=self.cache_dir,
            batch_size=self.batch_size,
            device=self.device,
            precision=self.precision,
            workers=self.workers,
            chunk_rows=self.chunk_rows,
            progress=self.progress,
            engine=getattr(self, "engine", "auto"),
        )
        return fs.features, fs.valid, fs, source

    def _reduce(self, feats: np.ndarray, fit: bool) -> np.ndarray:
        if not self.pca:
            return np.asarray(feats, dtype=np.float32)
        if fit:
            from sklearn.decomposition import PCA

            n_comp = min(int(self.pca), feats.shape[0], feats.shape[1])
            p = PCA(n_components=n_comp, random_state=self.seed).fit(feats)
            self.pca_mean_ = p.mean_.astype(np.float32)
            scale = np.sqrt(np.maximum(p.explained_variance_, 1e-12)) if self.pca_whiten else np.ones(n_comp)
            # Projection and (optional) whitening folded into one matrix.
            self.pca_components_ = (p.components_ / scale[:, None]).astype(np.float32)
        return ((np.asarray(feats, dtype=np.float32) - self.pca_mean_) @ self.pca_components_.T).astype(np.float32)

    # Issue 18: the manifold stage (imgclust.reduce) after PCA; new images are placed by kNN
    # regression on a fixed sample of the fitted images ("anchors", saved with the model).
    def _manifold(self, x: np.ndarray, fit: bool, cache_dir: Any = None) -> np.ndarray:
        from imgclust.reduce import ReduceSpec, extend, reduce_features

        if ReduceSpec.parse(self.reduce).kind == "none":
            return x
        if fit:
            z, self.reduce_info_ = reduce_features(x, self.reduce, seed=self.seed, cache_dir=cache_dir,
                                                   progress=self.progress)
            keep = np.sort(np.random.default_rng(self.seed).permutation(len(x))[:REDUCE_ANCHORS])
            self.reduce_anchor_x_, self.reduce_anchor_z_ = np.asarray(x[keep], np.float32), z[keep]
            return z
        return extend(self.reduce_anchor_x_, self.reduce_anchor_z_, x)

    def _fit_extras(self, source: ImageSource | None, valid: np.ndarray) -> dict[str, Any]:
        """What a method that needs more than features may use (see :class:`FitContext`).

        ``source`` and ``backbone`` are None when fitting on precomputed features;
        ``rows[i]`` is the source index of feature row ``i`` (valid images only).
        """
        return {
            "source": source,
            "backbone": None if source is None else self._backbone(),
            "rows": np.flatnonzero(valid),
            "cache_dir": self.cache_dir,
            "batch_size": self.batch_size,
            "precision": self.precision,
            "workers": self.workers,
        }

    # ----------------------------------------------------------------- sklearn API
    def fit(self, X: Any, y: Any = None) -> ImageClusterer:
        if int(self.n_clusters) < 2:
            raise InputError(f"K must be at least 2, got {self.n_clusters}")
        t0 = time.perf_counter()
        from imgclust.threads import apply_threads

        apply_threads(self.threads)  # one limit for torch, faiss, BLAS, numba (issue 24)
        _seed_everything(self.seed)
        from imgclust.reduce import ReduceSpec

        ReduceSpec.parse(self.reduce)  # a bad --reduce fails before any feature extraction
        feats, valid, fs, source = self._features(X)
        t1 = time.perf_counter()
        n_valid = int(valid.sum())
        if n_valid < int(self.n_clusters):
            raise InputError(
                f"K={self.n_clusters} is larger than the number of readable images ({n_valid})"
            )
        x = self._reduce(feats[valid], fit=True)
        x = self._manifold(x, fit=True, cache_dir=None if fs is None else fs.path)
        method_cls = get_method(self.method)
        model: ClusteringMethod = method_cls(int(self.n_clusters), self.method_options)
        ctx = FitContext(seed=self.seed, device=self.device, progress=self.progress,
                         work_dir=None if fs is None or fs.path is None else fs.path,
                         extras=self._fit_extras(source, valid))
        model.fit(x, ctx)
        t2 = time.perf_counter()
        # A method that fine-tuned its backbone (``image_level``, e.g. icbpl finetune=last_blocks)
        # no longer matches the cached features: it reports the probabilities of its own pass.
        proba = model.fit_proba_ if getattr(model, "image_level", False) else model.predict_proba(x)
        self.model_ = model
        self.n_features_in_ = feats.shape[1]
        self.labels_ = np.full(len(feats), -1, dtype=np.int64)
        self.labels_[valid] = proba.argmax(axis=1)
        self.confidences_ = np.zeros(len(feats), dtype=np.float32)
        self.confidences_[valid] = proba.max(axis=1)
        self.valid_ = valid
        self.feature_set_ = fs
        self.source_ = source
        if fs is not None:
            self.skipped_ = list(fs.skipped)
        else:  # precomputed features: non-finite rows are skipped like unreadable images
            self.skipped_ = [(int(i), str(i), "non-finite features (NaN or inf)") for i in np.flatnonzero(~valid)]
        sizes = np.bincount(self.labels_[valid], minlength=int(self.n_clusters))
        self.empty_clusters_ = [int(c) for c in np.flatnonzero(sizes == 0)]
        self.timings_ = {"features_s": t1 - t0, "method_s": t2 - t1}
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """(N, K) probabilities; rows of unreadable images are all zero."""
        self._check_fitted()
        from imgclust.threads import apply_threads

        apply_threads(getattr(self, "threads", None))
        if getattr(self.model_, "image_level", False):  # fine-tuned backbone: the method reads the images
            if isinstance(X, np.ndarray) and X.ndim == 2 and np.issubdtype(X.dtype, np.floating):
                raise InputError("this model fine-tuned its backbone: predict needs images, not precomputed features")
            return self.model_.predict_proba_images(as_source(X), self._backbone(), batch_size=self.batch_size,
                                                    device=self.device, workers=self.workers, progress=self.progress)
        feats, valid, _, _ = self._features(X)
        if feats.ndim != 2 or feats.shape[1] != self.n_features_in_:
            raise InputError(f"features have {feats.shape[-1]} dimensions, this model was fitted on {self.n_features_in_}")
        out = np.zeros((len(feats), self.model_.n_clusters), dtype=np.float32)
        if valid.any():
            out[valid] = self.model_.predict_proba(self._manifold(self._reduce(feats[valid], fit=False), fit=False))
        return out

    def predict(self, X: Any) -> np.ndarray:
        """Cluster index per image; -1 for images that could not be read."""
        proba = self.predict_proba(X)
        labels = proba.argmax(axis=1).astype(np.int64)
        labels[proba.sum(axis=1) == 0] = -1
        return labels

    def fit_predict(self, X: Any, y: Any = None, **kwargs: Any) -> np.ndarray:
        return self.fit(X).labels_

    def _check_fitted(self) -> None:
        if getattr(self, "model_", None) is None:
            raise InputError("this ImageClusterer is not fitted yet: call fit() or load a saved model")

    # ----------------------------------------------------------------- persistence
    def save(self, model_dir: str | Path) -> Path:
        """Write ``model.json`` (what to rebuild) and ``model.pt`` (tensors only) atomically."""
        self._check_fitted()
        d = Path(model_dir)
        d.mkdir(parents=True, exist_ok=True)
        state = {f"method.{k}": v for k, v in self.model_.state_dict().items()}
        if self.pca:
            state["pca.mean"] = torch.from_numpy(self.pca_mean_)
            state["pca.components"] = torch.from_numpy(self.pca_components_)
        if getattr(self, "reduce_anchor_x_", None) is not None and self.reduce:
            state["reduce.anchor_x"] = torch.from_numpy(self.reduce_anchor_x_)
            state["reduce.anchor_z"] = torch.from_numpy(np.ascontiguousarray(self.reduce_anchor_z_))
        clean_stale_tmp(d)
        with atomic_open(d / "model.pt", "wb") as f:
            torch.save(state, f)
        bb = getattr(self, "backbone_", None)
        sizes = np.bincount(self.labels_[self.labels_ >= 0], minlength=self.model_.n_clusters)
        write_json(
            d / "model.json",
            {
                "format": MODEL_FORMAT,
                "imgclust_version": imgclust.__version__,
                "params": {**self.get_params(), "cache_dir": None},  # a local path; ignored on load
                "method_config": self.model_.config.to_dict(),
                "backbone": None if bb is None else bb.describe(),
                "n_features_in": int(self.n_features_in_),
                # model.json is written after model.pt: this digest pairs them, so a save
                # interrupted between the two files is detected on load.
                "model_pt_sha256": file_sha256(d / "model.pt"),
                "clusters": self._cluster_metadata(sizes),
            },
        )
        return d

    def _cluster_metadata(self, sizes: np.ndarray) -> list[dict[str, Any]]:
        """Per cluster: size and mean confidence; with known labels, the majority class and its share."""
        lab, conf = self.labels_, self.confidences_
        src = getattr(self, "source_", None)
        y = None if src is None or src.labels is None else np.asarray(src.labels)
        names = None if src is None else src.class_names
        out = []
        for c, size in enumerate(sizes):
            member = lab == c
            info: dict[str, Any] = {"cluster": c, "size": int(size),
                                    "mean_confidence": round(float(conf[member].mean()), 4) if size else None}
            if y is not None and size:
                ys = y[member]
                ys = ys[ys >= 0]
                if len(ys):
                    top = int(np.bincount(ys).argmax())
                    info["majority_label"] = names[top] if names and top < len(names) else top
                    info["purity"] = round(float((ys == top).mean()), 4)
            out.append(info)
        return out

    @classmethod
    def load(cls, model_dir: str | Path, **overrides: Any) -> ImageClusterer:
        """Re-create a fitted estimator from ``save``'s directory.

        Both files are treated as untrusted input: ``model.pt`` is read with
        ``torch.load(weights_only=True)`` (tensors only, a pickle payload is refused) and must
        be a flat dict of tensors; ``model.json`` is plain JSON whose keys, types and values
        are checked. Anything unexpected raises a one-line InputError.
        """
        d = Path(model_dir)
        if not (d / "model.json").is_file() or not (d / "model.pt").is_file():
            raise InputError(f"{d} is not an imgclust model directory (model.json and model.pt expected)")
        meta = _read_model_json(d / "model.json")
        params = dict(meta["params"])
        params["threads"] = None  # the machine's, not the model's: "auto" unless overridden
        from imgclust.validate import MODEL_PARAMS_IGNORED

        for key in MODEL_PARAMS_IGNORED:  # a model is data from elsewhere: it never chooses where we write
            params.pop(key, None)
        params.update(overrides)
        try:
            state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"refusing to load {d / 'model.pt'}: not a plain tensor file ({type(e).__name__})") from e
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise InputError(f"refusing to load {d / 'model.pt'}: expected a flat dict of named tensors")
        want_sha = meta.get("model_pt_sha256")
        if want_sha is not None and file_sha256(d / "model.pt") != want_sha:
            raise InputError(f"{d}: model.pt does not match model.json (changed, or an interrupted save); save the model again")
        est = cls(**params)
        try:
            method_cls = get_method(est.method)
            model = method_cls(int(est.n_clusters), meta.get("method_config"))
            model.load_state_dict({k[len("method."):]: v for k, v in state.items() if k.startswith("method.")})
            est.model_ = model
            est.n_features_in_ = int(meta["n_features_in"])
            dim = est.n_features_in_
            if est.pca:
                est.pca_mean_ = state["pca.mean"].numpy().astype(np.float32)
                est.pca_components_ = state["pca.components"].numpy().astype(np.float32)
                if est.pca_mean_.shape != (dim,) or est.pca_components_.ndim != 2 or est.pca_components_.shape[1] != dim:
                    raise InputError(f"PCA tensors do not fit {dim}-d features")
                dim = est.pca_components_.shape[0]
            from imgclust.reduce import ReduceSpec

            if ReduceSpec.parse(est.reduce).kind != "none":  # issue 18: manifold stage anchors
                ax, az = state.get("reduce.anchor_x"), state.get("reduce.anchor_z")
                if ax is None or az is None or ax.ndim != 2 or az.ndim != 2 or ax.shape[0] != az.shape[0] \
                        or ax.shape[1] != dim:
                    raise InputError("reduce anchors missing or of the wrong shape")
                est.reduce_anchor_x_, est.reduce_anchor_z_ = ax.numpy().astype(np.float32), az.numpy().astype(np.float32)
                dim = az.shape[1]
            probe = model.predict_proba(np.zeros((1, dim), np.float32))  # shapes agree end to end
            if probe.shape != (1, model.n_clusters):
                raise InputError(f"the method predicts {probe.shape[1]} clusters, expected {model.n_clusters}")
        except InputError as e:
            raise InputError(f"{d}: invalid model ({e})") from e
        except Exception as e:  # wrong shapes/keys in a hand-edited or foreign file
            raise InputError(f"{d}: model.pt does not match model.json ({type(e).__name__}: {e})") from e
        want = (meta.get("backbone") or {}).get("weights")
        if want is not None:
            have = est._backbone().weights_id
            if have != want:
                raise InputError(
                    f"{d} was fitted with backbone weights {want} but {est.backbone!r} now loads {have}; "
                    "pass the same weights file (backbone_weights=...)"
                )
        return est


def _read_model_json(path: Path) -> dict[str, Any]:
    """model.json as a checked dict: JSON only, known keys, right types, sane values."""
    if path.stat().st_size > MODEL_JSON_MAX_BYTES:
        raise InputError(f"{path}: {path.stat().st_size} bytes is too large for a model.json "
                         f"(at most {MODEL_JSON_MAX_BYTES})")
    try:
        meta = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: unsupported model format {meta.get('format')!r}")
    params = meta.get("params")
    if not isinstance(params, dict):
        raise InputError(f"{path}: 'params' must be an object")
    sig = inspect.signature(ImageClusterer.__init__).parameters
    unknown = sorted(set(params) - set(sig) - {"self"})
    if unknown:
        raise InputError(f"{path}: unknown parameter(s) {unknown}")
    _check_param_types(params, path)
    if isinstance(params.get("n_clusters"), int) and params["n_clusters"] < 2:
        raise InputError(f"{path}: n_clusters must be at least 2, got {params['n_clusters']}")
    from imgclust.validate import check_model_params

    try:
        check_model_params(params)  # ranges: sizes bounded before anything is allocated
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    n_in = meta.get("n_features_in")
    if not isinstance(n_in, int) or isinstance(n_in, bool) or n_in < 1:
        raise InputError(f"{path}: 'n_features_in' must be a positive integer, got {n_in!r}")
    for key, types in (("method_config", (dict, type(None))), ("backbone", (dict, type(None))),
                       ("model_pt_sha256", (str, type(None)))):
        if not isinstance(meta.get(key), types):
            raise InputError(f"{path}: {key!r} has the wrong type ({type(meta.get(key)).__name__})")
    weights = (meta.get("backbone") or {}).get("weights")
    if weights is not None and not isinstance(weights, str):
        raise InputError(f"{path}: backbone 'weights' must be a string")
    return meta


def _check_param_types(params: dict[str, Any], path: Path) -> None:
    """The ``__init__`` annotations ("int | None", "dict | None", ...) checked like config keys."""
    sig = inspect.signature(ImageClusterer.__init__).parameters
    try:
        check_types({k: str(p.annotation) for k, p in sig.items() if k != "self"}, params, "")
    except InputError as e:
        raise InputError(f"{path}: {str(e).replace('config key', 'parameter')}") from e


def as_source(X: Any, split: str | None = None) -> ImageSource:
    if isinstance(X, ImageSource):
        return X
    if isinstance(X, (str, Path)):
        return open_source(X, split=split)
    if isinstance(X, np.ndarray):
        if X.ndim in (3, 4):
            return ArraySource(X, name="array")
        raise InputError(
            f"an array X must be images (N, H, W[, C]) or 2-D float features, got shape {X.shape} dtype {X.dtype}"
        )
    raise InputError(f"cannot read images from a {type(X).__name__}; give a path, an ImageSource or an array")


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------- one-call run
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
        import tempfile

        _IN_RANK_SCRATCH.append(True)
        try:
            with tempfile.TemporaryDirectory(prefix=f"imgclust-rank{dist.rank()}-") as scratch:
                return cluster(cfg, Path(scratch) / "run", progress=False, overwrite=True)
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
    if s.max_pixels is not None and s.max_pixels < 1:
        raise InputError(f"max pixels must be >= 1, got {s.max_pixels}")
    source = open_source(s.path, split=s.split, kind=s.kind, labels=s.labels, coarse=s.coarse, max_pixels=s.max_pixels)
    if s.limit is not None:
        if s.limit < 1:
            raise InputError(f"limit must be >= 1, got {s.limit}")
        source = SubsetSource.sample(source, s.limit, seed=cfg.seed)
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
        if isinstance(sel, dict) and getattr(est.model_, "candidate_labels_", None):
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
    feats, valid, _, _ = probe._features(source)
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
    heads = getattr(est.model_, "head_labels_", None)
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
        size = int(est._backbone().preprocess.size)  # built once; fit reuses it
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


__all__ = ["ImageClusterer", "cluster", "as_source", "RunConfig", "SourceConfig", "BackboneConfig", "FeatureConfig", "asdict"]
