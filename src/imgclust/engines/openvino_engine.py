"""OpenVINO engine (CPU): the backbone's ONNX graph read by OpenVINO and compiled for this CPU.

Measured on EfficientNet-Lite0 at 224 px, same batch, interleaved: 6.5x PyTorch eager fp32
channels_last on 2 AVX-512 cores (the issue's numbers), 3x on 2 AVX2 cores under load (this
machine, see docs/notes/issue-19.md); relative output difference ~2e-6. ``bf16`` uses
OpenVINO's bf16 inference hint where the CPU supports it (AVX-512 BF16 / AMX) and fp32
elsewhere (``effective_precision`` says which ran). ``int8``: post-training quantisation with
NNCF (``nncf.quantize``, min-max statistics + fast bias correction) calibrated on a sample
of the user's own images.

Streams (issue 19 session 4): the model is compiled with one single-thread *stream* per
inference thread (``PERFORMANCE_HINT=THROUGHPUT``, ``NUM_STREAMS`` = threads) and each call
splits its batch over the streams, run at once. A stream needs no barrier between threads, so
when the decode workers take a core for a while the other stream keeps going instead of
spin-waiting for its partner at every layer (the latency mode's 2-thread parallel-for). Per
image the results are bit-identical to the latency mode (every output compared, max |diff| 0).
Measured on the large photos of ``benchmarks/extract_speed.py`` (b), whole pipeline, 2 cores
(docs/notes/issue-19.md, session 4): 1.2-1.3x faster while other work shares the cores (load
4-5), the same speed (within 2 %) on an idle machine, where nothing preempts the threads.

The converted (and quantised) model is stored in the compiled-model cache
(:func:`imgclust.engines.base.cached_artifact`); OpenVINO's own blob cache (``CACHE_DIR``)
beside it makes the per-CPU compilation a load on later runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from imgclust.backbones.base import Backbone
from imgclust.engines.base import Engine, cached_artifact, engine_threads, model_key
from imgclust.errors import InputError


def version() -> str:
    import openvino as ov

    return str(ov.get_version())


def has_nncf() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


#: The int8 recipe (part of the compiled-model key). Session 2 of issue 19 compared NNCF settings on
#: CIFAR-10 test (benchmarks/int8_recipes.py, 1,000 images, EfficientNet-Lite0 @224): keeping the
#: stem conv and the last conv (whose output is the feature) in fp32 raised the median feature cosine
#: to fp32 from 0.925 to 0.957 and the cluster agreement from 61.9 % to 67.6 %.
INT8_RECIPE = "fp32-ends"


def int8_options(model) -> dict:
    """``nncf.quantize`` options of :data:`INT8_RECIPE`: the first and last convolutions stay fp32."""
    import nncf

    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    opts: dict = {"fast_bias_correction": True}
    if convs:
        opts["ignored_scope"] = nncf.IgnoredScope(names=sorted({convs[0], convs[-1]}), validate=False)
    return opts


class OpenVINOEngine(Engine):
    name = "openvino"

    def __init__(self, backbone: Backbone, precision: str, root: Path, onnx_path: Callable[[], Path],
                 calibration: Callable[[], Iterable[np.ndarray]] | None = None, calibration_id: str = "") -> None:
        import openvino as ov

        self.precision = precision
        int8 = precision == "int8"
        if int8 and not has_nncf():
            raise InputError("--precision int8 with openvino needs NNCF: pip install 'imgclust[int8]' (or use --engine onnxruntime)")
        if int8 and calibration is None:
            raise InputError("--precision int8 needs calibration images")
        key = model_key(backbone, engine="openvino", version=version(), precision="int8" if int8 else "fp32",
                        calibration=f"{calibration_id}:{INT8_RECIPE}" if int8 else "")

        def build(tmp: Path) -> dict:
            core = ov.Core()
            model = core.read_model(str(onnx_path()))
            meta = {"engine": "openvino", "version": version(), "backbone": backbone.name, "precision": precision}
            if int8:
                import nncf

                items = [b[None] if b.ndim == 3 else b for batch in calibration() for b in batch]
                model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **int8_options(model))
                meta["calibration_images"] = len(items)
                meta["int8_recipe"] = INT8_RECIPE
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            return meta

        self.artifact, self.reused = cached_artifact(root, key, build)
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(root / "openvino-blobs")})
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        hint = "bf16" if precision == "bf16" and "BF16" in caps else "f32"
        self.effective_precision = "int8" if int8 else ("bf16" if hint == "bf16" else "fp32")
        threads = engine_threads()
        self.streams = max(1, threads)
        self.compiled = core.compile_model(str(self.artifact / "model.xml"), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.streams})
        self.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # One stream per thread, each running a slice of the batch at once (module docstring: "Streams").
        parts = [p for p in np.array_split(np.ascontiguousarray(batch), self.streams) if len(p)]
        for req, part in zip(self.requests, parts, strict=False):
            req.start_async({0: np.ascontiguousarray(part)})
        outs = []
        for req, _ in zip(self.requests, parts, strict=False):
            req.wait()
            outs.append(np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)
