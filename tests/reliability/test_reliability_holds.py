"""What already held when issue 22 was filed, kept under test here: hostile archive members
never escape on export. (Kill/SIGTERM/Ctrl-C resume: test_reliability_interrupt.py; pickle
payloads: test_reliability_untrusted.py; two runs sharing one cache:
test_reliability_cache.py; bad arguments: test_reliability_settings.py.)"""

from __future__ import annotations

import io
import tarfile

import numpy as np


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_hostile_archive_members_never_escape_on_export(cli, tmp_path):
    arc = tmp_path / "a.tar"
    with tarfile.open(arc, "w") as tf:
        def add(name: str, data: bytes | None = None, **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)

        for i in range(6):
            add(f"ok/{i}.png", _png(i))
        add("../escape1.png", _png(10))
        add(str(tmp_path / "escape2.png"), _png(11))  # absolute
        add("ok/link.png", type=tarfile.SYMTYPE, linkname="../../escape3.png")
        add("ok/hard.png", type=tarfile.LNKTYPE, linkname="/etc/passwd")
        add("ok/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
    rc, _, err = cli("cluster", arc, "--k", 2, "--backbone", "pixels", "--image-size", 8, "--no-report", "-q",
                     "--out", tmp_path / "run")
    assert rc == 0, err
    before = sorted(p.name for p in tmp_path.iterdir()) + ["exports"]
    for to in ("folders", "imagefolder"):
        dest = tmp_path / "exports" / to
        rc, _, err = cli("export", tmp_path / "run", dest, "--to", to, "-q")
        assert rc == 0, err
        for p in dest.rglob("*"):
            assert not p.is_symlink() and p.resolve().is_relative_to(dest.resolve())  # members are written out
            if p.is_file():
                assert not p.is_block_device() and not p.is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no escape*.png beside the archive
    assert not (tmp_path.parent / "escape1.png").exists() and not (tmp_path.parent / "escape3.png").exists()
    assert not list(tmp_path.rglob("escape*"))
