"""The command line, run as a user runs it: a subprocess on real image files."""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits


def run(*args, cache, cwd=None):
    env = dict(os.environ, IMGCLUST_CACHE=str(cache), IMGCLUST_QUIET="1")
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Digits 0, 1 and 7 saved as files in class folders, in several formats, plus 3 broken files."""
    root = tmp_path_factory.mktemp("photos")
    d = load_digits()
    fmt = ["png", "jpg", "bmp", "webp", "tif"]
    n = 0
    for cls in (0, 1, 7):
        (root / f"class {cls}").mkdir()
        for j, i in enumerate(np.flatnonzero(d.target == cls)[:40]):
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
            ext = fmt[j % len(fmt)]
            img.convert("RGB" if ext == "jpg" else "L").save(root / f"class {cls}" / f"img_{j:02d}.{ext}")
            n += 1
    (root / "class 0" / "empty.png").write_bytes(b"")
    (root / "class 1" / "notes.jpg").write_text("not an image")
    good = (root / "class 7" / "img_00.png").read_bytes()
    (root / "class 7" / "cut.png").write_bytes(good[: len(good) // 2])
    return root, n


def digest_tree(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cluster_folder_writes_outputs_and_skips_broken_files(photo_folder, tmp_path):
    root, n = photo_folder
    before = digest_tree(root)
    out = tmp_path / "run"
    r = run("cluster", root, "--k", 3, "--backbone", "pixels", "--image-size", 16, "--out", out, cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert "ACC" in r.stdout and "skipped 3 unreadable" in r.stdout
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    assert len(rows) == n and {row["label"] for row in rows} == {"class 0", "class 1", "class 7"}
    assert all(0 <= int(row["cluster"]) < 3 and Path(row["path"]).is_file() for row in rows)
    skipped = {row["id"]: row["reason"] for row in csv.DictReader(open(out / "skipped.csv"))}
    assert set(skipped) == {"class 0/empty.png", "class 1/notes.jpg", "class 7/cut.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["acc"] > 0.9 and metrics["n_evaluated"] == n
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["config"]["k"] == 3 and run_json["source"]["fingerprint"]
    assert {"torch", "numpy", "faiss"} <= set(run_json["versions"]) and run_json["peak_rss_mb"] > 0
    assert run_json["n_skipped"] == 3 and sum(run_json["cluster_sizes"]) == n
    assert digest_tree(root) == before  # input images never modified

    # the fitted model classifies the same images the same way
    pred = tmp_path / "pred.csv"
    r = run("predict", out, root, "--out", pred, cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    got = {row["id"]: int(row["cluster"]) for row in csv.DictReader(open(pred))}
    assert all(got[row["id"]] == int(row["cluster"]) for row in rows)
    assert all(got[i] == -1 for i in skipped)


@pytest.mark.parametrize(
    "args, message",
    [
        (["cluster", "{tmp}/missing", "--k", "3"], "not found"),
        (["cluster", "{tmp}/empty", "--k", "3"], "no images found"),
        (["cluster", "{tmp}/file.txt", "--k", "3"], "file of another type"),
        (["cluster", "digits", "--k", "1"], "K must be at least 2"),
        (["cluster", "digits", "--k", "5000", "--backbone", "pixels"], "larger than the number of images"),
        (["cluster", "digits", "--k", "3", "--backbone", "nope"], "unknown backbone 'nope'"),
        (["cluster", "digits", "--k", "3", "--method", "nope", "--backbone", "pixels"], "unknown method 'nope'"),
        (["cluster", "digits", "--k", "3", "--backbone", "dinov2_vits14", "--weights", "{tmp}/none.pth"], "weights file not found"),
        (["predict", "{tmp}", "digits"], "not an imgclust model directory"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    work = tmp_path / "cwd"
    work.mkdir()
    r = run(*[a.replace("{tmp}", str(tmp_path)) for a in args], cache=tmp_path / "c", cwd=work)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not any((work / "runs").glob("2*")), "a failed run left a runs/<timestamp> folder behind"


def test_config_file_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('k = 4\nseed = 3\n[backbone]\nname = "pixels"\nimage_size = 8\n[method_options]\nn_init = 2\n')
    out = tmp_path / "run"
    r = run("cluster", "digits", "--config", cfg, "--k", 5, "--out", out, cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    conf = json.loads((out / "run.json").read_text())["config"]
    assert conf["k"] == 5 and conf["seed"] == 3 and conf["backbone"]["name"] == "pixels"
    assert conf["method_options"] == {"n_init": 2}
    cfg.write_text("k = 4\nbogus = 1\n")
    r = run("cluster", "digits", "--config", cfg, cache=tmp_path / "c")
    assert r.returncode == 2 and "unknown config key(s) ['bogus']" in r.stderr


def test_listing_commands(tmp_path):
    r = run("backbones", cache=tmp_path)
    assert r.returncode == 0 and "efficientnet-lite0" in r.stdout and "dinov2_vits14" in r.stdout and "[offline]" in r.stdout
    r = run("methods", cache=tmp_path)
    assert r.returncode == 0 and "kmeans" in r.stdout and "n_init=10" in r.stdout
    r = run("datasets", cache=tmp_path)
    assert r.returncode == 0 and "digits" in r.stdout and "cifar10" in r.stdout


def test_demo_runs_offline_and_scores(tmp_path):
    r = run("demo", "--out", tmp_path / "demo", cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    acc = float(r.stdout.split("ACC ")[1].split()[0])
    assert acc > 0.8
    assert (tmp_path / "demo" / "model" / "model.pt").is_file()


def test_cluster_shared_cifar10_archive(shared_dir, tmp_path):
    out = tmp_path / "cifar"
    r = run("cluster", shared_dir / "data" / "cifar10-jpg.tar.gz", "--split", "test", "--limit", 400, "--k", 10,
            "--backbone", "efficientnet-lite0", "--image-size", 96, "--out", out, cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_evaluated"] == 400 and metrics["n_classes"] == 10
    assert metrics["acc"] > 0.3  # ImageNet features: far above the 0.1 of chance
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    assert rows[0]["id"].count("/") == 1 and rows[0]["label"] in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
