"""Image sources: where pixels come from.

:func:`open_source` turns what the user typed (a folder, an archive, an ``.npz`` file, a
benchmark directory, or the name ``digits``) into an :class:`ImageSource`.
:func:`available_datasets` lists what can be read, for ``imgclust datasets``.
"""

from __future__ import annotations

from pathlib import Path

from imgclust.data.archive import ArchiveSource, is_archive_name
from imgclust.data.arrays import NpzSource
from imgclust.data.base import ArraySource, ImageSource, as_rgb
from imgclust.data.benchmarks import (
    BenchmarkSource,
    cifar10,
    cifar100,
    detect_benchmark,
    digits,
    find_benchmark_dirs,
    mnist,
    stl10,
)
from imgclust.data.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_image,
    is_image_name,
)
from imgclust.data.folder import LABEL_MODES, FolderSource, check_label_mode
from imgclust.errors import InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "LABEL_MODES",
    "ArchiveSource",
    "ArraySource",
    "BenchmarkSource",
    "FolderSource",
    "ImageSource",
    "NpzSource",
    "as_rgb",
    "available_datasets",
    "cifar10",
    "cifar100",
    "decode_image",
    "digits",
    "mnist",
    "open_source",
    "stl10",
]

#: Values accepted by ``open_source(kind=...)``.
KINDS: tuple[str, ...] = (
    "auto",
    "folder",
    "archive",
    "npz",
    "cifar10",
    "cifar100",
    "mnist",
    "fashion-mnist",
    "stl10",
    "digits",
)
_BENCHMARK_KINDS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "stl10")
_ANOTHER_TYPE = (
    "give a folder of images, an archive (.tar, .tar.gz, .zip), an .npz array file, or a benchmark directory"
)


def open_source(
    spec: str | Path,
    *,
    split: str | None = None,
    kind: str = "auto",
    labels: str = "auto",
    coarse: bool = False,
    max_pixels: int | None = None,
) -> ImageSource:
    """Open an image source from a path or the name ``digits``.

    Resolution with ``kind="auto"``:

    * ``"digits"`` (the literal name) -> scikit-learn's bundled digits (use ``./digits`` for
      a folder of that name);
    * an existing folder -> a CIFAR-10/100 pickle, MNIST/Fashion-MNIST idx or STL-10 binary
      layout when found in it or in one of its immediate sub-folders (e.g. a folder holding
      ``cifar-10-batches-py/``), otherwise a folder of images (:class:`FolderSource`);
    * ``*.npz`` -> :class:`NpzSource`; ``*.tar``, ``*.tar.gz``/``*.tgz``, ``*.tar.bz2``,
      ``*.tar.xz``, ``*.zip`` -> :class:`ArchiveSource`.

    Args:
        spec: path or ``"digits"``.
        split: for benchmarks ``"train"`` (default), ``"test"``, ``"all"`` (STL-10 also
            ``"unlabeled"``, ``"train+unlabeled"``). For folders and archives, ``<root>/<split>``
            becomes the root (e.g. ``split="test"`` on the CIFAR-10 JPEG tar); ``None`` or
            ``"all"`` uses the whole tree. ``.npz`` files have no splits.
        kind: force a reader: one of :data:`KINDS`.
        labels: ``"auto"`` | ``"folder"`` | ``"none"``. For folders/archives see
            :class:`FolderSource`; ``"none"`` also drops the labels of benchmark/npz sources.
        coarse: CIFAR-100 only: the 20 super-classes instead of 100 fine classes.
        max_pixels: per-image pixel cap for decoded files (default
            :data:`DEFAULT_MAX_PIXELS`).

    Raises:
        InputError: missing path, unsupported file, unknown kind/split/labels, no images.
    """
    if kind not in KINDS:
        raise InputError(f"unknown source kind {kind!r}; use one of: {', '.join(KINDS)}")
    check_label_mode(labels)
    spec_str = str(spec)
    cap = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)

    if kind == "digits" or (kind == "auto" and spec_str == "digits"):
        _no_coarse(coarse, "digits")
        return _apply_labels(digits(split or "train"), labels)

    p = Path(spec_str).expanduser()
    if not p.exists():
        raise InputError(_missing_message(p, spec_str))

    if kind == "auto":
        kind, p = _detect(p)

    if coarse and kind != "cifar100":
        _no_coarse(coarse, kind)

    if kind == "image":
        from imgclust.data.single import ImageFileSource

        return ImageFileSource(p, max_pixels=cap)
    if kind == "folder":
        if not p.is_dir():
            raise InputError(f"{p} is not a folder")
        root = _split_root(p, split)
        return FolderSource(root, labels=labels, max_pixels=cap)
    if kind == "archive":
        if not p.is_file():
            raise InputError(f"{p} is not an archive file")
        subdir = None if split in (None, "all") else split
        return ArchiveSource(p, subdir=subdir, labels=labels, max_pixels=cap)
    if kind == "npz":
        if not p.is_file():
            raise InputError(f"{p} is not an .npz file")
        if split not in (None, "all"):
            raise InputError(f"{p.name}: .npz files have no splits; omit the split (got {split!r})")
        return _apply_labels(NpzSource(p), labels)

    # benchmark layouts
    if not p.is_dir():
        raise InputError(f"{kind} is read from a folder, but {p} is a file")
    d = _benchmark_dir(p, "mnist" if kind == "fashion-mnist" else kind)
    sp = split or "train"
    if kind == "cifar10":
        src: ImageSource = cifar10(d, sp)
    elif kind == "cifar100":
        src = cifar100(d, sp, coarse=coarse)
    elif kind == "mnist":
        src = mnist(d, sp)
    elif kind == "fashion-mnist":
        src = mnist(d, sp, fashion=True)
    else:
        src = stl10(d, sp)
    return _apply_labels(src, labels)


def _detect(p: Path) -> tuple[str, Path]:
    """(kind, path) for ``kind="auto"``."""
    if p.is_dir():
        found = find_benchmark_dirs(p)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listing = ", ".join(f"{sub.name} ({k})" for k, sub in found)
            raise InputError(f"{p} holds several benchmark folders: {listing}; give one of them")
        return "folder", p
    if not p.is_file():
        raise InputError(f"{p} is neither a regular file nor a folder")
    low = p.name.lower()
    if low.endswith(".npz"):
        return "npz", p
    if is_archive_name(low):
        return "archive", p
    if is_image_name(low):
        return "image", p  # one image: predict on it (a K >= 2 clustering of it fails on K)
    raise InputError(f"{p} is a file of another type; {_ANOTHER_TYPE}")


def _benchmark_dir(p: Path, base_kind: str) -> Path:
    """``p`` itself when it holds the layout, else its only matching sub-folder."""
    if detect_benchmark(p) == base_kind:
        return p
    matches = [sub for k, sub in find_benchmark_dirs(p) if k == base_kind]
    if len(matches) == 1:
        return matches[0]
    return p  # the reader raises a precise "files missing" error


def _split_root(p: Path, split: str | None) -> Path:
    if split in (None, "all"):
        return p
    if (p / split).is_dir():
        return p / split
    subs = sorted(x.name for x in p.iterdir() if x.is_dir() and not x.name.startswith("."))[:10]
    have = f" (sub-folders: {', '.join(subs)})" if subs else ""
    raise InputError(f"no '{split}' sub-folder in {p}{have}; omit the split to use the whole folder")


def _apply_labels(src: ImageSource, labels: str) -> ImageSource:
    if labels == "none":
        src.labels = None
        src.class_names = None
    return src


def _no_coarse(coarse: bool, kind: str) -> None:
    if coarse:
        raise InputError(f"coarse (20 super-classes) applies only to CIFAR-100, not to {kind}")


def _missing_message(p: Path, spec: str) -> str:
    name = spec.lower().replace("_", "-")
    known = {d["name"]: d for d in available_datasets()}
    if name in known and known[name]["kind"] in _BENCHMARK_KINDS:
        return (
            f"source not found: {p}; {name} is read from a local folder "
            f"({known[name]['how_to_get']}) - see `imgclust datasets`"
        )
    return f"source not found: {p}"


def available_datasets() -> list[dict]:
    """What ``open_source`` can read, for an ``imgclust datasets`` command.

    Each entry: ``name``, ``kind`` (the ``kind=`` value), ``description``, ``how_to_get``,
    ``splits`` and ``bundled`` (True when usable with no files at all).
    """
    return [
        {
            "name": "digits",
            "kind": "digits",
            "description": "scikit-learn's 8x8 handwritten digits: 1,797 grayscale images, 10 classes",
            "how_to_get": "bundled with scikit-learn; open it by the name 'digits'",
            "splits": ["train"],
            "bundled": True,
        },
        {
            "name": "cifar10",
            "kind": "cifar10",
            "description": "CIFAR-10: 60,000 32x32 colour images, 10 classes (50,000 train / 10,000 test)",
            "how_to_get": (
                "download and extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
                "then give the cifar-10-batches-py folder (or its parent)"
            ),
            "splits": ["train", "test", "all"],
            "bundled": False,
        },
        {
            "name": "cifar100",
            "kind": "cifar100",
            "description": (
                "CIFAR-100: 60,000 32x32 colour images, 100 classes or 20 super-classes "
                "(--coarse, 'CIFAR-100-20')"
            ),
            "how_to_get": (
                "download and extract cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
                "then give the cifar-100-python folder (or its parent)"
            ),
            "splits": ["train", "test", "all"],
            "bundled": False,
        },
        {
            "name": "mnist",
            "kind": "mnist",
            "description": "MNIST: 70,000 28x28 handwritten digits, 10 classes (60,000 train / 10,000 test)",
            "how_to_get": "the four idx files (train-images-idx3-ubyte.gz, ...) from an MNIST mirror, in one folder",
            "splits": ["train", "test", "all"],
            "bundled": False,
        },
        {
            "name": "fashion-mnist",
            "kind": "fashion-mnist",
            "description": "Fashion-MNIST: 70,000 28x28 grayscale clothing images, 10 classes",
            "how_to_get": (
                "the four idx .gz files from https://github.com/zalandoresearch/fashion-mnist, or "
                "`apt-get install dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)"
            ),
            "splits": ["train", "test", "all"],
            "bundled": False,
        },
        {
            "name": "stl10",
            "kind": "stl10",
            "description": "STL-10: 96x96 colour images, 10 classes (5,000 train / 8,000 test / 100,000 unlabeled)",
            "how_to_get": (
                "download and extract stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/, "
                "then give the stl10_binary folder (or its parent)"
            ),
            "splits": ["train", "test", "all", "unlabeled", "train+unlabeled"],
            "bundled": False,
        },
        {
            "name": "image folder",
            "kind": "folder",
            "description": "any folder of images (jpg, png, bmp, gif, tif, webp, ...), searched recursively; "
            "class sub-folders give labels (ImageFolder layout: UC Merced, EuroSAT RGB, AID, NWPU-RESISC45, ...)",
            "how_to_get": "your own images, or a class-per-folder benchmark extracted to disk",
            "splits": ["<sub-folder name>", "all"],
            "bundled": False,
        },
        {
            "name": "archive",
            "kind": "archive",
            "description": "a .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz or .zip of images, read without extracting "
            "(e.g. a CIFAR-10 JPEG tar with train/<class>/ and test/<class>/)",
            "how_to_get": "any archive of an image folder",
            "splits": ["<top-level folder name>", "all"],
            "bundled": False,
        },
        {
            "name": "npz arrays",
            "kind": "npz",
            "description": "a NumPy .npz with 'images' (N,H,W[,C] or N,C,H,W) and optional 'labels', 'class_names'",
            "how_to_get": "np.savez('x.npz', images=..., labels=...)",
            "splits": [],
            "bundled": False,
        },
    ]
