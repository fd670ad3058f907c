"""Class 1 of issue 22: a full disk under the feature cache, the run directory and an export.

Each case runs twice: on a real 4 MB tmpfs (needs root and a kernel that lets us mount;
CI runs as root) and with the fault injected at the write layer (``IMGCLUST_FAKE_FREE_BYTES``
for space reservation, an ENOSPC raised from the writer), so the class is covered even where
mounting is refused. Expected every time: exit status 2, one ``error:`` line naming the
destination and the space needed, no traceback, nothing half-written that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import fill, one_line_error, tiny_fs

SMALL = ["--limit", 300, "--backbone", "pixels", "--k", 3, "--option", "n_init=1", "--no-report", "-q"]


@pytest.fixture(params=["tmpfs", "injected"])
def full(request, tmp_path, monkeypatch):
    """A folder on a (nearly) full 4 MB file system: ``(path, how)``."""
    if request.param == "injected":
        d = tmp_path / "full"
        d.mkdir()
        yield d, "injected"
        return
    with tiny_fs(tmp_path / "fs", "4m") as fs:
        if fs is None:
            pytest.skip("cannot mount a tmpfs here (not root, or mount refused); the injected variant covers this")
        yield fs, "tmpfs"


def test_feature_cache_on_a_full_disk_is_one_line_not_a_bus_error(cli, full, tmp_path, monkeypatch):
    fs, how = full
    cache = fs / "cache"
    if how == "tmpfs":
        fill(fs, 100_000)  # 300 x 768 float32 = 921 KB will not fit
    else:
        monkeypatch.setenv("IMGCLUST_FAKE_FREE_BYTES", "100000")
    rc, _, err = cli("cluster", "digits", *SMALL, "--image-size", 16, "--cache-dir", cache, "--out", tmp_path / "run")
    line = one_line_error(err)
    assert rc == 2 and "no space left" in line and "features.npy" in line and "needs 921.7 KB" in line, line
    entry = next((cache / "features").glob("*/"))
    assert not (entry / "features.npy").exists()  # no sparse file left that a later run could mistake
    assert not (entry / "meta.json").exists()
    assert not (tmp_path / "run" / "run.json").exists()


def test_memmap_file_is_allocated_not_sparse(cli, tmp_path):
    rc, _, err = cli("cluster", "digits", *SMALL, "--image-size", 16, "--out", tmp_path / "run")
    assert rc == 0, err
    f = next((tmp_path / "cache" / "features").glob("*/features.npy"))
    st = f.stat()
    assert st.st_blocks * 512 >= st.st_size  # posix_fallocate ran before rows were written through the map


def test_run_directory_on_a_full_disk_is_one_line_naming_the_file(cli, full, tmp_path, monkeypatch):
    fs, how = full
    out = fs / "run"
    if how == "tmpfs":
        # model.pt holds 3 x 12288 float32 centres (147 KB): the CSVs fit, the model does not.
        monkeypatch.setenv("IMGCLUST_CACHE", str(tmp_path / "cache"))
        fill(fs, 60_000)
    else:
        import torch

        real = torch.save

        def enospc_save(obj, f, *a, **k):  # what torch's zip writer does on ENOSPC
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

        monkeypatch.setattr(torch, "save", enospc_save)
        assert real is not enospc_save
    rc, _, err = cli("cluster", "digits", *SMALL, "--image-size", 64, "--out", out)
    line = one_line_error(err)
    assert rc == 2 and "no space left" in line and str(out / "model" / "model.pt") in line, line
    assert "needs" in line and "free" in line
    assert not (out / "run.json").exists()  # not a complete run
    assert not (out / "model" / "model.json").exists()
    assert list(out.rglob(".*.tmp")) == []


def test_export_onto_a_full_disk_names_the_destination_and_leaves_nothing(cli, full, tmp_path, monkeypatch):
    fs, how = full
    src = tmp_path / "src"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(6):  # ~200 KB of incompressible PNG each
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(src / c / f"{i}.png")
    rc, _, err = cli("cluster", src, "--k", 2, "--backbone", "pixels", "--image-size", 8, "--no-report", "-q",
                     "--out", tmp_path / "run")
    assert rc == 0, err
    before = {p: p.read_bytes() for p in src.rglob("*.png")}
    dest = fs / "export"
    if how == "tmpfs":
        fill(fs, 500_000)  # 12 x ~197 KB will not fit
    else:
        real = shutil.copyfile
        calls = []

        def copy_then_full(a, b, *args, **kw):
            calls.append(b)
            if len(calls) == 3:
                Path(b).write_bytes(b"")  # what a real full disk leaves: an empty file
                raise OSError(errno.ENOSPC, "No space left on device", str(a))  # the *source* name, like copyfile
            return real(a, b, *args, **kw)

        monkeypatch.setattr(shutil, "copyfile", copy_then_full)
    rc, _, err = cli("export", tmp_path / "run", dest, "--to", "imagefolder", "-q")
    line = one_line_error(err)
    assert rc == 2 and "no space left" in line and str(dest) in line and str(src) not in line, line
    assert not dest.exists()  # nothing half-written (no 0-byte image that looks exported)
    assert not list(fs.glob(".export*"))
    assert {p: p.read_bytes() for p in src.rglob("*.png")} == before
    # Space again: the same command now works.
    if how == "tmpfs":
        (fs / "filler.bin").unlink()
    else:
        monkeypatch.setattr(shutil, "copyfile", real)
    rc, _, err = cli("export", tmp_path / "run", dest, "--to", "imagefolder", "-q")
    assert rc == 0, err
    assert len(list(dest.rglob("*.png"))) == 12
    assert json.loads((dest / "export.json").read_text())["copied"] == 12
    assert all(p.stat().st_size > 0 for p in dest.rglob("*.png"))


def test_disk_full_error_is_also_an_oserror_with_enospc():
    from imgclust.diskspace import disk_full

    e = disk_full("/x/y.bin", 2_000_000)
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(e).startswith("no space left on device writing /x/y.bin (needs 2.0 MB")
    assert os.linesep not in str(e)
