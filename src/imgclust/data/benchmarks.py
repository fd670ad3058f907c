"""Readers for the standard benchmark layouts, from a LOCAL path (nothing is downloaded).

* CIFAR-10 / CIFAR-100 "python version" pickles (``cifar-10-batches-py``, ``cifar-100-python``),
  read with a restricted unpickler that only rebuilds plain containers and numpy arrays;
* MNIST / Fashion-MNIST idx files (raw or ``.gz``);
* STL-10 binaries (``stl10_binary``);
* scikit-learn's bundled 8x8 digits (always available offline).

Every reader returns a :class:`BenchmarkSource` (an :class:`ArraySource`) with labels,
class names, and ids ``"<split>/<index>"``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np

from imgclust.data.base import ArraySource
from imgclust.errors import InputError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "BenchmarkSource",
    "cifar10",
    "cifar100",
    "digits",
    "find_benchmark_dirs",
    "load_pickle_safely",
    "mnist",
    "read_idx",
    "stl10",
]

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_BASIC_SPLITS = ("train", "test", "all")
_STL10_SPLITS = ("train", "test", "all", "unlabeled", "train+unlabeled")
_HASH_LIMIT = 1 << 30  # above this many image bytes, fingerprint from file stats instead


class BenchmarkSource(ArraySource):
    """An in-memory benchmark split with provenance.

    Attributes:
        dataset: ``"cifar10"``, ``"cifar100"``, ``"mnist"``, ``"fashion-mnist"``, ``"stl10"``
            or ``"digits"``.
        split: the requested split.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        class_names: list[str] | None,
        *,
        dataset: str,
        split: str,
        parts: list[tuple[str, int]],
        files: list[Path] | None = None,
        extra: str = "",
    ) -> None:
        super().__init__(images, labels=labels, class_names=class_names, name=f"{dataset}:{split}")
        self.dataset = dataset
        self.split = split
        self._parts = parts
        self._files = files or []
        self._extra = extra

    def ids(self) -> list[str]:
        out: list[str] = []
        for part, n in self._parts:
            out.extend(f"{part}/{i}" for i in range(n))
        return out

    def fingerprint(self) -> str:
        """Hash of the pixels and labels; for very large splits, of the files' stats."""
        if self.images.nbytes <= _HASH_LIMIT or not self._files:
            return super().fingerprint()
        h = hashlib.sha256(f"{self.dataset}\0{self.split}\0{self._extra}".encode())
        for f in self._files:
            st = os.stat(f)
            h.update(f"{f.name}\0{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        d = super().describe()
        d.update(kind=self.dataset, split=self.split)
        return d


def _check_split(split: str, allowed: tuple[str, ...], dataset: str) -> str:
    if split not in allowed:
        raise InputError(f"unknown split {split!r} for {dataset}; use one of: {', '.join(allowed)}")
    return split


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} file missing: {path}")
    return path


# --------------------------------------------------------------------------- pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only builtin containers/scalars and numpy arrays."""

    _BUILTINS = frozenset({"dict", "list", "tuple", "str", "bytes", "bytearray", "int", "float", "bool"})

    def find_class(self, module: str, name: str):
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return obj


def _allowed_global(module: str, name: str):
    import builtins

    if module in ("builtins", "__builtin__") and name in _RestrictedUnpickler._BUILTINS:
        return getattr(builtins, name)
    if module == "_codecs" and name == "encode":  # bytes written by Python 3 at protocol < 3
        import codecs

        return codecs.encode
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(_np_core("multiarray"), name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return getattr(_np_core("numeric"), name)
    return None


def _np_core(sub: str):
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{sub}")


def load_pickle_safely(path: str | Path) -> object:
    """Load an official CIFAR pickle (``encoding="bytes"``) with the restricted unpickler.

    Raises:
        InputError: the file is missing/unreadable, corrupt, or references anything other
            than plain data and numpy arrays (a malicious pickle is refused, not run).
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if "refusing" in str(e):
            raise InputError(
                f"{p}: {e} (only plain data and numpy arrays are allowed in benchmark pickles)"
            ) from e
        raise InputError(f"{p} is not a valid pickle file: {e}") from e
    except FileNotFoundError as e:
        raise InputError(f"file missing: {p}") from e
    except PermissionError as e:
        raise InputError(f"permission denied: {p}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise InputError(f"{p} is not a valid pickle file: {type(e).__name__}: {e}") from e


def _get(d: object, key: str, p: Path):
    if not isinstance(d, dict):
        raise InputError(f"{p}: expected a dict in the pickle, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise InputError(f"{p}: key {key!r} missing (not a CIFAR pickle?)")


def _names(values: object) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]  # type: ignore[union-attr]


def _cifar_images(data: object, p: Path) -> np.ndarray:
    a = np.asarray(data)
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != 3072:
        raise InputError(f"{p}: expected uint8 data of shape (N, 3072), got {a.dtype} {a.shape}")
    # Each row: 1024 red, 1024 green, 1024 blue values, row-major 32x32.
    return a.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_dir(root: Path, inner: str, marker: str) -> Path:
    root = Path(root)
    if (root / marker).is_file():
        return root
    if (root / inner / marker).is_file():
        return root / inner
    raise InputError(f"no {inner} files in {root} (expected {marker} there or in {inner}/)")


def cifar10(root: str | Path, split: str = "train") -> BenchmarkSource:
    """CIFAR-10 from ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

    ``root`` may be that folder or its parent. Splits: train (50,000), test (10,000), all.
    """
    _check_split(split, _BASIC_SPLITS, "cifar10")
    d = _cifar_dir(Path(root), "cifar-10-batches-py", "batches.meta")
    meta = d / "batches.meta"
    class_names = _names(_get(load_pickle_safely(meta), "label_names", meta))
    groups = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
    wanted = ["train", "test"] if split == "all" else [split]
    imgs, labs, parts, files = [], [], [], [meta]
    for part in wanted:
        n = 0
        for fname in groups[part]:
            p = _need(d / fname, "CIFAR-10")
            obj = load_pickle_safely(p)
            x = _cifar_images(_get(obj, "data", p), p)
            y = np.asarray(_get(obj, "labels", p), dtype=np.int64)
            if len(y) != len(x):
                raise InputError(f"{p}: {len(y)} labels for {len(x)} images")
            imgs.append(x)
            labs.append(y)
            files.append(p)
            n += len(x)
        parts.append((part, n))
    images = np.ascontiguousarray(np.concatenate(imgs))
    return BenchmarkSource(
        images, np.concatenate(labs), class_names, dataset="cifar10", split=split, parts=parts, files=files
    )


def cifar100(root: str | Path, split: str = "train", coarse: bool = False) -> BenchmarkSource:
    """CIFAR-100 from ``cifar-100-python`` (``train``, ``test``, ``meta``).

    ``coarse=True`` gives the 20 super-classes (``coarse_labels``), the usual setting of
    deep-clustering papers ("CIFAR-100-20"); otherwise the 100 fine classes.
    """
    _check_split(split, _BASIC_SPLITS, "cifar100")
    d = _cifar_dir(Path(root), "cifar-100-python", "meta")
    meta = d / "meta"
    key = "coarse" if coarse else "fine"
    class_names = _names(_get(load_pickle_safely(meta), f"{key}_label_names", meta))
    wanted = ["train", "test"] if split == "all" else [split]
    imgs, labs, parts, files = [], [], [], [meta]
    for part in wanted:
        p = _need(d / part, "CIFAR-100")
        obj = load_pickle_safely(p)
        x = _cifar_images(_get(obj, "data", p), p)
        y = np.asarray(_get(obj, f"{key}_labels", p), dtype=np.int64)
        if len(y) != len(x):
            raise InputError(f"{p}: {len(y)} labels for {len(x)} images")
        imgs.append(x)
        labs.append(y)
        files.append(p)
        parts.append((part, len(x)))
    images = np.ascontiguousarray(np.concatenate(imgs))
    return BenchmarkSource(
        images,
        np.concatenate(labs),
        class_names,
        dataset="cifar100",
        split=split,
        parts=parts,
        files=files,
        extra=f"coarse={coarse}",
    )


# --------------------------------------------------------------------------- idx (MNIST)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (raw or gzipped) using its header: ``0 0 <dtype> <ndim>`` + dims.

    Raises:
        InputError: unreadable, bad magic, or size not matching the header.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError as e:
        raise InputError(f"file missing: {p}") from e
    except PermissionError as e:
        raise InputError(f"permission denied: {p}") from e
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read {p}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise InputError(f"{p} is not an idx file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"{p}: truncated idx header")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise InputError(f"{p}: truncated idx file ({len(raw) - offset} data bytes for shape {dims})")
    a = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return a.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def _find_idx(d: Path, prefix: str, kind: str) -> Path | None:
    """``train-images-idx3-ubyte`` / ``train-images.idx3-ubyte``, optionally ``.gz``."""
    ndim = 3 if kind == "images" else 1
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in ("", ".gz"):
            if (d / (stem + suffix)).is_file():
                return d / (stem + suffix)
    return None


def _is_fashion(d: Path) -> bool:
    """The folder (or, for torchvision's ``FashionMNIST/raw``, its parent) names fashion."""
    d = d.resolve()
    names = [d.name, d.parent.name] if d.name.lower() == "raw" else [d.name]
    return any("fashion" in n.lower() for n in names)


def mnist(root: str | Path, split: str = "train", fashion: bool | None = None) -> BenchmarkSource:
    """MNIST or Fashion-MNIST from idx files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``).

    ``root`` may hold the files directly or in a ``raw/`` sub-folder (torchvision layout).
    ``fashion=None`` detects Fashion-MNIST from the folder name (containing "fashion"),
    giving its class names; MNIST classes are ``"0"`` .. ``"9"``.
    """
    _check_split(split, _BASIC_SPLITS, "mnist")
    d = Path(root)
    if (
        _find_idx(d, "train", "images") is None
        and _find_idx(d, "t10k", "images") is None
        and (d / "raw").is_dir()
    ):
        d = d / "raw"
    if fashion is None:
        fashion = _is_fashion(d)
    dataset = "fashion-mnist" if fashion else "mnist"
    prefixes = {"train": "train", "test": "t10k"}
    wanted = ["train", "test"] if split == "all" else [split]
    imgs, labs, parts, files = [], [], [], []
    for part in wanted:
        pi = _find_idx(d, prefixes[part], "images")
        pl = _find_idx(d, prefixes[part], "labels")
        if pi is None or pl is None:
            raise InputError(
                f"{dataset} {part} split missing in {d}: need {prefixes[part]}-images-idx3-ubyte[.gz] "
                f"and {prefixes[part]}-labels-idx1-ubyte[.gz]"
            )
        x = read_idx(pi)
        y = read_idx(pl)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise InputError(f"{d}: idx shapes do not match ({pi.name}: {x.shape}, {pl.name}: {y.shape})")
        imgs.append(x)
        labs.append(y.astype(np.int64))
        files += [pi, pl]
        parts.append((part, len(x)))
    images = np.concatenate(imgs) if len(imgs) > 1 else imgs[0]
    class_names = list(FASHION_MNIST_CLASSES) if fashion else [str(k) for k in range(10)]
    return BenchmarkSource(
        images, np.concatenate(labs), class_names, dataset=dataset, split=split, parts=parts, files=files
    )


# --------------------------------------------------------------------------- STL-10


def _stl10_dir(root: Path) -> Path:
    for d in (root, root / "stl10_binary"):
        if any((d / f).is_file() for f in ("train_X.bin", "test_X.bin", "unlabeled_X.bin")):
            return d
    raise InputError(f"no STL-10 binaries in {root} (expected train_X.bin etc. there or in stl10_binary/)")


def _stl10_images(p: Path) -> np.ndarray:
    """Memory-mapped (N, 96, 96, 3) view of an STL-10 ``*_X.bin`` (column-major per channel)."""
    size = p.stat().st_size
    per = 3 * 96 * 96
    if size == 0 or size % per:
        raise InputError(f"{p}: size {size} is not a multiple of one 96x96x3 image ({per} bytes)")
    raw = np.memmap(p, dtype=np.uint8, mode="r", shape=(size // per, 3, 96, 96))
    # As the official loader: (N, C, W, H) stored -> transpose to (N, H, W, C).
    return raw.transpose(0, 3, 2, 1)


def stl10(root: str | Path, split: str = "train") -> BenchmarkSource:
    """STL-10 from ``stl10_binary`` (``train_X.bin``, ``train_y.bin``, ``test_*``, ``unlabeled_X.bin``).

    Splits: train (5,000), test (8,000), all (train + test), unlabeled (100,000, label -1),
    train+unlabeled. Labels 1..10 in the files become 0..9. Single-file splits stay
    memory-mapped; combined splits are concatenated in memory (train+unlabeled: ~2.9 GB).
    """
    _check_split(split, _STL10_SPLITS, "stl10")
    d = _stl10_dir(Path(root))
    names_file = d / "class_names.txt"
    if names_file.is_file():
        class_names = [ln.strip() for ln in names_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        class_names = list(_STL10_CLASSES)
    wanted = {
        "train": ["train"],
        "test": ["test"],
        "all": ["train", "test"],
        "unlabeled": ["unlabeled"],
        "train+unlabeled": ["train", "unlabeled"],
    }[split]
    imgs, labs, parts, files = [], [], [], []
    for part in wanted:
        px = _need(d / f"{part}_X.bin", "STL-10")
        x = _stl10_images(px)
        files.append(px)
        if part == "unlabeled":
            y = np.full(len(x), -1, dtype=np.int64)
        else:
            py = _need(d / f"{part}_y.bin", "STL-10")
            y = np.fromfile(py, dtype=np.uint8).astype(np.int64) - 1
            files.append(py)
            if len(y) != len(x):
                raise InputError(f"{py}: {len(y)} labels for {len(x)} images in {px.name}")
            if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
                raise InputError(f"{py}: labels must lie in 1..{len(class_names)}")
        imgs.append(x)
        labs.append(y)
        parts.append((part, len(x)))
    images = np.concatenate(imgs) if len(imgs) > 1 else imgs[0]
    return BenchmarkSource(
        images, np.concatenate(labs), class_names, dataset="stl10", split=split, parts=parts, files=files
    )


# --------------------------------------------------------------------------- digits


def digits(split: str = "train") -> BenchmarkSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), values 0..16 -> 0..255.

    The set has a single split: ``"train"`` and ``"all"`` both give all 1,797 images.
    """
    if split not in ("train", "all"):
        raise InputError(
            f"digits has a single split of 1,797 images; use split 'train' or 'all', not {split!r}"
        )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return BenchmarkSource(
        images,
        bunch.target.astype(np.int64),
        [str(k) for k in range(10)],
        dataset="digits",
        split=split,
        parts=[("train", len(images))],
    )


# --------------------------------------------------------------------------- detection


def detect_benchmark(d: Path) -> str | None:
    """The benchmark layout stored directly in folder ``d``, or ``None``.

    Returns ``"cifar10"``, ``"cifar100"``, ``"mnist"`` (includes Fashion-MNIST) or ``"stl10"``.
    """
    if not d.is_dir():
        return None
    if (d / "batches.meta").is_file() and any((d / f).is_file() for f in ("data_batch_1", "test_batch")):
        return "cifar10"
    if (d / "meta").is_file() and any((d / f).is_file() for f in ("train", "test")):
        return "cifar100"
    if any(_find_idx(x, pre, "images") for x in (d, d / "raw") for pre in ("train", "t10k")):
        return "mnist"
    if any((d / f).is_file() for f in ("train_X.bin", "test_X.bin", "unlabeled_X.bin")):
        return "stl10"
    return None


def find_benchmark_dirs(root: Path) -> list[tuple[str, Path]]:
    """Benchmark layouts in ``root`` itself, else in its immediate sub-folders."""
    kind = detect_benchmark(root)
    if kind is not None:
        return [(kind, root)]
    found: list[tuple[str, Path]] = []
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for sub in subs:
        k = detect_benchmark(sub)
        if k is not None:
            found.append((k, sub))
    return found
