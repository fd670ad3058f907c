"""Interrupted runs: `imgclust cluster` killed (SIGTERM, SIGKILL) during feature extraction,
then rerun: it resumes from the cache and ends with the same bytes as an uninterrupted run.
Also: the same seed gives the same assignments.csv from a fresh extraction and a cache hit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_DIGITS = 1797
# Small batches and chunks so the first chunk is flushed early; 48 px keeps the whole
# extraction to a couple of seconds on 2 cores.
ARGS = ["cluster", "digits", "--k", "10", "--backbone", "efficientnet-lite0", "--image-size", "48",
        "--batch-size", "16", "--chunk-rows", "64", "--seed", "3", "--option", "n_init=3", "--quiet"]


def _env(cache: Path) -> dict:
    # One OpenMP thread: the same on every machine, and immune to the 10-30x slowdown that
    # OpenMP's spinning threads suffer when other processes share the CPU cores.
    return dict(os.environ, IMGCLUST_CACHE=str(cache), IMGCLUST_QUIET="1", OMP_NUM_THREADS="1")


def _run(out: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *ARGS, "--out", str(out)], capture_output=True,
                          text=True, env=_env(cache), timeout=600)


def _entry(cache: Path) -> Path:
    entries = [p for p in (cache / "features").iterdir() if p.is_dir()]
    assert len(entries) == 1, entries
    return entries[0]


def _tmp_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.is_dir() for p in d.glob(".*.tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its assignments are what every interrupted run must end with."""
    base = tmp_path_factory.mktemp("reference")
    r = _run(base / "run", base / "cache")
    assert r.returncode == 0, r.stderr
    return base


def _wait_for_flushed_rows(cache: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Poll progress.json until the extraction has flushed its first chunk."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.communicate()}")
        for p in (cache / "features").glob("*/progress.json"):
            try:
                done = json.loads(p.read_text())["done"]
            except (OSError, ValueError, KeyError):
                continue  # replaced while being read: try again
            if done > 0:
                return done
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no chunk was flushed in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_during_extraction_resumes_to_the_same_result(reference, tmp_path, sig):
    cache, out = tmp_path / "cache", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "imgclust.cli", *ARGS, "--out", str(out)], env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    flushed = _wait_for_flushed_rows(cache, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:  # graceful: finished batches kept, one line, no traceback
        assert proc.returncode == 143, stderr
        assert "Traceback" not in stderr
        assert [ln for ln in stderr.splitlines() if ln.strip()] == [
            "terminated; run the same command again to resume from the feature cache"]
    else:
        assert proc.returncode == -signal.SIGKILL
    entry = _entry(cache)
    progress = json.loads((entry / "progress.json").read_text())
    assert flushed <= progress["done"] < N_DIGITS
    assert not (entry / "meta.json").exists()  # partial: never taken for a finished entry
    assert not (out / "assignments.csv").exists() and not (out / "run.json").exists()  # nothing half-written

    # What a crash between creating and renaming a temporary file leaves behind.
    out.mkdir(parents=True, exist_ok=True)
    (out / ".assignments.csv.k1ll3d00.tmp").write_text("id,path,clu")
    (entry / ".progress.json.k1ll3d00.tmp").write_text('{"do')

    r = _run(out, cache)
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    feats = run["features"]
    assert feats["cache_status"] == "resumed" and feats["resumed_from"] == progress["done"]
    assert feats["rows_computed"] == N_DIGITS - progress["done"]  # only the missing rows
    ref = json.loads((reference / "run" / "run.json").read_text())
    assert feats["sha256"] == ref["features"]["sha256"]  # bit-identical features
    assert (out / "assignments.csv").read_bytes() == (reference / "run" / "assignments.csv").read_bytes()
    assert _tmp_files(out, out / "model", entry) == []


def test_same_seed_same_bytes_from_a_cache_hit_and_run_json_records_provenance(reference, tmp_path):
    out = tmp_path / "again"
    r = _run(out, reference / "cache")  # same cache: a hit
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["features"]["from_cache"] and run["features"]["cache_status"] == "hit"
    assert run["features"]["rows_computed"] == 0
    assert (out / "assignments.csv").read_bytes() == (reference / "run" / "assignments.csv").read_bytes()
    ref = json.loads((reference / "run" / "run.json").read_text())
    # what it takes to reproduce the run
    assert ref["seed"] == 3 and ref["config"]["seed"] == 3
    assert ref["data_fingerprint"] == ref["source"]["fingerprint"] == run["data_fingerprint"]
    assert len(ref["data_fingerprint"]) == 64
    assert {"python", "torch", "numpy", "scipy", "scikit-learn", "faiss", "pillow"} <= set(ref["versions"])
    assert ref["imgclust_version"] and ref["threads"]["torch"] >= 1
    assert ref["backbone"]["name"] == "efficientnet-lite0" and ref["backbone"].get("weights")
    assert len(ref["features"]["sha256"]) == 64 and ref["features"]["key"]
