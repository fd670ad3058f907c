"""Issue 24, the first hour as a user: threads, progress events and totals, NaN fallback,
portable configs, file modes under the umask, single-file predict, the split notice."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclust.errors import InputError

CLI = [sys.executable, "-m", "imgclust.cli"]


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, IMGCLUST_QUIET="1", OMP_NUM_THREADS="1", IMGCLUST_REPORT_MAP="pca",
               PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _images(root: Path, layout: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub, n in layout.items():
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = 40 if "a" in sub.rsplit("/", 1)[-1] else 200
            img = np.clip(base + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")


# ------------------------------------------------------------------ 1. threads
def test_apply_threads_limits_torch_faiss_and_blas():
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    from imgclust.threads import apply_threads, current_threads

    try:
        info = apply_threads(2)
        assert info["limit"] == 2 and info["why"] == "requested"
        assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
        assert all(p["num_threads"] == 2 for p in threadpool_info())  # OpenBLAS and every OpenMP runtime
        apply_threads("1")
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
        assert current_threads()["limit"] == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        apply_threads(1)
    for bad in (0.5, -1, "many", True):
        with pytest.raises(InputError, match="threads must be a positive integer or 'auto'"):
            apply_threads(bad)


def test_default_threads_counts_cpus_quota_and_load(tmp_path, monkeypatch):
    import imgclust.threads as th

    monkeypatch.setitem(th._USER_ENV, "OMP_NUM_THREADS", "")
    monkeypatch.delenv("IMGCLUST_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cpus", lambda: 8)
    assert th.default_threads(load=0.0)[0] == 8
    assert th.default_threads(load=2.6)[0] == 6  # 8 - 2 busy cores (the fraction is a lagging trace)
    assert th.default_threads(load=0.8)[0] == 8
    assert th.default_threads(load=5.0)[0] == 3
    assert th.default_threads(load=11.0)[0] == 1  # oversubscribed machine: one thread
    monkeypatch.setenv("IMGCLUST_THREADS", "3")
    assert th.default_threads(load=0.0) == (3, "$IMGCLUST_THREADS")
    monkeypatch.delenv("IMGCLUST_THREADS")
    monkeypatch.setitem(th._USER_ENV, "OMP_NUM_THREADS", "2")
    assert th.default_threads(load=0.0) == (2, "$OMP_NUM_THREADS")
    # cgroup quotas: v2 cpu.max, v1 cfs quota/period, unlimited
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert th.cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert th.cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert th.cpu_quota(v1) == 3.0


def test_threads_option_on_the_cli_and_in_config(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(CLI + ["cluster", "digits", "--k", "10", "--backbone", "pixels", "--image-size", "8",
                              "--threads", "1", "--out", str(out), "--no-report", "--cache-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, env=_env(OMP_NUM_THREADS="2"), timeout=300)
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    # --threads wins over OMP_NUM_THREADS=2 in the environment
    assert run["threads"]["limit"] == 1 and run["threads"]["why"] == "requested"
    assert run["threads"]["torch"] == 1 and run["threads"]["faiss"] == 1
    assert 'threads = 1' in (out / "config.toml").read_text()
    # re-run from the config: the same limit; without it the environment's
    r = subprocess.run(CLI + ["cluster", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again"),
                              "--no-report"], capture_output=True, text=True, env=_env(OMP_NUM_THREADS="2"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "again" / "run.json").read_text())["threads"]["why"] == "requested"
    from imgclust.api import ImageClusterer

    assert ImageClusterer.load(out / "model").threads is None  # a saved model does not pin the thread count
    assert ImageClusterer.load(out / "model", threads=1).threads == 1
    r = subprocess.run(CLI + ["predict", str(out), "digits", "--threads", "1", "--out", str(tmp_path / "p.csv")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0 and "predicted 1797 of 1797" in r.stdout, r.stderr
    r = subprocess.run(CLI + ["cluster", "digits", "--k", "3", "--threads", "lots", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: threads must be a positive integer or 'auto', got 'lots'"


# ------------------------------------------------------------------ 2. progress events and totals
def test_every_long_stage_logs_progress_and_totals_include_the_report(tmp_path):
    from imgclust.api import cluster
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig
    from imgclust.runlog import read_log

    cfg = RunConfig(k=10, source=SourceConfig(path="digits"), backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(tmp_path / "cache")), report_map="pca")
    out = tmp_path / "run"
    summary = cluster(cfg, out, progress=False)  # quiet terminal: the record still gets the events
    ev = read_log(out / "log.jsonl")
    prog = [e for e in ev if e["event"] == "progress"]
    stages = {e["stage"] for e in prog}
    assert {"features pixels", "k-means restarts", "report"} <= stages
    km = [e for e in prog if e["stage"] == "k-means restarts"]
    assert km[-1]["n"] == km[-1]["total"] == 10
    feat = [e for e in prog if e["stage"] == "features pixels"]
    assert feat[-1]["n"] == feat[-1]["total"] == 1797
    assert any("map of" in str(e.get("step")) for e in prog if e["stage"] == "report")
    # each timed stage (other than the quick write) had progress events inside it
    opened: dict[str, float] = {}
    for e in ev:
        if e["event"] == "stage_start":
            opened[e["stage"]] = e["elapsed_s"]
        elif e["event"] == "stage_end" and e["stage"] in ("fit", "report"):
            inside = [p for p in prog if opened[e["stage"]] <= p["elapsed_s"] <= e["elapsed_s"]]
            assert inside, e["stage"]
    assert all(ev[i]["elapsed_s"] <= ev[i + 1]["elapsed_s"] for i in range(len(ev) - 1))
    # the total covers every step, the report included, in the summary, run.json and the report
    t = summary["timings_s"]
    assert t["report"] > 0
    parts = t["open_source"] + t["features"] + t["method"] + t["write"] + t["report"]
    assert t["total"] >= parts - 0.01
    run_end = [e for e in ev if e["event"] == "run_end"][0]
    assert abs(run_end["seconds"] - t["total"]) < 0.5
    assert json.loads((out / "run.json").read_text())["timings_s"]["total"] == t["total"]
    html = (out / "report.html").read_text()
    assert "<td>report</td>" in html


# ------------------------------------------------------------------ 3. NaN -> fallback
def test_spice_semi_nan_falls_back_to_spice_self_and_is_recorded(tmp_path):
    from imgclust.api import cluster
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig

    # semi_lr=1e4 makes FixMatch's loss NaN within a few steps (a real divergence, nothing mocked)
    opts = {"epochs": 4, "heads": 4, "hidden": 64, "views": "none", "pool_size": 600, "semi_steps": 400,
            "reliable_neighbors": 20, "reliable_threshold": 0.9, "semi_lr": 1e4}
    cfg = RunConfig(k=10, method="spice", method_options=opts, source=SourceConfig(path="digits"),
                    backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(tmp_path / "cache")), report_map="pca")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        summary = cluster(cfg, tmp_path / "run", progress=False)
    fb = summary["fallbacks"]
    assert len(fb) == 1 and fb[0]["kept"] == "spice-self" and fb[0]["option"] == "semi_lr"
    assert fb[0]["step"] < 50  # stopped at once, not after all 400 steps
    assert "lower semi_lr (now 10000.0)" in fb[0]["message"]
    assert any("SPICE-Semi stopped" in str(x.message) and "semi_lr" in str(x.message) for x in w)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["fallbacks"] == fb and run["method_history"]["semi"].startswith("failed")
    # the run kept SPICE-Self's labels and finished: metrics, model and a warning in the report
    assert run["metrics"]["acc"] > 0.5
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Warning: spice-semi fixmatch: the loss became non-finite" in html and "spice-self result" in html
    from imgclust.api import ImageClusterer

    est = ImageClusterer.load(tmp_path / "run" / "model")
    assert est.model_.semi_ is None
    labels = np.array([int(r.split(",")[2]) for r in (tmp_path / "run" / "assignments.csv").read_text().split()[1:]])
    assert np.array_equal(est.predict("digits"), labels)


def test_check_finite_names_the_option():
    import torch

    from imgclust.nonfinite import NonFiniteLoss, check_finite

    assert check_finite(torch.tensor(1.5), stage="s", step=1, option="lr", option_value=0.1) == 1.5
    with pytest.raises(NonFiniteLoss, match=r"s: the loss became non-finite \(inf\) at step 7; lower lr \(now 0.1\)"):
        check_finite(torch.tensor(float("inf")), stage="s", step=7, option="lr", option_value=0.1)


# ------------------------------------------------------------------ 4. portable configs
def test_config_reruns_from_another_directory(tmp_path):
    data = tmp_path / "project" / "photos"
    _images(data, {"a": 6, "b": 6})
    env = _env(IMGCLUST_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(CLI + ["cluster", "photos", "--k", "2", "--backbone", "pixels", "--image-size", "8",
                              "--out", "run", "--no-report"], cwd=tmp_path / "project",
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "project" / "run"
    from imgclust.config import load_config

    cfg = load_config(run_dir / "config.toml")
    assert cfg.source.path == str(data.resolve()) and len(cfg.source.fingerprint) == 64
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run(CLI + ["cluster", "--config", str(run_dir / "config.toml"), "--out", "again", "--no-report"],
                       cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "again" / "assignments.csv").read_text() == (run_dir / "assignments.csv").read_text()
    assert "warning" not in r.stderr
    # a hand-written config with a relative path: resolved against the config file's folder
    (tmp_path / "project" / "mine.toml").write_text('k = 2\n[source]\npath = "photos"\n[backbone]\nname = "pixels"\n'
                                                    'image_size = 8\n')
    r = subprocess.run(CLI + ["cluster", "--config", str(tmp_path / "project" / "mine.toml"), "--out", "third",
                              "--no-report"], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    # changed images: the recorded fingerprint no longer matches -> a warning, the run still goes on
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "a" / "new.png")
    r = subprocess.run(CLI + ["cluster", "--config", str(run_dir / "config.toml"), "--out", "fourth", "--no-report"],
                       cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: the images at" in r.stderr and "changed since the config was written" in r.stderr


# ------------------------------------------------------------------ 5. file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from imgclust.rundir import write_csv, write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_csv(tmp_path / "b.csv", ["h"], [[1]])
    finally:
        os.umask(old)
    for name in ("a.json", "b.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_run_outputs_are_readable_by_others_under_umask_022(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", *CLI, "cluster", "digits", "--k", "10",
                        "--backbone", "pixels", "--image-size", "8", "--out", str(out),
                        "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("assignments.csv", "report.html", "run.json", "config.toml", "metrics.json", "model/model.json",
                 "model/model.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# ------------------------------------------------------------------ 6. small surprises
def test_predict_a_single_image_file(tmp_path):
    _images(tmp_path / "photos", {"a": 6, "b": 6})
    env = _env(IMGCLUST_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(CLI + ["cluster", str(tmp_path / "photos"), "--k", "2", "--backbone", "pixels",
                              "--image-size", "8", "--out", str(tmp_path / "run"), "--no-report"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    one = tmp_path / "photos" / "b" / "3.png"
    r = subprocess.run(CLI + ["predict", str(tmp_path / "run"), str(one), "--out", str(tmp_path / "p.csv")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "predicted 1 of 1 images" in r.stdout
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(f"3.png,{one},")
    want = [x.split(",") for x in (tmp_path / "run" / "assignments.csv").read_text().splitlines()[1:]]
    assert rows[1].split(",")[2] == next(w[2] for w in want if w[1] == str(one))


def test_a_tree_with_train_and_test_without_split_is_noticed(tmp_path):
    from imgclust.api import cluster
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig

    _images(tmp_path / "ds", {"train/a": 4, "train/b": 4, "test/a": 3, "test/b": 3})
    base = dict(k=2, backbone=BackboneConfig(name="pixels", image_size=8), report=False,
                features=FeatureConfig(cache_dir=str(tmp_path / "cache")))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = cluster(RunConfig(source=SourceConfig(path=str(tmp_path / "ds")), **base), tmp_path / "r1", progress=False)
    assert s["notes"] == ["ds holds several splits (test/ 6, train/ 8 images); clustering all of them together. "
                          "Give --split test or --split train to use one"]
    assert any("holds several splits" in str(x.message) for x in w)
    s = cluster(RunConfig(source=SourceConfig(path=str(tmp_path / "ds"), split="test"), **base), tmp_path / "r2",
                progress=False)
    assert s["notes"] == [] and s["n_images"] == 6


def test_one_map_text_for_both_commands():
    from typer.testing import CliRunner

    from imgclust.cli import MAP_HELP, app

    runner = CliRunner()
    for cmd in ("cluster", "report"):
        res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "400"})
        assert " ".join(MAP_HELP.split()) in " ".join(res.output.replace("│", " ").split()), cmd
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "below 2,000 points, else UMAP if umap-learn is installed, else t-SNE up to 5,000 points" in " ".join(
        readme.split())


def test_small_images_with_a_large_default_input_size_are_noticed():
    from imgclust.data import open_source
    from imgclust.data.notices import small_images_note

    digits = open_source("digits")  # 8x8
    note = small_images_note(digits, "efficientnet-lite0", 224, image_size_given=False)
    assert note is not None and "8x8 px" in note and "--image-size 96" in note and "784x the pixels" in note
    assert small_images_note(digits, "efficientnet-lite0", 224, image_size_given=True) is None  # the user chose
    assert small_images_note(digits, "pixels", 224, image_size_given=False) is None
    assert small_images_note(digits, "efficientnet-lite0", 24, image_size_given=False) is None  # not 4x smaller
