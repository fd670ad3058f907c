"""Inference engines for feature extraction: PyTorch, OpenVINO, ONNX Runtime.

``--engine auto|torch|openvino|onnxruntime`` and ``--precision fp32|bf16|int8`` (``fp16``:
CUDA only). ``auto`` picks, for the device:

* CUDA: PyTorch (channels_last, autocast, ``torch.compile``);
* CPU: OpenVINO if installed, else ONNX Runtime, else PyTorch. For a small job (fewer than
  :data:`AUTO_MIN_WORK` images at 224 px equivalent) whose converted model is not cached
  yet, PyTorch: the one-time conversion (5-20 s) would cost more than it saves.
* ``int8`` needs OpenVINO + NNCF or ONNX Runtime; ``auto`` takes whichever is installed.

Engines (see :mod:`imgclust.engines.base`) take ``(B, S, S, C)`` uint8 batches and return
``(B, dim)`` float32 features. OpenVINO and ONNX Runtime are dependencies of imgclust, but
nothing imports them at start-up and everything runs with PyTorch alone where they are
missing (``auto`` falls back). NNCF (OpenVINO's int8 quantiser) is the ``int8`` extra.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from imgclust.backbones.base import Backbone
from imgclust.engines.base import Engine, UInt8Input, cached_artifact, model_key, weights_digest
from imgclust.errors import InputError

__all__ = ["AUTO_MIN_WORK", "ENGINES", "PRECISIONS", "Engine", "UInt8Input", "available_engines", "build_engine",
           "choose_engine", "onnx_artifact", "weights_digest"]

ENGINES: tuple[str, ...] = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8", "fp16")
#: Below this many images (scaled to 224 px: n * (size / 224)^2), ``auto`` keeps PyTorch unless
#: the converted model is already cached. EfficientNet-Lite0: conversion ~5-15 s, saving
#: ~0.1 s per image on 2 cores, so it pays off after ~100 images; 1,000 leaves margin.
AUTO_MIN_WORK = 1000


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_engines() -> list[str]:
    """Engines usable in this environment (torch always)."""
    return ["torch"] + [e for e, m in (("openvino", "openvino"), ("onnxruntime", "onnxruntime")) if _installed(m)]


def _check(engine: str, precision: str, device: torch.device) -> None:
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; use one of: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of fp32, bf16, int8 (fp16 on CUDA), got {precision!r}")
    if engine not in ("auto", "torch") and engine not in available_engines():
        raise InputError(f"engine {engine!r} is not installed: pip install {engine} (or use --engine torch)")
    if engine in ("openvino", "onnxruntime") and device.type != "cpu":
        raise InputError(f"engine {engine!r} runs on the CPU; use --engine torch (or auto) with --device {device}")
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA GPU; on the CPU use fp32, bf16 or int8")
    if precision == "int8" and engine == "torch":
        raise InputError("--precision int8 needs --engine openvino or onnxruntime (PyTorch has no int8 path here)")


def _artifact_cached(root: Path, backbone: Backbone, engine: str) -> bool:
    mod = importlib.import_module(f"imgclust.engines.{engine}_engine")
    key = model_key(backbone, engine=engine, version=mod.version(), precision="fp32", calibration="")
    return (root / key / "meta.json").is_file()


def choose_engine(engine: str, precision: str, device: torch.device, backbone: Backbone | None = None,
                  rows: int | None = None, root: Path | None = None) -> str:
    """The engine ``engine`` resolves to (validates the combination; see the module docstring)."""
    _check(engine, precision, device)
    if engine != "auto":
        return engine
    if device.type != "cpu":
        if precision == "int8":
            raise InputError("--precision int8 runs on the CPU (OpenVINO / ONNX Runtime); use --device cpu")
        return "torch"
    fast = [e for e in available_engines() if e != "torch"]
    if precision == "int8":
        if "openvino" in fast and _installed("nncf"):
            return "openvino"
        if "onnxruntime" in fast:
            return "onnxruntime"
        raise InputError("--precision int8 needs ONNX Runtime or OpenVINO + NNCF: pip install onnxruntime")
    if not fast:
        return "torch"
    best = fast[0]
    if rows is not None and backbone is not None:
        work = rows * (backbone.preprocess.size / 224.0) ** 2
        if work < AUTO_MIN_WORK and not (root is not None and _artifact_cached(root, backbone, best)):
            return "torch"
    return best


def onnx_artifact(backbone: Backbone, root: Path) -> Path:
    """The backbone's fp32 uint8-input ONNX graph, exported once and cached; returns the file."""
    from imgclust.engines.onnx_export import OPSET, export_onnx

    key = model_key(backbone, engine="onnx", version=f"torch-{torch.__version__}-opset{OPSET}", precision="fp32")

    def build(tmp: Path) -> dict:
        wrapped = UInt8Input(backbone)
        export_onnx(wrapped, tmp / "model.onnx", backbone.preprocess.size, wrapped.channels, ["features"])
        return {"engine": "onnx", "backbone": backbone.name, "torch": torch.__version__, "opset": OPSET}

    entry, _ = cached_artifact(root, key, build)
    return entry / "model.onnx"


def build_engine(
    backbone: Backbone,
    engine: str = "auto",
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    *,
    cache_root: Path | str,
    rows: int | None = None,
    calibration: Callable[[], Iterable[np.ndarray]] | None = None,
    calibration_id: str = "",
) -> Engine:
    """A ready engine for ``backbone``.

    ``cache_root``: the imgclust cache directory (compiled models go to ``<cache_root>/engines``).
    ``rows``: images about to be processed (lets ``auto`` skip a conversion that would not pay
    off). ``calibration``: yields uint8 batches of the user's images (int8 only; called only
    when the quantised model is not cached); ``calibration_id`` identifies that sample in the key.
    """
    dev = torch.device(device)
    root = Path(cache_root) / "engines"
    name = choose_engine(engine, precision, dev, backbone, rows, root)
    if name == "torch":
        from imgclust.engines.torch_engine import TorchEngine

        return TorchEngine(backbone, precision, dev)
    backbone = backbone.cpu().eval()

    def onnx_path() -> Path:
        return onnx_artifact(backbone, root)

    if name == "openvino":
        from imgclust.engines.openvino_engine import OpenVINOEngine

        return OpenVINOEngine(backbone, precision, root, onnx_path, calibration, calibration_id)
    from imgclust.engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(backbone, precision, root, onnx_path, calibration, calibration_id)
