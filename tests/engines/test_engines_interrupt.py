"""Issue 19: with the new producer (decode pool + OpenVINO / ONNX Runtime engine), an extraction
killed with SIGKILL resumes to the same bytes as an uninterrupted run; and ``export-model``
round-trips: the ONNX file predicts the run's clusters."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgclust.engines import available_engines

ENGINE = next((e for e in ("openvino", "onnxruntime") if e in available_engines()), None)
pytestmark = pytest.mark.skipif(ENGINE is None, reason="neither openvino nor onnxruntime is installed")

N_DIGITS = 600  # --limit: a seeded sample keeps each CLI run to seconds
ARGS = ["cluster", "digits", "--k", "10", "--limit", str(N_DIGITS), "--backbone", "efficientnet-lite0", "--image-size", "32",
        "--batch-size", "16", "--chunk-rows", "64", "--seed", "3", "--option", "n_init=3", "--quiet", "--no-report"]


def _env(cache: Path) -> dict:
    return dict(os.environ, IMGCLUST_CACHE=str(cache), IMGCLUST_QUIET="1", OMP_NUM_THREADS="1")


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *args], capture_output=True, text=True,
                          env=_env(cache), timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    r = _cli(*ARGS, "--engine", ENGINE, "--out", str(base / "run"), cache=base / "cache")
    assert r.returncode == 0, r.stderr
    return base


def test_sigkill_during_engine_extraction_resumes_to_identical_features(reference, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    # The compiled model is cached like the features: reuse the reference's so the kill lands mid-extraction.
    (cache / "engines").parent.mkdir(parents=True)
    os.symlink(reference / "cache" / "engines", cache / "engines")
    proc = subprocess.Popen([sys.executable, "-m", "imgclust.cli", *ARGS, "--engine", ENGINE, "--out", str(out)],
                            env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    done = 0
    while time.monotonic() - t0 < 300 and done == 0:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.communicate()}")
        for p in (cache / "features").glob("*/progress.json") if (cache / "features").is_dir() else []:
            with contextlib.suppress(OSError, ValueError, KeyError):  # replaced while being read
                done = json.loads(p.read_text())["done"]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    entry = next(p for p in (cache / "features").iterdir() if p.is_dir())
    progress = json.loads((entry / "progress.json").read_text())
    assert 0 < progress["done"] < N_DIGITS and not (entry / "meta.json").exists()

    r = _cli(*ARGS, "--engine", ENGINE, "--out", str(out), cache=cache)
    assert r.returncode == 0, r.stderr
    feats = json.loads((out / "run.json").read_text())["features"]
    ref = json.loads((reference / "run" / "run.json").read_text())["features"]
    assert feats["cache_status"] == "resumed" and feats["resumed_from"] == progress["done"]
    assert feats["sha256"] == ref["sha256"]  # bit-identical cache
    assert (out / "assignments.csv").read_bytes() == (reference / "run" / "assignments.csv").read_bytes()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["engine"]["engine"] == ENGINE and meta["engine"]["reused"] is True


def test_export_model_round_trip_predicts_the_runs_clusters(reference, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run = reference / "run"
    onnx_path = tmp_path / "model.onnx"
    r = _cli("export-model", str(run), str(onnx_path), cache=reference / "cache")
    assert r.returncode == 0, r.stderr
    pred = tmp_path / "pred.csv"
    r = _cli("predict", str(onnx_path), "digits", "--out", str(pred), "--quiet", cache=tmp_path / "empty-cache")
    assert r.returncode == 0, r.stderr
    want = {row["id"]: row["cluster"] for row in csv.DictReader((run / "assignments.csv").open())}
    got = {row["id"]: row["cluster"] for row in csv.DictReader(pred.open())}  # all 1797 digits
    assert len(want) == N_DIGITS and set(want) <= set(got)
    assert {i: got[i] for i in want} == want

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["imgclust"])
    assert meta["n_clusters"] == 10 and meta["preprocess"]["size"] == 32 and meta["input"]["dtype"] == "uint8"
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "cluster"]

    # Refusals: one line, no traceback.
    for args, msg in [((str(run), str(run / "m.onnx")), "inside the run directory"),
                      ((str(run), str(onnx_path)), "exists; pass --overwrite"),
                      ((str(run), str(tmp_path / "m.bin")), "must be a .onnx file")]:
        r = _cli("export-model", *args, cache=reference / "cache")
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr
