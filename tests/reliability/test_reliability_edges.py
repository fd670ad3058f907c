"""Class 5 of issue 22: names and values at the edges, and warnings that flooded stderr."""

from __future__ import annotations

import csv
import json

import numpy as np
from conftest import one_line_error


def test_export_of_names_over_255_bytes_is_shortened_stably_and_resumable(cli, tmp_path, monkeypatch):
    from PIL import Image

    src = tmp_path / "src"
    cls = "c" * 120  # class folder + file name flatten to 120 + 2 + 250 bytes
    (src / cls).mkdir(parents=True)
    (src / "short").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(src / cls / (f"{i}" + "é" * 120 + "x.png"))  # 250 bytes
        Image.new("RGB", (8, 8), (0, 80 * i, 0)).save(src / "short" / f"{i}.png")
    rc, _, err = cli("cluster", src, "--k", 2, "--backbone", "pixels", "--image-size", 8, "--no-report", "-q",
                     "--out", tmp_path / "run")
    assert rc == 0, err
    # Killed half-way through (the 4th image): nothing is left and the re-run works.
    calls = {"n": 0}

    def dying_copy(a, b, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return shutil_copy(a, b, *args, **kw)

    import shutil

    shutil_copy = shutil.copyfile
    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    rc, _, err = cli("export", tmp_path / "run", tmp_path / "out", "--to", "imagefolder", "-q")
    assert rc == 130 and not (tmp_path / "out").exists()
    monkeypatch.setattr(shutil, "copyfile", shutil_copy)
    names = []
    for attempt in ("a", "b"):
        rc, _, err = cli("export", tmp_path / "run", tmp_path / attempt, "--to", "imagefolder", "-q")
        assert rc == 0, err
        names.append(sorted(p.name for p in (tmp_path / attempt).rglob("*.png")))
    assert names[0] == names[1] and len(names[0]) == 6  # stable names
    assert max(len(n.encode()) for n in names[0]) <= 255
    long = [n for n in names[0] if n.startswith("c" * 50)]
    assert len(long) == 3 and len(set(long)) == 3  # the hash suffix keeps them distinct
    with open(tmp_path / "a" / "manifest.csv", encoding="utf-8") as f:
        ids = {r["id"] for r in csv.DictReader(f)}
    assert any(len(i.encode()) > 255 for i in ids)  # the manifest keeps the full original id


def test_one_inf_pixel_skips_that_image_and_keeps_the_others_visible(cli, tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.random((40, 8, 8, 3)).astype(np.float32)
    imgs[7, 2, 3, 1] = np.inf
    imgs[9, 0, 0, 0] = np.nan
    np.savez(tmp_path / "x.npz", images=imgs)
    from imgclust.data import open_source

    src = open_source(str(tmp_path / "x.npz"))
    assert src.images[0].max() > 200 and src.images[0].min() < 50  # not black: the scale ignores inf
    rc, out, err = cli("cluster", tmp_path / "x.npz", "--k", 2, "--backbone", "pixels", "--image-size", 8,
                       "--no-report", "-q", "--out", tmp_path / "run")
    assert rc == 0, err
    assert "skipped 2 unreadable image(s)" in out
    with open(tmp_path / "run" / "skipped.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["reason"]) for r in rows] == [("7", "non-finite pixel values (NaN or inf)"),
                                                      ("9", "non-finite pixel values (NaN or inf)")]


def test_all_non_finite_pixels_is_one_line(cli, tmp_path):
    np.savez(tmp_path / "x.npz", images=np.full((5, 8, 8), np.inf, np.float32))
    rc, _, err = cli("cluster", tmp_path / "x.npz", "--k", 2, "--backbone", "pixels", "-q", "--out", tmp_path / "r")
    assert rc == 2 and "NaN or inf" in one_line_error(err)


def test_library_warnings_are_logged_and_summarised_once(cli, tmp_path):
    from PIL import Image

    src = tmp_path / "same"
    src.mkdir()
    for i in range(30):  # identical images: --k auto's scoring k-means warns for every candidate K
        Image.new("RGB", (8, 8), (90, 90, 90)).save(src / f"{i}.png")
    rc, _, err = cli("cluster", src, "--k", "auto", "--k-range", "2:6", "--backbone", "pixels", "--image-size", 8, "--no-report", "-q",
                     "--out", tmp_path / "run")
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if "warning(s) from libraries" in ln]
    assert len(notes) == 1 and err.count("\n") <= 2, err
    events = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    warned = [e for e in events if e["event"] == "warning"]
    assert warned and all(e["category"] and e["message"] for e in warned)
    assert str(tmp_path / "run" / "log.jsonl") in notes[0]
