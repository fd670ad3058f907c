"""The edit log (imgclust.refine.edits) and apply-edits (imgclust.review.apply) on a real digits run."""

import csv
import hashlib
import json
import threading

import numpy as np
import pytest

from imgclust.api import ImageClusterer, cluster
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig
from imgclust.data import open_source
from imgclust.errors import InputError
from imgclust.export import export_run
from imgclust.refine import edits as E
from imgclust.report.rundata import load_run
from imgclust.review.apply import apply_edits, run_features


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edits")
    cfg = RunConfig(k=6, source=SourceConfig(path="digits"), backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(tmp / "cache")), report=False)
    cluster(cfg, tmp / "run", progress=False)
    return tmp / "run"


@pytest.fixture()
def fresh(run, tmp_path):
    """A copy of the run directory (the edit log is per test)."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run, d)
    data = load_run(d)
    return d, data, {s: i for i, s in enumerate(data.ids)}


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_validation_refuses_and_writes_nothing(fresh):
    d, data, index = fresh
    E.append(d, {"op": "move", "ids": [data.ids[0]], "to": 1}, index, data.clusters)
    before = (d / E.EDITS_NAME).read_bytes()
    bad = [
        {"op": "explode"}, [1, 2], "move", {"op": "move", "ids": ["../../etc/passwd"], "to": 1},
        {"op": "move", "ids": [data.ids[1]], "to": 99}, {"op": "move", "ids": [data.ids[1]], "to": True},
        {"op": "move", "ids": [], "to": 1}, {"op": "move", "ids": [data.ids[1]], "to": 1, "extra": 1},
        {"op": "merge", "clusters": [2]}, {"op": "merge", "clusters": [2, 2]}, {"op": "merge", "clusters": [1, 2], "into": 3},
        {"op": "split", "cluster": 0, "k": 1}, {"op": "split", "cluster": 0, "k": 500},
        {"op": "rename", "cluster": 0, "name": ""}, {"op": "rename", "cluster": 0, "name": "x" * 500},
        {"op": "undo", "target": 5}, {"op": "undo", "target": "0"},
    ]
    for b in bad:
        with pytest.raises(InputError):
            E.append(d, b, index, data.clusters)
    E.append(d, {"op": "undo", "target": 0}, index, data.clusters)
    with pytest.raises(InputError, match="already undone"):
        E.append(d, {"op": "undo", "target": 0}, index, data.clusters)
    with pytest.raises(InputError, match="cannot be undone"):
        E.append(d, {"op": "undo", "target": 1}, index, data.clusters)
    lines = (d / E.EDITS_NAME).read_bytes()
    assert lines.startswith(before) and lines.count(b"\n") == 2


def test_replay_merge_move_undo_split_outlier(fresh):
    d, data, index = fresh
    base = data.clusters.copy()
    a, b = 0, 1
    mover = [data.ids[i] for i in np.flatnonzero(base == 2)[:3]]
    x = np.asarray(run_features(d)[2])
    for e in ({"op": "merge", "clusters": [a, b]}, {"op": "move", "ids": mover[:2], "to": 3},
              {"op": "move", "ids": mover[2:], "to": 4}, {"op": "undo", "target": 2},
              {"op": "split", "cluster": 5, "k": 2}, {"op": "outlier", "ids": [data.ids[7]]},
              {"op": "rename", "cluster": 3, "name": "threes"}):
        E.append(d, e, index, base, x, 6)
    rep = E.replay(base, E.read_log(d), index, x, 6)
    assert (data.clusters == base).all()  # the original labels are never changed
    assert rep.n_clusters == 7 and rep.names == {3: "threes"}
    assert (rep.labels[np.isin(base, [a, b])] == a).all()
    assert [rep.labels[index[i]] for i in mover] == [3, 3, 2]
    split = base == 5
    assert set(rep.labels[split]) == {5, 6} and (rep.labels == 6).sum() <= (rep.labels == 5).sum()
    assert rep.outlier.sum() == 1 and rep.moved.sum() == 2
    untouched = ~np.isin(base, [a, b, 5]) & ~np.isin(np.arange(len(base)), [index[i] for i in mover])
    assert (rep.labels[untouched] == base[untouched]).all()
    again = E.replay(base, E.read_log(d), index, x, 6)
    assert (again.labels == rep.labels).all()  # the split is seeded: replay is deterministic


def test_torn_last_line_is_ignored_then_cut(fresh):
    d, data, index = fresh
    E.append(d, {"op": "rename", "cluster": 0, "name": "a"}, index, data.clusters)
    with open(d / E.EDITS_NAME, "a") as f:
        f.write('{"seq": 1, "op": "ren')  # a crash mid-append
    assert len(E.read_log(d)) == 1
    E.append(d, {"op": "rename", "cluster": 1, "name": "b"}, index, data.clusters)
    assert [e["seq"] for e in E.read_log(d)] == [0, 1]


def test_concurrent_appends_all_recorded(fresh):
    d, data, index = fresh
    errors = []

    def worker(t):
        try:
            for j in range(15):
                E.append(d, {"op": "move", "ids": [data.ids[t * 100 + j]], "to": t}, index, data.clusters)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    log = E.read_log(d)
    assert [e["seq"] for e in log] == list(range(45))
    assert sorted(e["ids"][0] for e in log) == sorted(data.ids[t * 100 + j] for t in range(3) for j in range(15))


def test_apply_edits_new_run_and_predict(fresh, tmp_path):
    d, data, index = fresh
    orig_sha = sha(d / "assignments.csv")
    base = data.clusters
    movers = [int(i) for i in np.flatnonzero(base == 3)[:3]]
    E.append(d, {"op": "merge", "clusters": [0, 1]}, index, base)
    for r in movers:
        E.append(d, {"op": "move", "ids": [data.ids[r]], "to": 4}, index, base)
    E.append(d, {"op": "undo", "target": 3}, index, base)  # the third move
    E.append(d, {"op": "rename", "cluster": 4, "name": "fours"}, index, base)
    out = tmp_path / "run2"
    s = apply_edits(d, out, progress=False, report=True)
    assert sha(d / "assignments.csv") == orig_sha  # never overwritten
    new = load_run(out)
    want = base.copy()
    want[base == 1] = 0
    want[movers[:2]] = 4
    assert new.ids == data.ids and (new.clusters == want).all()
    assert s["cluster_names"] == {"4": "fours"} and s["edits"]["n_moved"] == 2
    with open(out / "changes.csv", newline="") as f:
        ch = list(csv.DictReader(f))
    assert len(ch) == int((base == 1).sum()) + 2
    assert {r["id"] for r in ch if r["edit"] == "move"} == {data.ids[r] for r in movers[:2]}
    assert "Edits applied" in (out / "report.html").read_text()
    est = ImageClusterer.load(out / "model", progress=False)
    pred = est.predict(open_source("digits"))
    assert [int(pred[r]) for r in movers[:2]] == [4, 4]
    assert pred[movers[2]] != 4 or base[movers[2]] == 4
    assert (pred == 1).sum() == 0  # the merged-away cluster is gone from predictions
    assert (pred == want).mean() > 0.9
    # the reviewed labels go through the existing export formats
    export_run(out, "csv", tmp_path / "reviewed.csv", progress=False)
    with open(tmp_path / "reviewed.csv", newline="") as f:
        exported = {r["id"]: int(r["cluster"]) for r in csv.DictReader(f)}
    assert exported[data.ids[movers[0]]] == 4
    with pytest.raises(InputError, match="not an empty directory"):
        apply_edits(d, out, progress=False)
    json.loads((out / "run.json").read_text())


def test_apply_without_edits_refuses(fresh, tmp_path):
    d, _, _ = fresh
    with pytest.raises(InputError, match="no edits"):
        apply_edits(d, tmp_path / "x", progress=False)


def test_cli_apply_edits(fresh, tmp_path):
    import os
    import subprocess
    import sys

    d, data, index = fresh
    env = dict(os.environ, IMGCLUST_QUIET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "imgclust.cli", "apply-edits", str(d), "--out", str(tmp_path / "r2"), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no edits" in r.stderr
    E.append(d, {"op": "move", "ids": [data.ids[5]], "to": (int(data.clusters[5]) + 1) % 6}, index, data.clusters)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 images changed cluster, 1 moved by hand" in r.stdout
