"""Portable fitted models: a run's backbone and classifier as one ONNX file.

``imgclust export-model RUN model.onnx`` writes a graph with

* input ``images``: ``(B, S, S, C)`` uint8 RGB, already resized (how: the ``imgclust``
  metadata entry, ``preprocess``; squash = resize straight to ``S x S`` with the given
  interpolation, center_crop = shorter side to ``S / crop_pct`` then the centre ``S x S``);
  scaling and mean/std normalisation are inside the graph;
* outputs ``probabilities`` ``(B, K)`` float32 and ``cluster`` ``(B,)`` int64.

The model's metadata (``custom_metadata_map["imgclust"]``, JSON) also holds K, the backbone,
the method and the per-cluster summary of the run. ``imgclust predict model.onnx SRC`` and
:func:`predict_onnx` run it with ONNX Runtime; the README shows the same with onnxruntime and
Pillow alone.

Exportable classifiers: spherical k-means (the default ``kmeans``), a method whose fitted
model has a self-trained linear classifier (``classifier_``, e.g. ICCE), and any method that
provides ``torch_head() -> nn.Module`` mapping (reduced) features to probabilities. Others
and models that fine-tuned their backbone raise a one-line InputError.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclust.errors import InputError

ONNX_FORMAT = 1


class _SphericalKMeansHead(nn.Module):
    """softmax(normalize(x) @ normalize(C).T / T): KMeans.predict_proba with ``normalize=True``."""

    def __init__(self, centroids: np.ndarray, temperature: float) -> None:
        super().__init__()
        c = torch.from_numpy(np.asarray(centroids, np.float32))
        self.register_buffer("c", c / c.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.t = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(x @ self.c.T / self.t, dim=1)


class _LinearHead(nn.Module):
    """softmax(((x - mean) / std) @ W + b): the self-trained LinearClassifier."""

    def __init__(self, clf: Any) -> None:
        super().__init__()
        for k in ("weight", "bias", "mean", "std"):
            self.register_buffer(k, getattr(clf, k).detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax((x - self.mean) / self.std @ self.weight + self.bias, dim=1)


def _head(model: Any) -> nn.Module:
    if getattr(model, "chosen_", None) is not None:  # `auto` (the default): the candidate it kept
        return _head(model.chosen_)
    if hasattr(model, "torch_head"):
        return model.torch_head()
    if getattr(model, "classifier_", None) is not None and hasattr(model.classifier_, "weight"):
        return _LinearHead(model.classifier_)
    if getattr(model, "name", "") == "kmeans" and getattr(model, "centroids_", None) is not None:
        if not model.config.normalize:
            raise InputError("export-model supports spherical k-means (normalize=true, the default); "
                             "this run used normalize=false")
        return _SphericalKMeansHead(model.centroids_, model.config.temperature)
    raise InputError(f"method {getattr(model, 'name', type(model).__name__)!r} cannot be exported to ONNX yet "
                     "(exportable: kmeans, methods with a self-trained linear classifier)")


class _Portable(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, pca_mean: np.ndarray | None,
                 pca_components: np.ndarray | None) -> None:
        super().__init__()
        from imgclust.engines import UInt8Input

        self.features = UInt8Input(backbone)
        self.head = head
        self.pca = pca_mean is not None
        if self.pca:
            self.register_buffer("pm", torch.from_numpy(np.asarray(pca_mean, np.float32)))
            self.register_buffer("pc", torch.from_numpy(np.asarray(pca_components, np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        if self.pca:
            f = (f - self.pm) @ self.pc.T
        p = self.head(f)
        return p, p.argmax(dim=1)


def _model_dir(run: Path) -> Path:
    if (run / "model.json").is_file():
        return run
    if (run / "model" / "model.json").is_file():
        return run / "model"
    raise InputError(f"{run} is not a run directory or model directory (model.json not found)")


def export_model(run: str | Path, dest: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write ``run``'s fitted model (backbone + classifier) to the ONNX file ``dest``; returns a summary."""
    from imgclust.api import ImageClusterer
    from imgclust.engines.onnx_export import export_onnx
    from imgclust.rundir import atomic_open

    run, dest = Path(run), Path(dest)
    if dest.suffix.lower() != ".onnx":
        raise InputError(f"the exported model must be a .onnx file, got {dest.name!r}")
    mdir = _model_dir(run)
    run_root = mdir.parent if mdir.name == "model" else mdir
    if dest.resolve().is_relative_to(run_root.resolve()):
        raise InputError(f"refusing to write {dest} inside the run directory {run_root}; pick a path outside it")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} exists; pass --overwrite to replace it")
    try:
        import onnx
    except ImportError as e:
        raise InputError("export-model needs the onnx package: pip install onnx") from e
    est = ImageClusterer.load(mdir, progress=False)
    if est.model_.image_level:
        raise InputError("this model fine-tuned its backbone; export-model supports frozen-backbone models only")
    bb = est.get_backbone().cpu().eval()
    head = _head(est.model_)
    net = _Portable(bb, head, getattr(est, "pca_mean_", None) if est.pca else None,
                    getattr(est, "pca_components_", None) if est.pca else None).eval()
    meta_json = json.loads((mdir / "model.json").read_text())
    info = {
        "format": ONNX_FORMAT,
        "input": {"name": "images", "layout": "NHWC", "dtype": "uint8", "color": "RGB"},
        "outputs": ["probabilities", "cluster"],
        "preprocess": asdict(bb.preprocess),
        "n_clusters": int(est.model_.n_clusters),
        "backbone": bb.describe(),
        "method": est.method,
        "clusters": meta_json.get("clusters"),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.export.tmp")
    try:
        export_onnx(net, tmp, bb.preprocess.size, net.features.channels, ["probabilities", "cluster"])
        m = onnx.load(str(tmp))
        m.metadata_props.add(key="imgclust", value=json.dumps(info, default=str))
        m.doc_string = "imgclust fitted model: uint8 NHWC RGB images -> cluster probabilities"
        with atomic_open(dest, "wb") as f:
            f.write(m.SerializeToString())
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(dest), "bytes": dest.stat().st_size, "n_clusters": info["n_clusters"],
            "backbone": bb.name, "method": est.method}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``imgclust`` metadata of an exported model (InputError when absent)."""
    sess = _session(path)
    return _meta(sess, path)


def _session(path: str | Path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise InputError("predicting with a .onnx model needs onnxruntime: pip install onnxruntime") from e
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, int(torch.get_num_threads()))
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__})") from e


def _meta(sess: Any, path: str | Path) -> dict[str, Any]:
    raw = sess.get_modelmeta().custom_metadata_map.get("imgclust")
    if raw is None:
        raise InputError(f"{path}: not an imgclust model (no 'imgclust' metadata); export one with `imgclust export-model`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: corrupt imgclust metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise InputError(f"{path}: unsupported imgclust ONNX format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def predict_onnx(path: str | Path, source: Any, batch_size: int = 64, workers: int | None = None,
                 progress: bool = True) -> np.ndarray:
    """(N, K) probabilities of ``source`` under the exported model; rows of unreadable images are zero."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from imgclust.backbones.base import Preprocess
    from imgclust.engines.pipeline import make_loader, prefetched
    from imgclust.errors import BadImageError
    from imgclust.progress import progress_bar

    sess = _session(path)
    meta = _meta(sess, path)
    try:
        pre = Preprocess(**meta["preprocess"])
        k = int(meta["n_clusters"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid imgclust metadata ({e})") from e
    n = len(source)
    out = np.zeros((n, k), np.float32)
    load = make_loader(source, pre)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    bar = progress_bar(total=n, desc="predict", unit="img", enable=progress)
    try:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for idx, imgs in prefetched(pool, load, batches):
                good = [j for j, im in enumerate(imgs) if not isinstance(im, BadImageError)]
                if good:
                    p = sess.run(["probabilities"], {"images": np.stack([imgs[j] for j in good])})[0]
                    out[[idx[j] for j in good]] = p
                bar.update(len(idx))
    finally:
        bar.close()
    return out
