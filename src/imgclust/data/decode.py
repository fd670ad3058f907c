"""Decode one image file (or its bytes) into an ``(H, W, 3)`` uint8 RGB array.

Pillow does the decoding; ``tifffile`` takes over for TIFFs whose samples Pillow would
truncate or cannot read (16/32-bit multi-band, float, more than 4 bands).

Conversion rules (the same for every format):

* grayscale (``1``, ``L``, ``I;16``, ``I``, ``F``) is repeated to three channels;
* images with transparency (``RGBA``, ``LA``, ``PA``, palette or ``L``/``RGB`` images with a
  ``transparency`` key) are **composited on a white background** - transparent pixels of
  icons and scans usually hold arbitrary (often black) colour, so dropping alpha would
  invent content;
* palette, ``CMYK``, ``YCbCr``, ``LAB`` and ``HSV`` are converted to RGB by Pillow;
* samples wider than 8 bits (16-bit, 32-bit int, float) are **stretched by the per-image
  range**: ``min .. max`` of the kept channels (jointly, so colour balance is preserved)
  maps to ``0 .. 255``. Integer images whose values already lie in ``0 .. 255`` are cast
  unchanged and float images within ``[0, 1]`` are multiplied by 255. Per-image stretching
  keeps 12-bit sensor data (e.g. remote-sensing TIFFs with values up to ~4000) visible,
  where a fixed ``>> 8`` would make it nearly black;
* multi-band rasters keep the first 3 bands (more than 3 bands) or the first band
  (2 bands, e.g. gray + alpha/extra band), which is then repeated to RGB;
* the EXIF orientation tag is honoured (``ImageOps.exif_transpose``), so the returned
  shape is the displayed one;
* animated GIF / WebP / PNG return their first frame.

Every failure becomes :class:`~imgclust.errors.BadImageError` with a short reason
("empty file", "truncated image", "not an image (cannot identify format)",
"permission denied", "image too large: W x H pixels > cap", ...). The file is only ever
read, never written.

JPEG draft mode: inside ``with jpeg_draft(min_side):`` (set per decoding thread by the feature
extractor) a JPEG is decoded by libjpeg's DCT scaling at 1/2, 1/4 or 1/8 of its size, the
smallest that keeps both sides >= ``min_side``: a 4000 x 3000 photo bound for a 224 px
backbone decodes 8x8 fewer pixels, several times faster. The cap check above still uses the
full header size. Where ``simplejpeg`` is installed (a core dependency), a drafted baseline or
progressive RGB JPEG without an EXIF rotation is decoded by it instead of Pillow: both wrap
libjpeg-turbo with the same settings (accurate integer IDCT, fancy upsampling) and the scale is
pinned to the size Pillow's own ``draft`` chose, so the pixels are the same (tested on 4:2:0,
4:2:2, 4:4:4 and progressive files, every byte compared); it skips Pillow's per-image set-up and
buffer copies: 16.3 vs 17.7 CPU-ms on the 2140 x 1605 photos of ``benchmarks/extract_speed.py``
(b). Anything else (other modes, a rotation, an error) takes the Pillow path unchanged.

Decompression bombs: images with more than ``max_pixels`` pixels are refused from their
header, before any pixel is decoded. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) is
superseded by this cap: its ``DecompressionBombWarning`` is silenced process-wide when this
module is imported, and its ``DecompressionBombError`` is handled here.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclust.errors import BadImageError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "decode_image", "is_image_name", "jpeg_draft", "jpeg_draft_size"]

#: Default pixel cap: Pillow's default hard limit (2 x ``MAX_IMAGE_PIXELS``), ~179 Mpx,
#: e.g. 13,377 x 13,377. Larger images are reported as bad instead of being decoded.
DEFAULT_MAX_PIXELS: int = 178_956_970

#: File extensions (lower-case, with the dot) treated as images when scanning folders and
#: archives. Matching is case-insensitive.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".bmp",
    ".dib",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)


def _silence_pillow_bomb_warning() -> None:
    """Ignore Pillow's DecompressionBombWarning process-wide (idempotent, cheap).

    imgclust enforces ``max_pixels`` itself; Pillow's warning for images between its soft
    and hard limits would only be noise leaking to the user's terminal. Re-checked on each
    decode because ``warnings.catch_warnings`` blocks (test runners, callers) restore the
    filter list on exit.
    """
    for f in warnings.filters:
        if f[0] == "ignore" and f[2] is Image.DecompressionBombWarning and f[1] is None and f[3] is None:
            return
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_silence_pillow_bomb_warning()

try:  # the drafted-JPEG fast path (module docstring); Pillow alone works the same, a little slower
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a core dependency
    _simplejpeg = None

# Minimum side for JPEG draft decoding in this context (thread); None = full decode.
_DRAFT_MIN_SIDE: contextvars.ContextVar[int | None] = contextvars.ContextVar("imgclust_jpeg_draft", default=None)


@contextlib.contextmanager
def jpeg_draft(min_side: int | None):
    """Within the block, JPEGs decode at the smallest DCT scale with both sides >= ``min_side``."""
    token = _DRAFT_MIN_SIDE.set(None if min_side is None else max(1, int(min_side)))
    try:
        yield
    finally:
        _DRAFT_MIN_SIDE.reset(token)


def jpeg_draft_size(data: bytes | str | Path, min_side: int | None) -> tuple[int, int] | None:
    """The (width, height) ``decode_image`` would decode ``data`` at inside ``jpeg_draft(min_side)``.

    Header only, nothing decoded: Pillow's own ``draft`` configures the DCT scale lazily, under
    the same condition as :func:`_decode_pillow`. None for what Pillow cannot identify."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            w, h = img.size
            if min_side is not None and img.format == "JPEG" and min(w, h) >= 2 * min_side:
                img.draft(img.mode, (min_side, min_side))
            return tuple(img.size)  # type: ignore[return-value]
    except (OSError, ValueError, Image.DecompressionBombError, UnidentifiedImageError):
        return None


# Serialises the rare path that temporarily lifts Pillow's global pixel limit.
_PIL_LIMIT_LOCK = threading.Lock()

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F", "I;32", "I;32L", "I;32B"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def is_image_name(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes | str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file or its raw bytes into an ``(H, W, 3)`` uint8 RGB array.

    Args:
        data: the encoded bytes, or a path to the file.
        max_pixels: refuse images with more than this many pixels (``W * H``) with
            ``BadImageError("image too large: ...")``; ``None`` means
            :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        BadImageError: the image cannot be read or decoded; the message is a short reason.
    """
    cap = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    _silence_pillow_bomb_warning()
    buf = _read_bytes(data) if isinstance(data, (str, Path)) else bytes(data)
    if not buf:
        raise BadImageError("empty file")
    try:
        out = _decode_tiff(buf, cap) if buf[:4] in _TIFF_MAGIC else None
        return _checked(out if out is not None else _decode_pillow(buf, cap))
    except BadImageError:
        raise
    except Exception as e:  # any decoder failure is a bad image
        raise BadImageError(_reason(e)) from e


# --------------------------------------------------------------------------- helpers


def _read_bytes(path: str | Path) -> bytes:
    """Read a whole file, mapping OS errors to short BadImageError reasons."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise BadImageError("broken symlink (target not found)" if os.path.islink(path) else "file not found") from e
    except PermissionError as e:
        raise BadImageError("permission denied") from e
    except IsADirectoryError as e:
        raise BadImageError("is a directory, not an image") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadImageError("symlink loop") from e
        raise BadImageError(f"cannot read file ({e.strerror or e})") from e


def _reason(e: BaseException) -> str:
    """A short human reason for a decoder exception."""
    msg = str(e).lower()
    if isinstance(e, UnidentifiedImageError):
        return "not an image (cannot identify format)"
    if isinstance(e, Image.DecompressionBombError):
        return f"image too large ({e})"
    if "truncated" in msg or isinstance(e, EOFError) or "premature end" in msg:
        return "truncated image"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, MemoryError):
        return "image too large (out of memory)"
    if isinstance(e, (SyntaxError, ValueError, OSError, KeyError, IndexError)) or msg:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"corrupt image ({text[:120]})"
    return f"corrupt image ({type(e).__name__})"


def _checked(out: np.ndarray) -> np.ndarray:
    """The contract every caller relies on: (H, W, 3) uint8 with H, W >= 1."""
    if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.uint8 or out.shape[0] < 1 or out.shape[1] < 1:
        raise BadImageError(f"corrupt image (decoded to shape {out.shape}, dtype {out.dtype})")
    return out


def _too_large(w: int, h: int, cap: int) -> BadImageError:
    return BadImageError(f"image too large: {w} x {h} pixels > {cap:,}")


def _decode_pillow(buf: bytes, cap: int) -> np.ndarray:
    """Decode with Pillow: cap check from the header, full load, orientation, to RGB."""
    try:
        img = Image.open(io.BytesIO(buf))
    except Image.DecompressionBombError:
        # Above Pillow's hard limit. Read the header with that limit lifted: either the
        # image is above our cap too (refuse with its size) or the caller allowed it.
        return _decode_pillow_unlimited(buf, cap)
    with img:
        w, h = img.size
        if w * h > cap:
            raise _too_large(w, h, cap)
        draft = _DRAFT_MIN_SIDE.get()
        if draft is not None and img.format == "JPEG" and min(w, h) >= 2 * draft:
            img.draft(img.mode, (draft, draft))
            fast = _turbo_drafted(buf, img)
            if fast is not None:
                return fast
        try:
            img.load()  # decode now so truncation is detected here, not later
        except Image.DecompressionBombError:
            return _decode_pillow_unlimited(buf, cap)
        return _pil_to_rgb(img)


def _turbo_drafted(buf: bytes, img: Image.Image) -> np.ndarray | None:
    """``buf`` decoded by simplejpeg at the size Pillow's ``draft`` gave ``img``; None: use Pillow.

    Only for RGB (YCbCr/RGB-coded) JPEGs without an EXIF rotation: what ``_pil_to_rgb`` would
    return unchanged. libjpeg-turbo picks the smallest M/8 scale whose output is at least the
    requested size, which is exactly Pillow's 1/2, 1/4 or 1/8 scale (both round up); the shape is
    checked anyway. Any decoder complaint (strict mode: truncation, corrupt data) falls back to
    Pillow, which reports it as before."""
    if _simplejpeg is None or img.mode != "RGB":
        return None
    try:
        if img.getexif().get(0x0112, 1) not in (None, 1):
            return None
        w, h = img.size
        out = _simplejpeg.decode_jpeg(buf, colorspace="RGB", min_height=h, min_width=w)
    except Exception:  # noqa: BLE001 - Pillow's path decides what a bad image is
        return None
    return out if out.shape == (h, w, 3) and out.dtype == np.uint8 else None


def _decode_pillow_unlimited(buf: bytes, cap: int) -> np.ndarray:
    """Pillow decode with its global pixel limit temporarily lifted (serialised, rare)."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(buf)) as img:
                w, h = img.size
                if w * h > cap:
                    raise _too_large(w, h, cap)
                img.load()
                return _pil_to_rgb(img)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> (H, W, 3) uint8, following the module's conversion rules."""
    img = _exif_transpose(img)
    mode = img.mode
    if mode in _WIDE_MODES or mode.startswith("I;"):
        return _gray_to_rgb(_scale_to_uint8(np.asarray(img)))
    has_alpha = mode in _ALPHA_MODES or ("transparency" in img.info and mode in ("P", "L", "RGB", "1"))
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return _composite_on_white(rgba)
    if mode == "L":
        return _gray_to_rgb(np.asarray(img))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the image as is."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001
        return img


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 composited on a white background."""
    rgb = rgba[:, :, :3].astype(np.uint16)
    a = rgba[:, :, 3:4].astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8))


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map wide integer / float samples to uint8 by the per-image range (see module doc)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        if not finite.any():
            return np.zeros(a.shape, np.uint8)
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(finite, a, lo)
        if lo >= 0.0 and hi <= 1.0:
            return (a * 255.0 + 0.5).astype(np.uint8)
    else:
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        a = a.astype(np.float64)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _decode_tiff(buf: bytes, cap: int) -> np.ndarray | None:
    """Decode TIFFs that need ``tifffile``; ``None`` means "let Pillow do it".

    ``tifffile`` is used when the first page has samples wider than 8 bits, float/signed
    samples, or more than 4 bands; 8-bit gray/RGB/RGBA/palette/CMYK TIFFs go to Pillow,
    which also knows JPEG/LZW compression without extra codecs. When ``tifffile`` cannot
    decode the compression, Pillow gets a try as well.
    """
    import tifffile

    try:
        tif = tifffile.TiffFile(io.BytesIO(buf))
    except Exception:  # noqa: BLE001
        return None
    with tif:
        if not tif.pages:
            raise BadImageError("not an image (TIFF without pages)")
        page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
        w, h = int(page.imagewidth), int(page.imagelength)
        if w * h > cap:
            raise _too_large(w, h, cap)
        bands = int(getattr(page, "samplesperpixel", 1) or 1)
        if page.dtype == np.uint8 and bands <= 4:
            return None
        try:
            arr = page.asarray()
        except Exception as e:
            if "truncat" in str(e).lower():
                raise BadImageError("truncated image") from e
            return None
        axes = page.axes
    return _bands_to_rgb(arr, axes)


def _bands_to_rgb(arr: np.ndarray, axes: str) -> np.ndarray:
    """Reorder a tifffile page array to (Y, X, S) and reduce it to RGB per the module rules."""
    if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
        raise BadImageError(f"unsupported TIFF layout (axes {axes!r}, shape {arr.shape})")
    # Keep Y, X and the sample axis; take index 0 of any other axis (depth, pages).
    for ax in reversed(range(arr.ndim)):
        if axes[ax] not in "YXS":
            arr = np.take(arr, 0, axis=ax)
            axes = axes[:ax] + axes[ax + 1 :]
    if "S" not in axes:
        arr = arr[..., None]
        axes = axes + "S"
    arr = np.transpose(arr, [axes.index("Y"), axes.index("X"), axes.index("S")])
    n = arr.shape[2]
    arr = arr[:, :, :3] if n >= 3 else arr[:, :, :1]  # >3 bands: first 3; 2 bands: first
    arr = _scale_to_uint8(np.asarray(arr))
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)
