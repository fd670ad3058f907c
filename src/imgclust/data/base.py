"""The ``ImageSource`` idea: a finite, indexable collection of RGB images with optional labels.

Every source (folder, archive, array file, benchmark layouts, bundled digits) implements the
same small interface so the rest of the pipeline never needs to know where pixels come from.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from imgclust.errors import BadImageError, InputError


class ImageSource(ABC):
    """A finite collection of images.

    Subclasses set ``name`` and implement :meth:`__len__`, :meth:`read`, :meth:`ids` and
    :meth:`fingerprint`. ``labels`` (int64, shape (N,), -1 where unknown) and ``class_names``
    are ``None`` when the source has no labels.

    ``read(i)`` returns an ``(H, W, 3)`` uint8 RGB array or raises :class:`BadImageError`
    with a short human reason ("truncated file", "not an image", ...); it never modifies the
    underlying file.
    """

    name: str = "source"
    labels: np.ndarray | None = None
    class_names: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as (H, W, 3) uint8 RGB; raises BadImageError if it cannot be decoded."""

    @abstractmethod
    def ids(self) -> list[str]:
        """A stable, unique id per image: the relative path for files, ``"<split>/<index>"`` otherwise."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hex digest that changes whenever any image (or the selection of images) changes.

        Folders hash (relative path, size, mtime_ns) of every file; arrays hash their bytes.
        Used as part of the feature-cache key.
        """

    def read_many(self, indices: Sequence[int]) -> list[np.ndarray | BadImageError]:
        """Read several images; failed reads come back as the exception, not raised."""
        out: list[np.ndarray | BadImageError] = []
        for i in indices:
            try:
                out.append(self.read(int(i)))
            except BadImageError as e:
                out.append(e)
        return out

    def path(self, i: int) -> str | None:
        """Absolute file path of image ``i`` when it is a file on disk, else ``None``."""
        return None

    def describe(self) -> dict:
        """A JSON-able description recorded in run.json."""
        return {
            "name": self.name,
            "n_images": len(self),
            "has_labels": self.labels is not None,
            "n_classes": None if self.class_names is None else len(self.class_names),
            "fingerprint": self.fingerprint(),
        }


class ArraySource(ImageSource):
    """Images held in memory as one uint8 array of shape (N, H, W) or (N, H, W, C).

    Grayscale (C absent or 1) is repeated to RGB on read; C=4 drops alpha. Base class of the
    benchmark readers (CIFAR, MNIST, STL-10, digits, .npz).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        class_names: list[str] | None = None,
        name: str = "arrays",
        id_prefix: str = "",
    ) -> None:
        images = np.asarray(images)
        if images.ndim not in (3, 4) or len(images) == 0:
            raise InputError(
                f"{name}: expected images of shape (N, H, W) or (N, H, W, C) with N > 0, got {images.shape}"
            )
        self.nonfinite: dict[int, str] = {}
        if np.issubdtype(images.dtype, np.floating):
            bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1)
            if bad.any():  # skipped like an unreadable image; the scale ignores those values
                self.nonfinite = {int(i): "non-finite pixel values (NaN or inf)" for i in np.flatnonzero(bad)}
                images = np.where(np.isfinite(images), images, np.nan)
                if np.isnan(images).all():
                    raise InputError(f"{name}: every pixel value is NaN or inf")
        if images.dtype != np.uint8:
            images = _to_uint8(images)
        self.images = images
        if labels is not None:
            labels = np.asarray(labels).astype(np.int64).reshape(-1)
            if len(labels) != len(images):
                    raise InputError(f"{name}: {len(labels)} labels for {len(images)} images")
        self.labels = labels
        self.class_names = class_names
        self.name = name
        self._id_prefix = id_prefix
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> np.ndarray:
        bad = getattr(self, "nonfinite", None)
        if bad and i in bad:
            raise BadImageError(bad[i])
        return as_rgb(self.images[i])

    def ids(self) -> list[str]:
        return [f"{self._id_prefix}{i}" for i in range(len(self))]

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256()
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).data)
            if self.labels is not None:
                h.update(self.labels.tobytes())
            self._fp = h.hexdigest()
        return self._fp


def as_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> contiguous (H, W, 3) uint8."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] > 3:  # alpha or extra bands dropped
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale float images in [0, 1] (or any other range) and wide ints to uint8."""
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if lo >= 0.0 and hi <= 1.0:
            return (np.nan_to_num(a) * 255.0 + 0.5).astype(np.uint8)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return ((np.nan_to_num(a) - lo) * scale + 0.5).astype(np.uint8)
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((a.astype(np.float64) - lo) * scale + 0.5).astype(np.uint8)


class SubsetSource(ImageSource):
    """A view on some images of another source (e.g. ``--limit 1000``: a seeded random sample)."""

    def __init__(self, base: ImageSource, indices: Sequence[int], name: str | None = None) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise InputError(f"{base.name}: empty subset")
        self.name = name or f"{base.name}[{len(self.indices)}]"
        self.labels = None if base.labels is None else base.labels[self.indices]
        self.class_names = base.class_names
        self._fp: str | None = None

    @classmethod
    def sample(cls, base: ImageSource, n: int, seed: int = 0) -> ImageSource:
        """``n`` images drawn at random (without replacement, order kept); the base if n >= len."""
        if n >= len(base):
            return base
        rng = np.random.default_rng(seed)
        return cls(base, np.sort(rng.choice(len(base), size=n, replace=False)))

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> np.ndarray:
        return self.base.read(int(self.indices[i]))

    def ids(self) -> list[str]:
        base_ids = self.base.ids()
        return [base_ids[j] for j in self.indices]

    def path(self, i: int) -> str | None:
        return self.base.path(int(self.indices[i]))

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256(self.base.fingerprint().encode())
            h.update(self.indices.tobytes())
            self._fp = h.hexdigest()
        return self._fp
