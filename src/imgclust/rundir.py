"""Run and model directories, and atomic writes.

Every file imgclust writes goes to a temporary name in the same directory and is renamed
into place (``os.replace`` is atomic on POSIX), so a crash never leaves a half-written
``assignments.csv`` or ``run.json`` that a later step would trust.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a file should get the umask's mode, as open() does
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        from imgclust.diskspace import disk_full, is_no_space

        if is_no_space(e):  # ENOSPC/EDQUOT, also wrapped (torch's serializer): one line naming the file
            raise disk_full(path, written or None, at_least=True) from None
        raise


def _umask() -> int:
    """The process umask: from /proc (Linux, thread-safe), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Temporary files of :func:`atomic_open` are named ``.<target name>.<8 random chars>.tmp``
#: (``tempfile.mkstemp``); only names of exactly that shape are ever cleaned up.
TMP_GLOB = ".*.tmp"
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def clean_stale_tmp(directory: str | Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete temporary files that :func:`atomic_open` left behind in ``directory``.

    A run killed with SIGKILL (or a power cut) between creating a temporary file and
    renaming it leaves ``.<name>.<random>.tmp``; they are never read, only removed here at
    the start of the next run that writes into the same directory. ``older_than_s`` spares
    files modified more recently than that (another live writer). Returns what was removed.
    """
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    now = time.time()
    for p in d.glob(TMP_GLOB):
        try:
            if (_TMP_NAME.match(p.name) and p.is_file() and not p.is_symlink()
                    and now - p.stat().st_mtime >= older_than_s):
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks (about 0.65 s per GB with SHA-NI)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except RecursionError:  # hostile nesting: one line, not a traceback
            from imgclust.errors import InputError

            raise InputError(f"{path}: JSON nested too deeply") from None


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the block; a no-op where unsupported.

    The kernel releases it when the process dies, even on SIGKILL.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # e.g. a file system without locks
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
