"""One image file as a source: ``imgclust predict MODEL photo.jpg`` (issue 24: it was refused).

A :class:`~imgclust.data.folder.FolderSource` of exactly one file (its folder as the root,
no labels), so reading, ids, paths and the fingerprint behave as for a folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgclust.data.decode import DEFAULT_MAX_PIXELS
from imgclust.data.folder import FolderSource
from imgclust.errors import InputError


class ImageFileSource(FolderSource):
    """A single image file (``len == 1``); ``ids()`` is its file name."""

    def __init__(self, path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:  # noqa: D107
        p = Path(os.path.abspath(Path(path).expanduser()))
        if not p.is_file():
            raise InputError(f"image file not found: {p}")
        self.root = p.parent
        self.label_mode = "none"
        self.follow_symlinks = False
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        self._rel = [p.name]
        self.labels, self.class_names, self.labels_from = None, None, "none"
        self.name = p.name

    def describe(self) -> dict:
        d = super().describe()
        d.update(kind="file", path=self.path(0))
        return d


__all__ = ["ImageFileSource"]
