"""Class 4 of issue 22: outputs never clobber the user's files.

Non-empty folders that are not runs are refused (their files untouched, even names that
look like our temp files); a finished run is replaced only with ``--overwrite``; the default
``--out`` is a fresh ``runs/<timestamp>`` (``runs/latest`` links to it); ``log.jsonl`` is
appended; ``export`` never writes inside the run directory or over an existing file.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import one_line_error

SMALL = ["--limit", 200, "--backbone", "pixels", "--image-size", 8, "--k", 3, "--option", "n_init=1", "--no-report", "-q"]


def _snapshot(d):
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_non_empty_foreign_out_is_refused_and_left_untouched(cli, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / ".notes.abcd1234.tmp").write_text("looks like our temp file")  # was deleted before
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli("cluster", "digits", *SMALL, "--out", out, *extra)
        assert rc == 2 and "not an imgclust run directory" in one_line_error(err)
        assert _snapshot(out) == before


def test_finished_run_needs_overwrite_and_the_log_is_appended(cli, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli("cluster", "digits", *SMALL, "--out", out)
    assert rc == 0, err
    first = _snapshot(out)
    log1 = (out / "log.jsonl").read_text().splitlines()
    rc, _, err = cli("cluster", "digits", *SMALL, "--seed", 1, "--out", out)
    assert rc == 2 and "--overwrite" in one_line_error(err)
    assert _snapshot(out) == first  # not a byte changed
    # A failed re-run with --overwrite (K larger than the images) keeps the earlier record.
    rc, _, err = cli("cluster", "digits", *[a for a in SMALL if a != 3 and a != "--k"], "--k", 500, "--out", out,
                     "--overwrite")
    assert rc == 2 and "larger than the number of images" in one_line_error(err)
    log2 = (out / "log.jsonl").read_text().splitlines()
    assert log2[: len(log1)] == log1 and len(log2) > len(log1)
    rc, _, err = cli("cluster", "digits", *SMALL, "--seed", 1, "--out", out, "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert (out / "log.jsonl").read_text().splitlines()[: len(log2)] == log2


def test_default_out_is_a_fresh_directory_and_runs_latest_follows(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("cluster", "digits", *SMALL)
    assert rc == 0, err
    rc, _, err = cli("cluster", "digits", *SMALL, "--seed", 1)
    assert rc == 0, err
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(runs) == 2 and all((p / "run.json").exists() for p in runs)
    assert [json.loads((p / "run.json").read_text())["seed"] for p in runs] == [0, 1]  # the first is intact
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[1].resolve()


def test_out_inside_the_source_folder_is_refused(cli, tmp_path):
    from PIL import Image

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(src / f"{i}.png")
    before = _snapshot(src)
    rc, _, err = cli("cluster", src, "--k", 2, "--backbone", "pixels", "--out", src / "run", "-q")
    assert rc == 2 and "inside the source folder" in one_line_error(err)
    assert _snapshot(src) == before


@pytest.fixture
def run_dir(cli, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli("cluster", "digits", *SMALL, "--out", out)
    assert rc == 0, err
    return out


@pytest.mark.parametrize("to, name", [("json", "assignments.csv"), ("csv", "assignments.csv"),
                                      ("csv", "new.csv"), ("folders", "clusters")])
def test_export_never_writes_inside_the_run_directory(cli, run_dir, tmp_path, to, name):
    before = _snapshot(run_dir)
    rc, _, err = cli("export", run_dir, run_dir / name, "--to", to, "-q")
    assert rc == 2 and "inside the run directory" in one_line_error(err)
    assert _snapshot(run_dir) == before
    rc, _, err = cli("export", run_dir, tmp_path / "ok.csv", "--to", "csv", "-q")  # the run still reads
    assert rc == 0, err


def test_export_never_replaces_an_existing_file(cli, run_dir, tmp_path):
    dest = tmp_path / "mine.json"
    dest.write_text("precious")
    rc, _, err = cli("export", run_dir, dest, "--to", "json", "-q")
    assert rc == 2 and "already exists" in one_line_error(err)
    assert dest.read_text() == "precious"


def test_damaged_run_files_are_one_line_in_report_and_export(cli, run_dir, tmp_path):
    (run_dir / "assignments.csv").write_text(json.dumps({"run": "x", "assignments": [{"id": 1}]}, indent=2))
    for args in (["export", run_dir, tmp_path / "x.csv", "--to", "csv", "-q"], ["report", run_dir]):
        rc, _, err = cli(*args)
        assert rc == 2 and "damaged run files" in one_line_error(err)


def test_symlinked_dest_into_the_run_dir_is_refused(cli, run_dir, tmp_path):
    link = tmp_path / "sneaky"
    os.symlink(run_dir, link)
    rc, _, err = cli("export", run_dir, link / "assignments.csv", "--to", "json", "-q")
    assert rc == 2 and "inside the run directory" in one_line_error(err)
