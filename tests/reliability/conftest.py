"""Helpers of the reliability battery: the CLI in-process, a tiny full file system."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """``cli(*args) -> (exit status, stdout, stderr)``: ``imgclust.cli.main`` in this process
    (a traceback would propagate as an exception and fail the test). The feature cache is
    private to the test unless ``IMGCLUST_CACHE`` is set by the test."""
    import signal

    from imgclust import cli as cli_mod

    monkeypatch.setenv("IMGCLUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["imgclust", *map(str, args)])
        cli_mod._signal_seen.clear()
        try:
            cli_mod.main()
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


def one_line_error(err: str) -> str:
    """The single ``error: ...`` line of stderr (asserts there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@contextlib.contextmanager
def tiny_fs(path: Path, size: str = "1m"):
    """A tmpfs of ``size`` mounted at ``path`` (yields the path), or None where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs: Path, leave: int) -> None:
    """Fill the file system at ``fs`` until about ``leave`` bytes are free."""
    import shutil

    free = shutil.disk_usage(fs).free
    if free > leave:
        with open(fs / "filler.bin", "wb") as f:
            f.write(b"\0" * (free - leave))
