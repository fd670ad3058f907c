"""``FolderSource``: every image file below a directory, optionally labelled by class folder.

Layout conventions follow torchvision's ``ImageFolder``: ``root/<class>/.../<image>``, class
names sorted, label = index of the first sub-folder level. Class-per-folder benchmark sets
(UC Merced, EuroSAT RGB, AID, NWPU-RESISC45, ...) are just this with labels.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgclust.data.base import ImageSource
from imgclust.data.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_image,
    is_image_name,
)
from imgclust.errors import InputError

__all__ = ["LABEL_MODES", "SPLIT_NAMES", "FolderSource", "labels_from_relpaths"]

#: Accepted values of the ``labels`` argument of folder-like sources.
LABEL_MODES: tuple[str, ...] = ("auto", "folder", "none")

#: First-level folder names recognised as dataset splits rather than classes (see
#: :func:`labels_from_relpaths`).
SPLIT_NAMES: frozenset[str] = frozenset(
    {"train", "test", "val", "valid", "validation", "dev", "eval", "unlabeled", "unlabelled"}
)

# Directories never scanned (besides hidden ones): macOS resource forks.
_SKIP_DIRS = frozenset({"__MACOSX"})


def check_label_mode(labels: str) -> str:
    """Validate a ``labels`` argument; raises InputError listing the allowed values."""
    if labels not in LABEL_MODES:
        raise InputError(f"unknown labels mode {labels!r}; use one of: {', '.join(LABEL_MODES)}")
    return labels


def extensions_hint() -> str:
    """The looked-for extensions, for "no images found" messages."""
    return ", ".join(IMAGE_EXTENSIONS)


def labels_from_relpaths(
    relpaths: Sequence[str], mode: str, where: str
) -> tuple[np.ndarray | None, list[str] | None, str]:
    """Labels from the class folder of each POSIX relative path.

    Rules (``mode``):

    * ``"none"``: no labels.
    * ``"folder"``: label = first directory level (torchvision ``ImageFolder``); every
      image must lie inside a sub-folder, otherwise InputError.
    * ``"auto"``: the first level is used only when every image lies inside a first-level
      sub-folder and there are at least 2 of them. If all first-level folders are split
      names (``train``, ``test``, ``val``, ...) and every image lies one level deeper
      (``split/class/file``), the second level is used instead, so that an unsplit
      ``train/`` + ``test/`` tree is labelled by class, not by split.

    Returns ``(labels, class_names, labels_from)`` with ``labels_from`` one of
    ``"none"``, ``"folder"``, ``"split/folder"``; class names are sorted, and only folders
    that contain images become classes.
    """
    check_label_mode(mode)
    if mode == "none" or not relpaths:
        return None, None, "none"
    parts = [p.split("/") for p in relpaths]
    loose = [p for p, ps in zip(relpaths, parts, strict=True) if len(ps) < 2]
    if mode == "folder":
        if loose:
            raise InputError(
                f"labels='folder' needs every image inside a class sub-folder, but {len(loose)} "
                f"image(s) lie directly in {where} (e.g. {loose[0]})"
            )
        return (*_index(ps[0] for ps in parts), "folder")
    # auto
    if loose:
        return None, None, "none"
    first = {ps[0] for ps in parts}
    if len(first) < 2:
        return None, None, "none"
    if {f.lower() for f in first} <= SPLIT_NAMES and all(len(ps) >= 3 for ps in parts):
        second = {ps[1] for ps in parts}
        if len(second) >= 2:
            return (*_index(ps[1] for ps in parts), "split/folder")
        return None, None, "none"
    return (*_index(ps[0] for ps in parts), "folder")


def _index(names_iter) -> tuple[np.ndarray, list[str]]:
    names = list(names_iter)
    classes = sorted(set(names))
    lookup = {c: k for k, c in enumerate(classes)}
    return np.fromiter((lookup[n] for n in names), dtype=np.int64, count=len(names)), classes


def _is_symlink(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _sort_key(rel: str) -> list[str]:
    return rel.split("/")


class FolderSource(ImageSource):
    """All images below ``root`` (recursive), sorted by relative path.

    Args:
        root: the folder.
        labels: ``"auto"`` | ``"folder"`` | ``"none"``; see :func:`labels_from_relpaths`.
        follow_symlinks: descend into symlinked directories (loops are detected and skipped).
            Symlinked *files* are always included, as ``os.walk`` lists them; image-named
            links that are dangling or loop are included too and fail to read, so they are
            listed as skipped with a reason.
        max_pixels: decompression-bomb cap passed to :func:`decode_image`.

    Hidden files and folders (name starting with ``.``) and ``__MACOSX`` are skipped;
    extensions (:data:`IMAGE_EXTENSIONS`) match case-insensitively. ``ids()`` are POSIX
    relative paths; ``path(i)`` is the absolute path.

    Raises:
        InputError: ``root`` is missing, not a folder, unreadable, or holds no images.
    """

    def __init__(
        self,
        root: str | Path,
        labels: str = "auto",
        follow_symlinks: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        check_label_mode(labels)
        root_path = Path(os.path.abspath(Path(root).expanduser()))
        if not root_path.exists():
            raise InputError(f"source folder not found: {root_path}")
        if not root_path.is_dir():
            raise InputError(f"{root_path} is not a folder")
        self.root = root_path
        self.label_mode = labels
        self.follow_symlinks = bool(follow_symlinks)
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        rels = self._scan()
        if not rels:
            raise InputError(f"no images found in {root_path} (looked for {extensions_hint()})")
        self._rel = rels
        self.labels, self.class_names, self.labels_from = labels_from_relpaths(rels, labels, str(root_path))
        self.name = root_path.name or str(root_path)

    # ------------------------------------------------------------------ scanning

    def _scan(self) -> list[str]:
        """Iterative, sorted, loop-safe walk returning POSIX paths relative to root."""
        out: list[str] = []
        try:
            st = os.stat(self.root)
        except PermissionError as e:
            raise InputError(f"permission denied: {self.root}") from e
        visited = {(st.st_dev, st.st_ino)}
        stack: list[tuple[str, str]] = [(str(self.root), "")]
        while stack:
            dir_abs, dir_rel = stack.pop()
            try:
                with os.scandir(dir_abs) as it:
                    entries = list(it)
            except PermissionError as e:
                if not dir_rel:
                    raise InputError(f"permission denied: {self.root}") from e
                continue  # an unreadable sub-folder is skipped
            except OSError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name in _SKIP_DIRS:
                    continue
                rel = f"{dir_rel}{name}"
                try:
                    is_link = entry.is_symlink()
                    if entry.is_dir(follow_symlinks=True):
                        if is_link and not self.follow_symlinks:
                            continue
                        dst = entry.stat(follow_symlinks=True)
                        key = (dst.st_dev, dst.st_ino)
                        if key in visited:
                            continue  # symlink loop or a folder already scanned
                        visited.add(key)
                        stack.append((entry.path, rel + "/"))
                    elif is_image_name(name) and (entry.is_file(follow_symlinks=True) or is_link):
                        # A dangling image-named symlink is kept: reading it fails with a
                        # reason ("file not found"), so it is counted and listed, not lost.
                        out.append(rel)
                except OSError:
                    # A symlink loop (ELOOP) named like an image is kept for the same reason.
                    if is_image_name(name) and _is_symlink(entry):
                        out.append(rel)
                    continue  # vanished file, unreadable entry
        out.sort(key=_sort_key)
        return out

    # ------------------------------------------------------------------ ImageSource API

    def __len__(self) -> int:
        return len(self._rel)

    def read(self, i: int) -> np.ndarray:
        return decode_image(self.path(i), self.max_pixels)

    def ids(self) -> list[str]:
        return list(self._rel)

    def path(self, i: int) -> str:
        return os.path.join(str(self.root), *self._rel[i].split("/"))

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, mtime_ns) of every image plus the label mode
        (and the pixel cap when it is not the default).

        Computed afresh on each call (one ``stat`` per file), so edits made after the scan
        are seen.
        """
        h = hashlib.sha256()
        h.update(f"folder\0labels={self.label_mode}\0".encode())
        if self.max_pixels != DEFAULT_MAX_PIXELS:  # another cap skips other images
            h.update(f"max_pixels={self.max_pixels}\0".encode())
        root = str(self.root)
        for rel in self._rel:
            try:
                st = os.stat(os.path.join(root, rel))
                meta = f"{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else "not-a-file"
            except OSError:
                meta = "missing"
            h.update(f"{rel}\0{meta}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def describe(self) -> dict:
        d = super().describe()
        d.update(kind="folder", root=str(self.root), labels_from=self.labels_from)
        return d
