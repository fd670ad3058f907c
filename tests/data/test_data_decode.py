"""decode_image: every supported format and mode, and every failure, on small real files."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from imgclust.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image
from imgclust.errors import BadImageError

RNG = np.random.default_rng(0)
# A smooth, asymmetric RGB test pattern (lossy codecs keep it within a few levels).
_Y, _X = np.mgrid[0:24, 0:32]
PATTERN = np.stack([_X * 8, _Y * 10, np.full_like(_X, 128)], axis=2).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_extensions_are_lower_case_with_dot() -> None:
    assert IMAGE_EXTENSIONS
    for ext in IMAGE_EXTENSIONS:
        assert ext.startswith(".") and ext == ext.lower()
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"):
        assert ext in IMAGE_EXTENSIONS


@pytest.mark.parametrize(
    ("fmt", "suffix", "kw", "tol"),
    [
        ("PNG", ".png", {}, 0),
        ("BMP", ".bmp", {}, 0),
        ("TIFF", ".tif", {}, 0),
        ("WEBP", ".webp", {"lossless": True}, 0),
        ("JPEG", ".jpg", {"quality": 95}, 12),
        ("WEBP", ".webp", {"quality": 90}, 20),
    ],
)
def test_rgb_formats_roundtrip(tmp_path: Path, fmt: str, suffix: str, kw: dict, tol: int) -> None:
    path = _write(tmp_path / f"img{suffix}", _encode(Image.fromarray(PATTERN), fmt, **kw))
    out = decode_image(path)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    diff = np.abs(out.astype(int) - PATTERN.astype(int))
    if tol == 0:
        assert np.array_equal(out, PATTERN)
    else:
        assert diff.mean() < tol / 3 and diff.max() <= 3 * tol
    # a known pixel: bottom-right is bright red-ish, top-left dark
    assert out[-1, -1, 0] > 200 and out[0, 0, 0] < 30


def test_gif_palette(tmp_path: Path) -> None:
    arr = np.zeros((10, 12, 3), np.uint8)
    arr[:, 6:] = (0, 0, 255)
    arr[:5, :6] = (255, 0, 0)
    out = decode_image(_write(tmp_path / "a.gif", _encode(Image.fromarray(arr), "GIF")))
    assert out.shape == (10, 12, 3)
    assert (
        tuple(out[0, 0]) == (255, 0, 0) and tuple(out[9, 11]) == (0, 0, 255) and tuple(out[9, 0]) == (0, 0, 0)
    )


def test_input_kinds_bytes_str_path(tmp_path: Path) -> None:
    data = _encode(Image.fromarray(PATTERN), "PNG")
    p = _write(tmp_path / "x.png", data)
    a, b, c = decode_image(data), decode_image(str(p)), decode_image(p)
    assert np.array_equal(a, PATTERN) and np.array_equal(b, PATTERN) and np.array_equal(c, PATTERN)


def test_grayscale_becomes_three_equal_channels() -> None:
    g = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
    out = decode_image(_encode(Image.fromarray(g, "L"), "PNG"))
    assert out.shape == (6, 8, 3)
    assert (
        np.array_equal(out[:, :, 0], g)
        and np.array_equal(out[:, :, 1], g)
        and np.array_equal(out[:, :, 2], g)
    )
    one_bit = decode_image(_encode(Image.fromarray(g > 100).convert("1"), "PNG"))
    assert set(np.unique(one_bit).tolist()) <= {0, 255}


def test_rgba_composited_on_white() -> None:
    a = np.zeros((2, 3, 4), np.uint8)
    a[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    a[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    a[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
    out = decode_image(_encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert out.shape == (2, 3, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert all(120 <= v <= 135 for v in out[0, 2])


def test_la_composited_on_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (50, 255))
    la.putpixel((1, 0), (50, 0))
    out = decode_image(_encode(la, "PNG"))
    assert tuple(out[0, 0]) == (50, 50, 50) and tuple(out[0, 1]) == (255, 255, 255)


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = decode_image(_encode(pal, "PNG", transparency=0))
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent index -> white
    assert tuple(out[1, 1]) == (255, 0, 0)


def test_cmyk_jpeg_to_rgb() -> None:
    out = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert out.shape == (8, 8, 3)
    r, g, b = (int(v) for v in out[4, 4])
    assert r > 230 and g < 25 and b < 25  # CMYK (0, 100%, 100%, 0) is red


def test_exif_orientation_rotates(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _write(tmp_path / "rot.jpg", _encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    out = decode_image(path)
    assert out.shape == (40, 20, 3)  # displayed as portrait
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50  # former left (red) is now on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50
    plain = decode_image(_encode(img, "JPEG", quality=95))
    assert plain.shape == (20, 40, 3)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    out = decode_image(buf.getvalue())
    assert out.shape == (6, 8, 3)
    assert tuple(out[3, 3]) == (255, 0, 0)


def test_16bit_grayscale_png_stretched_by_image_range() -> None:
    g = np.linspace(1000, 5000, 40).reshape(5, 8).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(g), "PNG"))
    assert out.shape == (5, 8, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.all(np.diff(out[:, :, 0].ravel().astype(int)) >= 0)  # monotonic


def test_16bit_rgb_tiff(tmp_path: Path) -> None:
    a = np.zeros((6, 7, 3), np.uint16)
    a[..., 0] = 4000  # 12-bit sensor data: >> 8 would make it almost black
    a[..., 1] = 2000
    a[..., 2] = 0
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(p, a, photometric="rgb")
    out = decode_image(p)
    assert out.shape == (6, 7, 3)
    assert tuple(out[0, 0]) == (255, 128, 0)  # joint range 0..4000 keeps colour balance


@pytest.mark.parametrize("planar", ["separate", "contig"])
def test_5_band_16bit_tiff_keeps_first_three(tmp_path: Path, planar: str) -> None:
    bands = np.zeros((5, 4, 6), np.uint16)
    bands[0] = 1000
    bands[1] = 3000
    bands[2] = np.arange(24).reshape(4, 6) * 100 + 500
    bands[3:] = 60000  # ignored bands must not influence the scaling
    data = bands if planar == "separate" else np.moveaxis(bands, 0, -1)
    p = tmp_path / f"b5_{planar}.tiff"
    tifffile.imwrite(p, data, photometric="minisblack", planarconfig=planar)
    out = decode_image(p)
    assert out.shape == (4, 6, 3)
    lo, hi = 500, 3000  # joint range of bands 0..2 only

    def expect(v: int) -> int:
        return int((v - lo) * 255 / (hi - lo) + 0.5)

    assert out[0, 0, 0] == expect(1000) and out[0, 0, 1] == 255 and out[0, 0, 2] == 0
    assert out[-1, -1, 2] == expect(2800)


def test_2_band_tiff_uses_first_band(tmp_path: Path) -> None:
    two = np.zeros((3, 4, 2), np.uint16)
    two[..., 0] = np.arange(12).reshape(3, 4) * 1000
    two[..., 1] = 65535
    p = tmp_path / "b2.tif"
    tifffile.imwrite(p, two, photometric="minisblack", planarconfig="contig")
    out = decode_image(p)
    assert out.shape == (3, 4, 3)
    assert np.array_equal(out[..., 0], out[..., 2])
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_float_tiff(tmp_path: Path) -> None:
    f = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, f)
    out = decode_image(p)
    assert out.shape == (3, 4, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    rgbf = RNG.random((3, 4, 3)).astype(np.float32) * 7 - 2  # outside [0, 1]: stretched
    tifffile.imwrite(tmp_path / "rgbf.tif", rgbf, photometric="rgb")
    out2 = decode_image(tmp_path / "rgbf.tif")
    assert out2.min() == 0 and out2.max() == 255


def test_8bit_tiff_variants(tmp_path: Path) -> None:
    p = tmp_path / "rgba.tif"
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = 255
    a[1, 1, 3] = 0
    Image.fromarray(a, "RGBA").save(p)
    out = decode_image(p)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)
    cmyk = tmp_path / "cmyk.tif"
    Image.new("CMYK", (3, 3), (255, 0, 255, 0)).save(cmyk)  # green
    r, g, b = (int(v) for v in decode_image(cmyk)[1, 1])
    assert g > 230 and r < 25 and b < 25


def test_unicode_and_space_in_path(tmp_path: Path) -> None:
    d = tmp_path / "fötö dïr ☃"
    d.mkdir()
    p = _write(d / "été 1.png", _encode(Image.fromarray(PATTERN), "PNG"))
    assert np.array_equal(decode_image(p), PATTERN)


def test_file_is_not_modified(tmp_path: Path) -> None:
    img = Image.fromarray(PATTERN)
    exif = img.getexif()
    exif[0x0112] = 3
    p = _write(tmp_path / "x.jpg", _encode(img, "JPEG", exif=exif.tobytes()))
    before = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    decode_image(p)
    assert (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) == before


# ----------------------------------------------------------------------------- failures


def _reason(data_or_path, **kw) -> str:
    with pytest.raises(BadImageError) as ei:
        decode_image(data_or_path, **kw)
    return str(ei.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "empty.jpg", b"")
    assert _reason(p) == "empty file"
    assert _reason(b"") == "empty file"


def test_text_file_named_jpg(tmp_path: Path) -> None:
    p = _write(tmp_path / "notes.jpg", b"this is not an image\n" * 20)
    assert _reason(p) == "not an image (cannot identify format)"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    noise = RNG.integers(0, 256, (64, 64, 3), np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    p = _write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) * 2 // 3])
    assert _reason(p) == "truncated image"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.png") == "file not found"
    assert "directory" in _reason(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_permission_denied(tmp_path: Path) -> None:
    p = _write(tmp_path / "locked.png", _encode(Image.fromarray(PATTERN), "PNG"))
    p.chmod(0)
    try:
        assert _reason(p) == "permission denied"
    finally:
        p.chmod(0o644)


def test_permission_error_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same check as above when running as root (chmod does not stop root)."""
    p = _write(tmp_path / "locked.png", _encode(Image.fromarray(PATTERN), "PNG"))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr("imgclust.data.decode.open", denied, raising=False)
    assert _reason(p) == "permission denied"


def test_over_pixel_cap(tmp_path: Path) -> None:
    p = _write(tmp_path / "big.png", _encode(Image.new("RGB", (10, 10)), "PNG"))
    assert _reason(p, max_pixels=50) == "image too large: 10 x 10 pixels > 50"
    assert decode_image(p, max_pixels=100).shape == (10, 10, 3)
    tif = tmp_path / "big16.tif"
    tifffile.imwrite(tif, np.zeros((10, 10, 5), np.uint16), photometric="minisblack", planarconfig="contig")
    assert _reason(tif, max_pixels=99) == "image too large: 10 x 10 pixels > 99"
    assert DEFAULT_MAX_PIXELS >= 100_000_000


def test_pillow_bomb_guard_never_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our cap replaces Pillow's: no DecompressionBombWarning/Error escapes either way."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warn_size = _encode(Image.new("RGB", (12, 12), (9, 9, 9)), "PNG")  # 144 px: Pillow warns
    error_size = _encode(Image.new("RGB", (20, 20), (9, 9, 9)), "PNG")  # 400 px: Pillow raises
    with warnings.catch_warnings(record=True) as rec:
        assert decode_image(warn_size).shape == (12, 12, 3)
        assert decode_image(error_size).shape == (20, 20, 3)
    assert not [w for w in rec if issubclass(w.category, Image.DecompressionBombWarning)]
    assert _reason(error_size, max_pixels=300) == "image too large: 20 x 20 pixels > 300"
    assert Image.MAX_IMAGE_PIXELS == 100  # the temporary lift was undone
