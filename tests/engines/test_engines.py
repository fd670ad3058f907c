"""Inference engines (issue 19): agreement with PyTorch, the compiled-model cache, auto choice,
JPEG draft decoding, and the feature-cache key policy."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgclust.backbones.base import Backbone, Preprocess
from imgclust.data import open_source
from imgclust.data.decode import decode_image, jpeg_draft
from imgclust.engines import AUTO_MIN_WORK, available_engines, build_engine, choose_engine
from imgclust.engines.pipeline import feature_key_suffix
from imgclust.errors import InputError
from imgclust.features import extract_features

FAST = [e for e in ("openvino", "onnxruntime") if e in available_engines()]
needs_fast = pytest.mark.skipif(not FAST, reason="neither openvino nor onnxruntime is installed")


class Tiny(Backbone):
    """A small conv net (random, seeded): exports and compiles in about a second."""

    def __init__(self, seed: int = 0, size: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                                 nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU6(),
                                 nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.net.eval().requires_grad_(False)
        self.name, self.dim, self.weights_id = "tiny-test", 32, "random"
        self.preprocess = Preprocess(size=size, resize="squash")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth-ish images (blurred noise), like photos, not white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC)) for a in small])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@needs_fast
@pytest.mark.parametrize("engine", FAST)
def test_fp32_engine_matches_torch(tmp_path, engine):
    bb = Tiny()
    x = _batch()
    ref = build_engine(bb, "torch", "fp32", "cpu", cache_root=tmp_path)(x)
    out = build_engine(bb, engine, "fp32", "cpu", cache_root=tmp_path)(x)
    assert out.shape == ref.shape == (len(x), 32) and out.dtype == np.float32
    assert _cos(out, ref).min() >= 0.9999
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    # A different batch size through the same compiled model (the batch axis is dynamic).
    np.testing.assert_allclose(build_engine(bb, engine, "fp32", "cpu", cache_root=tmp_path)(x[:5]), ref[:5],
                               rtol=1e-3, atol=1e-4)


@needs_fast
def test_features_from_each_engine_agree_and_share_the_fp32_cache_key(tmp_path):
    src = open_source("digits")
    bb = Tiny()
    ref = extract_features(src, bb, cache_dir=tmp_path / "a", engine="torch", progress=False)
    for eng in FAST:
        fs = extract_features(src, bb, cache_dir=tmp_path / eng, engine=eng, progress=False)
        assert fs.key == ref.key  # fp32 features of every engine share the key (see engines.pipeline)
        assert _cos(np.asarray(fs.features), np.asarray(ref.features)).min() >= 0.9999
        meta = (fs.path / "meta.json").read_text()
        assert f'"engine": "{eng}"' in meta
    assert feature_key_suffix("torch", "bf16") == "-bf16"  # PyTorch bf16 keeps its historical key
    assert feature_key_suffix("openvino", "int8") == "-int8-openvino"
    assert feature_key_suffix("onnxruntime", "fp32") == ""


@needs_fast
@pytest.mark.parametrize("engine", FAST)
def test_compiled_model_cache_is_reused_and_invalidated_by_weights_size_precision(tmp_path, engine):
    x = _batch()
    e1 = build_engine(Tiny(), engine, "fp32", "cpu", cache_root=tmp_path)
    assert not e1.reused and (e1.artifact / "meta.json").is_file()
    e2 = build_engine(Tiny(), engine, "fp32", "cpu", cache_root=tmp_path)  # a new process would do the same
    assert e2.reused and e2.artifact == e1.artifact
    np.testing.assert_array_equal(e1(x), e2(x))

    changed = Tiny()
    with torch.no_grad():
        changed.net[0].weight[0, 0, 0, 0] += 0.5  # same name and weights_id label, different weights
    e3 = build_engine(changed, engine, "fp32", "cpu", cache_root=tmp_path)
    assert not e3.reused and e3.artifact != e1.artifact
    ref = build_engine(changed, "torch", "fp32", "cpu", cache_root=tmp_path)(x)
    assert _cos(e3(x), ref).min() >= 0.9999  # the stale model was not used

    e4 = build_engine(Tiny(size=40), engine, "fp32", "cpu", cache_root=tmp_path)
    assert not e4.reused and e4.artifact != e1.artifact
    assert e4(_batch(size=40)).shape == (24, 32)


@needs_fast
@pytest.mark.parametrize("engine", FAST)
def test_int8_is_calibrated_once_on_the_given_images(tmp_path, engine):
    if engine == "openvino":
        pytest.importorskip("nncf")
    bb = Tiny()
    calls = []

    def calib():
        calls.append(1)
        for s in range(0, 64, 16):
            yield _batch(16, seed=100 + s)

    x = _batch()
    e = build_engine(bb, engine, "int8", "cpu", cache_root=tmp_path, calibration=calib, calibration_id="t")
    assert e.effective_precision == "int8" and not e.reused and len(calls) == 1
    out = e(x)
    ref = build_engine(bb, "torch", "fp32", "cpu", cache_root=tmp_path)(x)
    assert np.isfinite(out).all() and np.median(_cos(out, ref)) > 0.95
    e2 = build_engine(bb, engine, "int8", "cpu", cache_root=tmp_path, calibration=calib, calibration_id="t")
    assert e2.reused and len(calls) == 1  # cached: no second calibration
    e3 = build_engine(bb, engine, "int8", "cpu", cache_root=tmp_path, calibration=calib, calibration_id="other")
    assert not e3.reused and len(calls) == 2  # other images -> other quantised model
    if engine == "openvino":  # the recipe keeps the first and last convolutions in fp32 (no FakeQuantize input)
        import openvino as ov

        m = ov.Core().read_model(str(e.artifact / "model.xml"))
        convs = [op for op in m.get_ordered_ops() if op.get_type_name() == "Convolution"]
        fed = [{i.get_source_output().get_node().get_type_name() for i in op.inputs()} for op in convs]
        assert "FakeQuantize" not in fed[0] and "FakeQuantize" not in fed[-1], fed
        assert any(op.get_type_name() == "FakeQuantize" for op in m.get_ordered_ops())  # the middle is int8
        assert json.loads((e.artifact / "meta.json").read_text())["int8_recipe"] == "fp32-ends"


def test_auto_choice_and_bad_combinations(tmp_path):
    cpu = torch.device("cpu")
    bb = Tiny(size=224)
    assert choose_engine("auto", "fp32", cpu, bb, rows=10, root=tmp_path) == "torch"  # conversion would not pay off
    big = choose_engine("auto", "fp32", cpu, bb, rows=AUTO_MIN_WORK * 2, root=tmp_path)
    assert big == (FAST[0] if FAST else "torch")
    assert choose_engine("torch", "bf16", cpu) == "torch"
    for engine, precision, msg in [("tensorrt", "fp32", "unknown engine"), ("auto", "fp8", "precision must be"),
                                   ("torch", "int8", "int8 needs"), ("auto", "fp16", "fp16 needs a CUDA")]:
        with pytest.raises(InputError, match=msg):
            choose_engine(engine, precision, cpu)


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (h // 50, w // 50, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_jpeg_draft_decodes_smaller_and_resizes_to_nearly_the_same_pixels():
    data = _jpeg(2000, 1500)
    full = decode_image(data)
    assert full.shape == (1500, 2000, 3)
    with jpeg_draft(448):
        small = decode_image(data)
    assert small.shape == (750, 1000, 3)  # 1/2 scale: the smallest DCT scale keeping both sides >= 448
    with jpeg_draft(150):
        assert decode_image(data).shape == (188, 250, 3)  # 1/8
    assert decode_image(data).shape == full.shape  # outside the block: full decode again
    pre = Preprocess(size=224)
    diff = np.abs(pre.resize_image(small).astype(int) - pre.resize_image(full).astype(int))
    assert diff.mean() < 2.0
    with jpeg_draft(448):  # small photos and non-JPEG files are never drafted
        assert decode_image(_jpeg(600, 450)).shape == (450, 600, 3)
        buf = io.BytesIO()
        Image.fromarray(full).save(buf, "PNG")
        assert decode_image(buf.getvalue()).shape == full.shape


@pytest.mark.skipif("openvino" not in available_engines(), reason="openvino is not installed")
def test_openvino_streams_split_the_batch_and_match_one_latency_request(tmp_path):
    import openvino as ov

    old = torch.get_num_threads()
    torch.set_num_threads(2)  # engine_threads(): 2 threads -> 2 streams
    try:
        eng = build_engine(Tiny(), "openvino", "fp32", "cpu", cache_root=tmp_path)
    finally:
        torch.set_num_threads(old)
    assert eng.streams == 2 and len(eng.requests) == 2
    assert eng.compiled.get_property("NUM_STREAMS") == 2
    ref = ov.Core().compile_model(str(eng.artifact / "model.xml"), "CPU",
                                  {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1})
    x = _batch(17)
    want = np.asarray(ref(x)[0])
    for n in (17, 16, 2, 1):  # uneven split, even split, one row per stream, one stream idle
        out = eng(x[:n])
        assert out.shape == (n, 32) and out.dtype == np.float32
        np.testing.assert_allclose(out, want[:n], rtol=1e-6, atol=1e-6)
    # Each call's output is a copy: a later call does not overwrite an earlier result.
    a = eng(x[:4])
    eng(x[4:8])
    np.testing.assert_allclose(a, want[:4], rtol=1e-6, atol=1e-6)
