"""The drafted-JPEG fast path (simplejpeg) returns Pillow's pixels byte for byte (issue 19 s4)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgclust.data import decode
from imgclust.data.decode import decode_image, jpeg_draft
from imgclust.errors import BadImageError

pytest.importorskip("simplejpeg")


def _photo(w: int = 1100, h: int = 830, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields plus grain (upsampled noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 40 + 1, w // 40 + 1, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    im += rng.integers(-20, 21, im.shape, dtype=np.int16)
    return Image.fromarray(np.clip(im, 0, 255).astype(np.uint8))


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _pillow_only(data: bytes, side: int, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(decode, "_simplejpeg", None)
        with jpeg_draft(side):
            return decode_image(data)


@pytest.mark.parametrize("kw", [{"subsampling": 2}, {"subsampling": 1}, {"subsampling": 0},
                                {"subsampling": 2, "progressive": True}], ids=["420", "422", "444", "progressive"])
@pytest.mark.parametrize("side", [256, 128, 100])  # scales 1/2, 1/4, 1/8 of 1100 x 830
def test_fast_path_equals_pillow_byte_for_byte(kw, side, monkeypatch):
    data = _jpeg(_photo(), **kw)
    calls = []
    real = decode._simplejpeg.decode_jpeg
    monkeypatch.setattr(decode._simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(k) or real(*a, **k))
    with jpeg_draft(side):
        fast = decode_image(data)
    assert calls, "the fast path was not taken"
    want = _pillow_only(data, side, monkeypatch)
    assert fast.shape == want.shape and fast.dtype == want.dtype == np.uint8
    assert min(fast.shape[:2]) >= side and min(fast.shape[:2]) < 2 * side + 2  # a drafted size
    np.testing.assert_array_equal(fast, want)


def test_rotated_gray_small_and_undrafted_jpegs_keep_the_pillow_path(monkeypatch):
    calls = []
    monkeypatch.setattr(decode._simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1))
    im = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rotated = _jpeg(im, exif=exif.tobytes())
    with jpeg_draft(128):
        out = decode_image(rotated)
        assert out.shape[0] > out.shape[1]  # EXIF honoured: portrait
        decode_image(_jpeg(im.convert("L")))  # grayscale
        decode_image(_jpeg(im.resize((200, 150))))  # too small to draft
    decode_image(_jpeg(im))  # no draft context: full decode
    assert calls == []


def test_a_truncated_drafted_jpeg_is_still_a_bad_image():
    data = _jpeg(_photo())
    with jpeg_draft(128), pytest.raises(BadImageError, match="truncated"):
        decode_image(data[: len(data) // 2])
