"""``imgclust export``: folders, ImageFolder trees and tables; the source is never touched."""

import csv
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from imgclust.api import cluster
from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig
from imgclust.errors import InputError
from imgclust.export import export_run


def snapshot(root: Path) -> dict:
    """sha256, size, mtime_ns and inode of every file: what 'untouched' means."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns, st.st_ino)
    return out


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    root = tmp / "photos"
    d = load_digits()
    for cls in (0, 1, 7):
        (root / f"class {cls}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == cls)[:20]):
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16))
            img.save(root / f"class {cls}" / f"img_{j:02d}.{'png' if j % 2 else 'jpg'}")
    out = tmp / "run"
    cfg = RunConfig(k=3, source=SourceConfig(path=str(root)), backbone=BackboneConfig(name="pixels", image_size=16),
                    features=FeatureConfig(cache_dir=str(tmp / "cache")), report=False)
    cluster(cfg, out, progress=False)
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    return root, out, rows


@pytest.mark.parametrize("mode", ["symlink", "hardlink", "copy"])
def test_folders_export_never_touches_sources(folder_run, tmp_path, mode):
    root, run, rows = folder_run
    before = snapshot(root)
    dest = tmp_path / "by_cluster"
    s = export_run(run, "folders", dest, mode=mode, progress=False)
    assert s["n_images"] == len(rows) == 60 and s["linked" if mode != "copy" else "copied"] == 60
    assert sorted(p.name for p in dest.iterdir()) == ["cluster_00", "cluster_01", "cluster_02"]
    for r in rows:
        f = dest / f"cluster_{int(r['cluster']):02d}" / r["id"].replace("/", "__").replace(" ", "_")
        assert f.read_bytes() == Path(r["path"]).read_bytes()
        if mode == "symlink":
            assert f.is_symlink() and f.resolve() == Path(r["path"]).resolve()
        elif mode == "hardlink":
            assert f.stat().st_ino == Path(r["path"]).stat().st_ino
        else:
            assert not f.is_symlink() and f.stat().st_ino != Path(r["path"]).stat().st_ino
    after = snapshot(root)
    assert after == before  # same bytes, sizes, mtimes, inodes; no file added or removed


def test_imagefolder_export_for_labelling(folder_run, tmp_path):
    root, run, rows = folder_run
    before = snapshot(root)
    dest = tmp_path / "labelme"
    s = export_run(run, "imagefolder", dest, progress=False)
    assert s["mode"] == "copy" and s["copied"] == 60
    classes = (dest / "classes.txt").read_text().split()
    assert classes == ["cluster_00", "cluster_01", "cluster_02"]
    man = list(csv.DictReader(open(dest / "manifest.csv")))
    assert len(man) == 60 and {m["label"] for m in man} == {"class 0", "class 1", "class 7"}
    for m in man:
        assert (dest / m["file"]).is_file() and m["file"].startswith(f"cluster_{int(m['cluster']):02d}/")
    sizes = {c: len(list((dest / c).iterdir())) for c in classes}
    assert sizes == {f"cluster_{c:02d}": sum(int(r["cluster"]) == c for r in rows) for c in range(3)}
    assert snapshot(root) == before


def test_tables(folder_run, tmp_path):
    _, run, rows = folder_run
    export_run(run, "csv", tmp_path / "a.csv")
    assert list(csv.DictReader(open(tmp_path / "a.csv"))) == rows
    export_run(run, "json", tmp_path / "a.json")
    got = json.loads((tmp_path / "a.json").read_text())
    assert got["n_clusters"] == 3 and [r["id"] for r in got["assignments"]] == [r["id"] for r in rows]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(InputError, match="pip install pyarrow"):
            export_run(run, "parquet", tmp_path / "a.parquet")
    else:
        export_run(run, "parquet", tmp_path / "a.parquet")
        assert pq.read_table(tmp_path / "a.parquet").num_rows == 60


def test_refuses_unsafe_destinations(folder_run, tmp_path):
    root, run, _ = folder_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an empty folder"):
        export_run(run, "folders", tmp_path / "full")
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="inside the source folder"):
        export_run(run, "folders", root / "clusters")
    assert not (root / "clusters").exists()
    with pytest.raises(InputError, match="unknown export format"):
        export_run(run, "zip", tmp_path / "z")
    with pytest.raises(InputError, match="--mode applies"):
        export_run(run, "csv", tmp_path / "z.csv", mode="copy")
    with pytest.raises(InputError, match="not a complete run"):
        export_run(tmp_path, "csv", tmp_path / "z.csv")


def test_archive_members_are_extracted_byte_for_byte(tmp_path):
    d = load_digits()
    members = {}
    for cls in (3, 8):
        for j, i in enumerate(np.flatnonzero(d.target == cls)[:12]):
            p = tmp_path / "src" / f"c{cls}" / f"{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(p)
            members[f"c{cls}/{j}.png"] = p.read_bytes()
    tar = tmp_path / "imgs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "src", arcname=".")
    before = snapshot(tmp_path / "src") | {str(tar): (hashlib.sha256(tar.read_bytes()).hexdigest(), tar.stat().st_mtime_ns)}
    cfg = RunConfig(k=2, source=SourceConfig(path=str(tar)), backbone=BackboneConfig(name="pixels", image_size=16),
                    features=FeatureConfig(cache_dir=str(tmp_path / "cache")), report=False)
    cluster(cfg, tmp_path / "run", progress=False)
    s = export_run(tmp_path / "run", "folders", tmp_path / "out", progress=False)  # symlink asked, bytes written
    assert s["written"] == 24 and s["linked"] == 0
    got = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*.png")}
    assert got == {k.replace("/", "__"): v for k, v in members.items()}
    after = snapshot(tmp_path / "src") | {str(tar): (hashlib.sha256(tar.read_bytes()).hexdigest(), tar.stat().st_mtime_ns)}
    assert after == before


def test_cli_export_on_digits(tmp_path):
    env = dict(os.environ, IMGCLUST_CACHE=str(tmp_path / "cache"), IMGCLUST_QUIET="1", OMP_NUM_THREADS="1")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "imgclust.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)

    r = cli("cluster", "digits", "--k", 10, "--backbone", "pixels", "--image-size", 8, "--out", tmp_path / "run",
            "--no-report")
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "run", tmp_path / "tree", "--to", "imagefolder")
    assert r.returncode == 0, r.stderr
    assert "exported 1797 images in 10 clusters as imagefolder" in r.stdout
    pngs = list((tmp_path / "tree").rglob("*.png"))
    assert len(pngs) == 1797 and Image.open(pngs[0]).size == (8, 8)  # arrays written as PNG, original size
    r = cli("export", tmp_path / "run", tmp_path / "tree", "--to", "folders")
    assert r.returncode == 2 and "not an empty folder" in r.stderr
    r = cli("export", tmp_path / "run", tmp_path / "t.csv", "--to", "csv", "--mode", "sideways")
    assert r.returncode == 2 and "unknown export mode" in r.stderr
