"""Hostile images: decode_image fuzzed on random and mutated bytes, and a CLI run on a folder
that mixes every odd case a real photo archive holds."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgclust.data.decode import decode_image
from imgclust.errors import BadImageError

FUZZ_CAP = 1 << 20  # a mutated header may claim a huge size: refuse early, keep examples fast
# 150 fixed examples per test in the suite (~1 s); IMGCLUST_FUZZ_EXAMPLES=5000 for a long, random soak.
_N_FUZZ = int(os.environ.get("IMGCLUST_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=_N_FUZZ, deadline=2000, derandomize="IMGCLUST_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow])


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _valid_encodings() -> list[bytes]:
    y, x = np.mgrid[0:12, 0:16]
    rgb = Image.fromarray(np.stack([x * 16, y * 20, (x + y) * 8], axis=2).astype(np.uint8))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    tif16 = io.BytesIO()
    tifffile.imwrite(tif16, (np.arange(12 * 16 * 4).reshape(12, 16, 4) * 50).astype(np.uint16), photometric="rgb",
                     extrasamples=[0])
    return [
        _encode(rgb, "PNG"),
        _encode(rgb.convert("P"), "PNG", transparency=0),
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "TIFF"),
        tif16.getvalue(),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _encode(rgb, "WEBP"),
        _encode(rgb, "BMP"),
    ]


VALID = _valid_encodings()
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
          b"BM", b"P6\n", b""]


@contextlib.contextmanager
def _watchdog(seconds: int):
    """Fail (instead of hanging the suite) when one decode takes longer than ``seconds``."""
    def boom(*_):
        raise TimeoutError(f"decode_image took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _check_contract(data: bytes) -> None:
    """decode_image returns (H, W, 3) uint8 with H, W >= 1, or raises BadImageError; nothing else."""
    with _watchdog(10):
        try:
            out = decode_image(data, max_pixels=FUZZ_CAP)
        except BadImageError as e:
            assert str(e)  # a reason to list in skipped.csv
            return
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert out.ndim == 3 and out.shape[2] == 3 and out.shape[0] >= 1 and out.shape[1] >= 1
    assert out.shape[0] * out.shape[1] <= FUZZ_CAP


def test_every_valid_seed_encoding_decodes():
    for data in VALID:
        assert decode_image(data).shape == (12, 16, 3)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on corrupt EXIF / short reads
@FUZZ
@given(magic=st.sampled_from(MAGICS), body=st.binary(max_size=4096))
def test_fuzz_random_bytes_behind_a_format_magic(magic, body):
    _check_contract(magic + body)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ
@given(
    base=st.sampled_from(range(len(VALID))),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=12),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    insert=st.binary(max_size=64),
)
def test_fuzz_mutated_valid_images(base, edits, cut, insert):
    data = bytearray(VALID[base])
    for pos, value in edits:
        data[pos % len(data)] = value
    if insert:
        at = len(data) // 3
        data[at:at] = insert
    if cut is not None:
        data = data[: int(len(data) * cut)]
    _check_contract(bytes(data))


# ----------------------------------------------------------------------------- CLI level


def _cli(*args, cache):
    env = dict(os.environ, IMGCLUST_CACHE=str(cache), IMGCLUST_QUIET="1")
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def _digit_images(n: int) -> list[Image.Image]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return [Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32)) for i in range(n)]


def test_cli_cluster_on_a_folder_of_hostile_files(tmp_path):
    """Every odd case in one folder: the run finishes, each bad file is listed with its
    reason in skipped.csv, every convertible one is clustered."""
    root = tmp_path / "archive ü"
    root.mkdir()
    imgs = _digit_images(24)
    good: set[str] = set()
    for i, im in enumerate(imgs[:12]):  # plain images, unicode and spaces in names
        name = f"bild {i} – ü.png" if i % 2 else f"写真_{i}.jpg"
        im.convert("RGB").save(root / name)
        good.add(name)
    rgb = imgs[12].convert("RGB")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    tifffile.imwrite(root / "sixteen.tif", (np.asarray(imgs[13]).astype(np.uint16) * 257))
    tifffile.imwrite(root / "multiband.tif", np.repeat(np.asarray(imgs[14])[:, :, None], 5, axis=2).astype(np.uint16) * 100,
                     planarconfig="contig", photometric="minisblack")
    frames = [imgs[15].convert("P"), imgs[16].convert("P")]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    imgs[17].convert("RGB").save(root / "animated.webp", save_all=True, append_images=[imgs[18].convert("RGB")])
    imgs[19].convert("P").save(root / "palette.png", transparency=0)
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(root / "exif.jpg", exif=_exif_rotated())
    good |= {"cmyk.jpg", "sixteen.tif", "multiband.tif", "animated.gif", "animated.webp", "palette.png", "exif.jpg"}

    bad = {
        "zero.png": "empty file",
        "text.jpg": "not an image",
        "cut.png": "truncated",
        "huge.png": "image too large",
        "cut.tif": "truncated",
        "loop a.png": "symlink loop",
        "dangling.jpg": "broken symlink",
    }
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a JPEG", encoding="utf-8")
    full = _encode(imgs[20].convert("RGB"), "PNG")
    (root / "cut.png").write_bytes(full[: len(full) // 2])
    tif = (root / "sixteen.tif").read_bytes()
    (root / "cut.tif").write_bytes(tif[: len(tif) // 2])
    Image.new("L", (300, 300)).save(root / "huge.png")  # 90,000 px > --max-pixels 50000
    os.symlink("loop b.png", root / "loop a.png")
    os.symlink("loop a.png", root / "loop b.png")
    bad["loop b.png"] = "symlink loop"
    os.symlink("missing.png", root / "dangling.jpg")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # directory loop: not followed, not an image
    if os.geteuid() != 0:  # root reads everything
        (root / "locked.png").write_bytes(full)
        os.chmod(root / "locked.png", 0)
        bad["locked.png"] = "permission denied"

    out = tmp_path / "run"
    r = _cli("cluster", root, "--k", 3, "--backbone", "pixels", "--image-size", 16, "--max-pixels", 50_000,
             "--out", out, cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no warnings or tracebacks leak to the terminal: the reasons are in skipped.csv
    skipped = {row["id"]: row["reason"] for row in csv.DictReader(open(out / "skipped.csv", encoding="utf-8"))}
    assert set(skipped) == set(bad), skipped
    for name, reason in bad.items():
        assert reason in skipped[name], (name, skipped[name])
    clustered = {row["id"] for row in csv.DictReader(open(out / "assignments.csv", encoding="utf-8"))}
    assert clustered == good
    run = json.loads((out / "run.json").read_text())
    assert run["n_skipped"] == len(bad) and run["n_clustered"] == len(good)
    assert run["config"]["source"]["max_pixels"] == 50_000


def _exif_rotated() -> bytes:
    ex = Image.Exif()
    ex[0x0112] = 6
    return ex.tobytes()
