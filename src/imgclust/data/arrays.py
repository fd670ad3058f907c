"""``NpzSource``: images stored as one array in a NumPy ``.npz`` file."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from imgclust.data.base import ArraySource
from imgclust.errors import InputError

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "NpzSource", "to_channels_last"]

#: Keys searched, in order, for the image array.
IMAGE_KEYS: tuple[str, ...] = ("images", "x", "X", "data")
#: Keys searched, in order, for the (optional) label array.
LABEL_KEYS: tuple[str, ...] = ("labels", "y", "targets")


def to_channels_last(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) with C in {1, 3, 4} (and a last dim that is not) -> (N, H, W, C).

    (N, H, W) and (N, H, W, C) are returned unchanged.
    """
    if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[3] not in (1, 3, 4):
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    return images


class NpzSource(ArraySource):
    """Images from ``.npz``: key ``images`` (fallbacks ``x``, ``X``, ``data``).

    Optional labels under ``labels`` / ``y`` / ``targets`` (integers, -1 = unknown, or
    strings, which are mapped to sorted class names) and optional ``class_names``.
    Accepted image shapes: (N, H, W), (N, H, W, C) and channels-first (N, C, H, W).
    Non-uint8 images are scaled to uint8 (see :class:`ArraySource`). Loaded with
    ``allow_pickle=False``: object arrays are refused.

    Raises:
        InputError: missing/unreadable file, no image key, bad shapes or label count.
    """

    def __init__(self, path: str | Path) -> None:
        p = Path(os.path.abspath(Path(path).expanduser()))
        if not p.exists():
            raise InputError(f"array file not found: {p}")
        self.file = p
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.files)
                key = next((k for k in IMAGE_KEYS if k in keys), None)
                if key is None:
                    raise InputError(
                        f"{p} has no image array: expected a key named {', '.join(IMAGE_KEYS)} "
                        f"(found: {', '.join(keys) or 'nothing'})"
                    )
                lkey = next((k for k in LABEL_KEYS if k in keys), None)
                for k in (key, lkey, "class_names" if "class_names" in keys else None):
                    if k is not None:
                        _check_member_header(z, k, p)  # before numpy allocates what the header claims
                images = z[key]
                raw_labels = z[lkey] if lkey is not None else None
                names = z["class_names"] if "class_names" in keys else None
        except InputError:
            raise
        except PermissionError as e:
            raise InputError(f"permission denied: {p}") from e
        except ValueError as e:
            if "pickle" in str(e).lower():
                raise InputError(
                    f"{p} holds object (pickled) arrays, which are not loaded for safety; save plain numeric arrays"
                ) from e
            raise InputError(f"cannot read {p} as a .npz array file: {e}") from e
        except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise InputError(f"cannot read {p} as a .npz array file: {e}") from e
        except MemoryError:
            raise InputError(f"{p}: not enough memory to load its arrays") from None

        if images.dtype.kind not in "uifb":
            raise InputError(f"{p}: images must be numeric, got dtype {images.dtype}")
        if images.dtype.kind == "b":
            images = images.astype(np.uint8) * 255
        if images.ndim not in (3, 4):
            raise InputError(
                f"{p}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {images.shape}"
            )
        images = to_channels_last(images)
        if images.ndim == 4 and images.shape[3] not in (1, 3, 4):
            raise InputError(
                f"{p}: cannot tell the channel axis of images with shape {images.shape} (need 1, 3 or 4 channels)"
            )

        labels, class_names = _labels(raw_labels, names, p)
        super().__init__(images, labels=labels, class_names=class_names, name=p.name)

    def describe(self) -> dict:
        d = super().describe()
        d.update(kind="npz", file=str(self.file))
        return d


def _check_member_header(z: np.lib.npyio.NpzFile, key: str, p: Path) -> None:
    """Refuse an array whose header claims more bytes than its zip member holds.

    A 200-byte ``.npz`` can declare shape (10**12,): numpy would try to allocate that before
    reading a byte (MemoryError, or the OOM killer). The member's uncompressed size is known
    from the zip directory, so the claim is checked against it first.
    """
    from numpy.lib import format as npformat

    info = z.zip.getinfo(f"{key}.npy")
    with z.zip.open(info) as f:
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npformat.read_array_header_1_0(f)
            else:
                shape, _, dtype = npformat.read_array_header_2_0(f)
        except ValueError as e:
            raise InputError(f"{p}: array {key!r} has a bad header ({e})") from None
        header_len = f.tell()
    if dtype.hasobject:
        return  # refused later with the pickle message
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > info.file_size - header_len:
        raise InputError(f"{p}: array {key!r} claims shape {tuple(shape)} ({claimed} bytes) but holds "
                         f"{max(info.file_size - header_len, 0)} bytes; the file is damaged or forged")


def _labels(
    raw: np.ndarray | None, names: np.ndarray | None, p: Path
) -> tuple[np.ndarray | None, list[str] | None]:
    if raw is None:
        return None, None
    raw = np.asarray(raw).reshape(-1)
    if raw.dtype.kind in "US":
        strs = raw.astype(str)
        classes = sorted(set(strs.tolist()))
        lookup = {c: k for k, c in enumerate(classes)}
        return np.array([lookup[s] for s in strs], dtype=np.int64), classes
    if raw.dtype.kind not in "iub" and not (raw.dtype.kind == "f" and np.all(np.mod(raw, 1) == 0)):
        raise InputError(f"{p}: labels must be integers (or strings), got dtype {raw.dtype}")
    labels = raw.astype(np.int64)
    if names is not None:
        class_names = [str(n) for n in np.asarray(names).reshape(-1).tolist()]
        if len(labels) and labels.max() >= len(class_names):
            raise InputError(f"{p}: label {int(labels.max())} but only {len(class_names)} class_names")
    else:
        top = int(labels.max()) if len(labels) else -1
        class_names = [str(k) for k in range(top + 1)] if top >= 0 else None
    return labels, class_names
