"""report.html (imgclust.report), the run log (imgclust.runlog) and saved configs."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image
from sklearn.datasets import load_digits

from imgclust.api import cluster
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig, dump_toml, load_config
from imgclust.report import build_report
from imgclust.report.html import contingency, select_gallery, select_map_rows
from imgclust.runlog import RunLog, read_log


def external_refs(text: str) -> list[str]:
    """Everything a browser would fetch from outside the file."""
    refs = re.findall(r"""\b(?:src|href|action|poster)\s*=\s*["']([^"']+)["']""", text)
    refs += re.findall(r"""url\(\s*["']?([^"')]+)""", text)
    refs = [r for r in refs if not r.startswith(("data:", "#", "'+"))]
    refs += re.findall(r"@import|<link\b|<iframe\b|<object\b|<embed\b|https?://", text, flags=re.IGNORECASE)
    refs += re.findall(r"<script[^>]*\bsrc\b", text, flags=re.IGNORECASE)
    return refs


def run_cfg(path, k, tmp_path, **src):
    return RunConfig(k=k, source=SourceConfig(path=str(path), **src), backbone=BackboneConfig(name="pixels", image_size=8),
                     features=FeatureConfig(cache_dir=str(tmp_path / "cache")), report_map="pca")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    out = tmp / "run"
    summary = cluster(run_cfg("digits", 10, tmp), out, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """Digit images with file names that must be escaped in HTML."""
    root = tmp_path_factory.mktemp("odd") / "imgs"
    d = load_digits()
    for cls in (0, 1, 4):
        (root / f"c{cls}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == cls)[:15]):
            name = f'<b>"x{j}&y".png' if j == 0 else f"img_{j}.png"
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(root / f"c{cls}" / name)
    return root


def test_report_has_every_cluster_and_no_external_resources(digits_run):
    out, summary = digits_run
    rep = summary["report"]
    assert rep["path"] == str(out / "report.html") and rep["map_method"] == "pca" and "error" not in rep
    text = (out / "report.html").read_text(encoding="utf-8")
    for c in range(10):
        assert f'id="cluster-{c}"' in text and f'href="#cluster-{c}"' in text
    assert external_refs(text) == []
    assert text.count("data:image/") >= 10 * 16  # gallery thumbnails, inline
    assert "Clusters vs known labels" in text and "MAP_POINTS" in text
    assert "ACC " in text and "Config and timings" in text
    # the map holds every image of this small run, each with its cluster
    pts = json.loads(re.search(r"const MAP_POINTS=(\[.*?\]);const MAP_THUMBS", text).group(1))
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    assert len(pts) == len(rows) == 1797
    by_id = {r["id"]: int(r["cluster"]) for r in rows}
    assert all(by_id[p[4]] == p[2] for p in pts)


def test_report_purity_matches_assignments(digits_run):
    out, _ = digits_run
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    clusters = np.array([int(r["cluster"]) for r in rows])
    labels = [r["label"] for r in rows]
    ct = contingency(clusters, labels, 10)
    for c in range(10):
        members = [labels[i] for i in np.flatnonzero(clusters == c)]
        top = max(set(members), key=members.count)
        assert ct["purity"][c] == pytest.approx(members.count(top) / len(members))
    # Hungarian order: the diagonal of the reordered table is the matched count
    diag = sum(ct["counts"][c, ct["match"][c]] for c in ct["order"] if c in ct["match"])
    acc = json.loads((out / "metrics.json").read_text())["acc"]
    assert diag / len(rows) == pytest.approx(acc)


def test_report_command_rebuilds_from_the_run_dir(digits_run, tmp_path):
    out, _ = digits_run
    target = tmp_path / "r.html"
    env = dict(os.environ, IMGCLUST_QUIET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "report", str(out), "--out", str(target), "--map", "pca",
                        "--per-cluster", "6", "--map-points", "500"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    text = target.read_text(encoding="utf-8")
    assert all(f'id="cluster-{c}"' in text for c in range(10)) and external_refs(text) == []
    pts = json.loads(re.search(r"const MAP_POINTS=(\[.*?\]);const MAP_THUMBS", text).group(1))
    assert 500 <= len(pts) <= 500 + 10 * 10  # capped (stratified: at least 10 per cluster)
    assert text.count("data:image/") < (out / "report.html").read_text(encoding="utf-8").count("data:image/")
    bad = subprocess.run([sys.executable, "-m", "imgclust.cli", "report", str(out), "--map", "nope"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown map method" in bad.stderr


def test_report_escapes_names_and_survives_a_moved_source(odd_folder, tmp_path):
    out = tmp_path / "run"
    cluster(run_cfg(odd_folder, 3, tmp_path), out, progress=False)
    text = (out / "report.html").read_text(encoding="utf-8")
    assert '<b>"x0' not in text and "&lt;b&gt;&quot;x0&amp;y&quot;.png" in text
    assert all(f'id="cluster-{c}"' in text for c in range(3)) and external_refs(text) == []
    moved = odd_folder.parent / "moved"
    odd_folder.rename(moved)
    try:
        rep = build_report(out, map_method="pca")
    finally:
        moved.rename(odd_folder)
    text = Path(rep["path"]).read_text(encoding="utf-8")
    assert rep["n_thumbnails"] == 0 and any("source could not be opened" in n for n in rep["notes"])
    assert all(f'id="cluster-{c}"' in text for c in range(3)) and "MAP_POINTS" in text  # map from the feature cache


def test_selection_stays_bounded_at_100k_images():
    rng = np.random.default_rng(0)
    k, n = 100, 100_000
    clusters = rng.integers(0, k, n)
    clusters[clusters == 7] = 8  # one empty cluster
    clusters[:3] = 9
    conf = rng.random(n).astype(np.float32)
    g = select_gallery(clusters, conf, k, per_cluster=24, boundary=8, max_thumbs=2400)
    assert sum(len(a) + len(b) for a, b in g.values()) <= 2400 and g[7] == ([], [])
    top, low = g[3]
    assert all(conf[top[i]] >= conf[top[i + 1]] for i in range(len(top) - 1))  # most confident first
    assert conf[top[-1]] >= conf[low[-1]] and conf[low[0]] == conf[clusters == 3].min()  # then the boundary, least first
    sel = select_map_rows(clusters, k, 5000)
    assert len(sel) <= 5000 + 10 * k and set(np.unique(clusters[sel])) == set(np.unique(clusters))


def test_run_log_and_saved_config(digits_run, tmp_path):
    out, summary = digits_run
    events = read_log(out / "log.jsonl")
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    ends = {e["stage"]: e for e in events if e["event"] == "stage_end"}
    assert {"fit", "write", "report"} <= set(ends) and ends["fit"]["seconds"] >= 0
    assert all(events[i]["elapsed_s"] <= events[i + 1]["elapsed_s"] for i in range(len(events) - 1))
    # config.toml in the run dir reads back to the run's config
    cfg = load_config(out / "config.toml")
    assert cfg.to_dict() == summary["config"]
    # and re-running from it alone reproduces the assignments
    env = dict(os.environ, IMGCLUST_QUIET="1", OMP_NUM_THREADS="1", IMGCLUST_REPORT_MAP="pca")
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "cluster", "--config", str(out / "config.toml"),
                        "--out", str(tmp_path / "again"), "--no-report", "--save-config", str(tmp_path / "s.toml")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    a = (out / "assignments.csv").read_text()
    assert (tmp_path / "again" / "assignments.csv").read_text() == a
    saved = load_config(tmp_path / "s.toml")
    assert saved.report is False and saved.k == 10 and saved.source.path == "digits"


def test_run_log_records_a_failed_stage(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    with pytest.raises(ValueError), log.stage("features"):
        raise ValueError("disk on fire")
    log.close()
    ev = read_log(tmp_path / "log.jsonl")
    assert [e["event"] for e in ev] == ["stage_start", "stage_error"] and "disk on fire" in ev[1]["error"]
    log = RunLog(tmp_path / "log2.jsonl")
    log.history("method", {"loss": [3.0, 2.0], "pmi": [1.0, 0.5], "head_losses": [1, 2, 3], "steps": 9})
    log.close()
    ep = read_log(tmp_path / "log2.jsonl")
    assert ep == [dict(ep[0], epoch=1, loss=3.0, pmi=1.0), dict(ep[1], epoch=2, loss=2.0, pmi=0.5)]
    assert "head_losses" not in ep[0]


def test_dump_toml_round_trips_every_field():
    cfg = RunConfig(k="auto", k_range="3:9", method="temi", seed=4, report=False, report_map="umap",
                    source=SourceConfig(path='a "quoted"\\path', split="test", limit=50),
                    backbone=BackboneConfig(name="dinov2_vits14", image_size=96, options={"feature": "cls+mean"}),
                    features=FeatureConfig(pca=32, pca_whiten=True, precision="bf16"),
                    method_options={"heads": 5, "tau": 0.1, "names": ["a", "b"], "nested": {"x": 1}})
    text = dump_toml(cfg)
    assert RunConfig.from_dict(tomllib.loads(text)) == cfg
