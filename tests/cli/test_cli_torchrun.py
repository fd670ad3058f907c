"""`imgclust cluster` under torchrun, as README's "More than one machine" section runs it: two gloo ranks
on this machine (torchrun --standalone binds localhost), real image files, no --out."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score

SRC = Path(__file__).resolve().parents[2] / "src"


def _folder(root: Path) -> Path:
    d = load_digits()
    for cls in (0, 1, 7):
        (root / f"class {cls}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == cls)[:60]):
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
            img.save(root / f"class {cls}" / f"{j:02d}.png")
    return root


def _run(launcher: list[str], photos: Path, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGCLUST_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [*launcher, "-m", "imgclust.cli", "cluster", str(photos), "--k", "3", "--backbone", "pixels",
           "--image-size", "16", "--method", "temi", "--quiet"]
    cwd.mkdir()
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _labels(run: Path) -> dict[str, int]:
    return {row["id"]: int(row["cluster"]) for row in csv.DictReader(open(run / "assignments.csv"))}


def test_two_ranks_write_one_run_say_it_once_and_exit_cleanly(tmp_path):
    photos = _folder(tmp_path / "photos")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
               photos, tmp_path / "two", tmp_path / "cache2")
    log = two.stdout + two.stderr
    assert two.returncode == 0, log[-3000:]
    assert "terminate called" not in log and "FutureWarning" not in log
    # rank 0 alone reports, and only the run it wrote (rank 1's scratch folder is never named)
    assert two.stdout.count("outputs: ") == 1 and "imgclust-rank1" not in log
    runs = [p for p in (tmp_path / "two" / "runs").iterdir() if not p.is_symlink()]
    assert len(runs) == 1 and (runs[0] / "run.json").is_file()
    assert (tmp_path / "two" / "runs" / "latest").resolve() == runs[0].resolve()

    one = _run([sys.executable], photos, tmp_path / "one", tmp_path / "cache1")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _labels(runs[0]), _labels((tmp_path / "one" / "runs" / "latest").resolve())
    assert len(a) == 180 and a.keys() == b.keys()
    # the same global batch on 1 or 2 ranks: the same clustering up to float summation order
    assert adjusted_rand_score([a[i] for i in a], [b[i] for i in a]) > 0.95
