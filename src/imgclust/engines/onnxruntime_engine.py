"""ONNX Runtime engine (CPU execution provider).

``fp32``: the exported graph, optimised once (``ORT_ENABLE_EXTENDED``, portable across
CPUs) and stored in the compiled-model cache. ``bf16``: ONNX Runtime's CPU provider has no
bf16 kernels, so it runs fp32 (``effective_precision`` says so). ``int8``: static QDQ
quantisation (``onnxruntime.quantization.quantize_static``: per-channel int8 weights,
uint8 activations, min-max calibration; ``reduce_range``: 7-bit weights, because u8s8 products
saturate on AVX2 CPUs without VNNI - without it the median feature cosine to fp32 on the
bundled digits was 0.83) calibrated on a sample of the user's own images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from imgclust.backbones.base import Backbone
from imgclust.engines.base import Engine, cached_artifact, engine_threads, model_key


def version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _session(path: Path, level: str = "all", save_to: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = engine_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # no per-initializer warnings
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _Reader:
    """``CalibrationDataReader`` over uint8 batches (the class is built lazily: ORT is optional)."""

    def __new__(cls, batches: Iterable[np.ndarray]):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it: Iterator[np.ndarray] = iter(batches)

            def get_next(self):
                b = next(self.it, None)
                return None if b is None else {"images": np.ascontiguousarray(b)}

        return Reader()


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, backbone: Backbone, precision: str, root: Path, onnx_path: Callable[[], Path],
                 calibration: Callable[[], Iterable[np.ndarray]] | None = None, calibration_id: str = "") -> None:
        self.precision = precision
        int8 = precision == "int8"
        key = model_key(backbone, engine="onnxruntime", version=version(), precision="int8" if int8 else "fp32",
                        calibration=calibration_id if int8 else "")

        def build(tmp: Path) -> dict:
            meta = {"engine": "onnxruntime", "version": version(), "backbone": backbone.name, "precision": precision}
            src = onnx_path()
            if int8:
                from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

                n = 0

                def counted() -> Iterator[np.ndarray]:
                    nonlocal n
                    for b in calibration():
                        n += len(b)
                        yield b

                quantize_static(str(src), str(tmp / "quant.onnx"), _Reader(counted()), quant_format=QuantFormat.QDQ,
                                per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
                meta["calibration_images"] = n
                src = tmp / "quant.onnx"
            _session(src, "extended", save_to=tmp / "model.onnx")
            if src.parent == tmp:
                src.unlink()
            return meta

        self.artifact, self.reused = cached_artifact(root, key, build)
        self.effective_precision = "int8" if int8 else "fp32"
        self.session = _session(self.artifact / "model.onnx", "all")
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input: np.ascontiguousarray(batch)})[0]
        return np.asarray(out, dtype=np.float32)
