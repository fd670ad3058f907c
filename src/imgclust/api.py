"""The user-facing estimator, scikit-learn style (the run-directory jobs are in :mod:`imgclust.run`).

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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

import imgclust
from imgclust.backbones import Backbone, build_backbone
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig, check_types
from imgclust.data import ArraySource, ImageSource, open_source
from imgclust.errors import InputError
from imgclust.features import FeatureSet
from imgclust.features_dist import extract_features  # sharded under torchrun (issue 20)
from imgclust.methods import ClusteringMethod, FitContext, get_method
from imgclust.rundir import atomic_open, clean_stale_tmp, file_sha256, read_json, write_json

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
    def features(self, X: Any) -> tuple[np.ndarray, np.ndarray, FeatureSet | None, ImageSource | None]:
        """(features of all rows, valid mask, feature set, source) for any accepted X.

        The backbone features (through the cache) of images, or precomputed features as they
        are; used by the run jobs (:mod:`imgclust.run`), choose-k and the benchmarks."""
        from scipy import sparse

        if sparse.issparse(X):
            raise InputError("sparse input is not supported: give a dense array of features (X.toarray())")
        if isinstance(X, (list, tuple)) and _is_feature_array(np.asarray(X)):
            X = np.asarray(X)  # a nested list of numbers: features
        if _is_feature_array(X):
            feats = _check_feature_array(X)
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

    # Public faces of the private helpers for the run jobs (issue 17: no private calls across modules).
    def get_backbone(self) -> Backbone:
        """The frozen backbone (built once, then reused by fit / predict)."""
        return self._backbone()

    def method_input(self, feats: np.ndarray) -> np.ndarray:
        """What the fitted method takes for backbone-feature rows: the fitted PCA, then the manifold stage."""
        return self._manifold(self._reduce(feats, fit=False), fit=False)

    def check_fitted(self) -> None:
        """NotFittedError (also an InputError) unless fitted or loaded."""
        self._check_fitted()

    _features = features  # the old private name (cli, choosek and benchmarks called it); kept one release

    def fit_context(self, source: ImageSource | None, valid: np.ndarray, fs: FeatureSet | None = None,
                    **fields: Any) -> FitContext:
        """The :class:`FitContext` of a fit on ``source`` (None: precomputed features).

        ``backbone`` is None when fitting on precomputed features; ``rows[i]`` is the source
        index of feature row ``i`` (valid images only). ``fields``: more typed fields
        (``base_proba``, ``truth``, ...) and overrides (``seed``, ``progress``).
        """
        base: dict[str, Any] = dict(
            seed=self.seed, device=self.device, progress=self.progress,
            work_dir=None if fs is None or fs.path is None else fs.path,
            source=source, backbone=None if source is None else self._backbone(), rows=np.flatnonzero(valid),
            cache_dir=self.cache_dir, batch_size=self.batch_size, precision=self.precision, workers=self.workers,
        )
        return FitContext(**{**base, **fields})

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
        feats, valid, fs, source = self.features(X)
        t1 = time.perf_counter()
        n_valid = int(valid.sum())
        if n_valid < int(self.n_clusters):
            raise InputError(
                f"K={self.n_clusters} is larger than the number of readable images ({n_valid})"
            )
        # --- issue 20: above 2^20 rows, all valid (the usual case): the memory-mapped cache itself, no N x D copy
        from imgclust.methods.base import FIT_PROBA_BLOCK, fit_labels

        x = self._reduce(feats if len(feats) > FIT_PROBA_BLOCK and valid.all() else feats[valid], fit=True)
        x = self._manifold(x, fit=True, cache_dir=None if fs is None else fs.path)
        method_cls = get_method(self.method)
        model: ClusteringMethod = method_cls(int(self.n_clusters), self.method_options)
        model.fit(x, self.fit_context(source, valid, fs))
        t2 = time.perf_counter()
        # A method that fine-tuned its backbone (``image_level``, e.g. icbpl finetune=last_blocks)
        # no longer matches the cached features: fit_proba is the probabilities of its own pass.
        lab, conf = fit_labels(model, x)  # issue 20: the (N, K) probabilities in blocks above 2^20 rows
        self.model_ = model
        self.n_features_in_ = feats.shape[1]
        self.labels_ = np.full(len(feats), -1, dtype=np.int64)
        self.labels_[valid] = lab
        self.confidences_ = np.zeros(len(feats), dtype=np.float32)
        self.confidences_[valid] = conf
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
        if self.model_.image_level:  # fine-tuned backbone: the method reads the images
            if _is_feature_array(X):
                raise InputError("this model fine-tuned its backbone: predict needs images, not precomputed features")
            return self.model_.predict_proba_images(as_source(X), self._backbone(), batch_size=self.batch_size,
                                                    device=self.device, workers=self.workers, progress=self.progress)
        feats, valid, _, _ = self.features(X)
        if feats.ndim != 2 or feats.shape[1] != self.n_features_in_:
            raise InputError(f"X has {feats.shape[-1]} features, but ImageClusterer is expecting {self.n_features_in_} "
                             "features as input (the dimension of the features it was fitted on)")
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
            raise NotFittedError("this ImageClusterer is not fitted yet: call fit() or load a saved model")

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # NaN/inf rows are skipped (label -1), like unreadable images
        tags.non_deterministic = False
        return tags

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


class NotFittedError(InputError, _SklearnNotFittedError):
    """predict / save before fit: scikit-learn's NotFittedError, and an InputError for the CLI's one-line message."""


def _is_feature_array(X: Any) -> bool:
    """A 2-D numeric array is precomputed features (images are 3-D or 4-D)."""
    return isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype.kind in "fiubcO"


def _check_feature_array(X: np.ndarray) -> np.ndarray:
    """Precomputed features as float32, or one clear error (scikit-learn's wording for empty input)."""
    if X.dtype.kind == "c":
        raise InputError("Complex data not supported: give real-valued features")
    if X.shape[1] == 0:  # faiss would die with SIGFPE on 0-d vectors (issue 17)
        raise InputError(f"0 feature(s) (shape={X.shape}) while a minimum of 1 is required.")
    if X.shape[0] == 0:
        raise InputError(f"0 sample(s) (shape={X.shape}) while a minimum of 1 is required.")
    return np.asarray(X, dtype=np.float32)  # object arrays: TypeError / ValueError from numpy, as sklearn expects


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


# --------------------------------------------------------------------- moved to imgclust.run
# Issue 17: the run-directory jobs live in imgclust.run (which imports this module). The old
# names still resolve from here for one release (deprecated); imported by name on first use, so
# this module never imports run.py at load time and the flow stays one-way.
_MOVED_TO_RUN = ("cluster", "refine_model", "refine_estimator", "choose_k_scores", "apply_edits",
                 "_cluster_run", "_choose_k", "_trust", "_write_report", "_small_images_note", "_versions")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_RUN:
        import importlib

        return getattr(importlib.import_module("imgclust.run"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ImageClusterer", "as_source", "RunConfig", "SourceConfig", "BackboneConfig", "FeatureConfig", "asdict"]
