"""Where a run writes: the output-directory policy (issue 22).

* ``imgclust cluster`` without ``--out`` writes a **fresh** directory
  ``runs/<YYYYmmdd-HHMMSS>`` (a ``-2``, ``-3`` ... suffix when two runs start in the same
  second) and, after it completes, points the symbolic link ``runs/latest`` at it. A previous
  run is never replaced by default. ``runs/latest`` is only re-pointed when it is a symbolic
  link or absent; a real directory of that name (from an older version) is left alone.
* An explicit ``--out DIR`` must be absent, empty, or an imgclust run directory
  (it holds ``run.json`` or ``log.jsonl``). A non-empty folder of anything else is refused,
  with or without ``--overwrite``: nothing in it is read, moved or deleted.
* A *finished* run (``run.json`` present) is replaced only with ``--overwrite``. An
  *unfinished* one (``log.jsonl`` but no ``run.json``: killed or failed) is continued
  without it, which is how ``run the same command again to resume`` works.
* The run directory must not lie inside the source folder (the next listing would include
  our outputs; the source must not change).
* ``log.jsonl`` is appended to, never truncated: a failed re-run keeps the earlier record.

The Python API (:func:`imgclust.run.cluster`) applies the same rules with ``overwrite=True``
by default (library callers re-running into their own directory keep working); foreign
non-empty directories are refused there too.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from imgclust.errors import InputError

#: A directory holding one of these was written by imgclust.
RUN_MARKERS: tuple[str, ...] = ("run.json", "log.jsonl")
DEFAULT_ROOT = Path("runs")
LATEST = "latest"


def fresh_run_dir(root: str | Path = DEFAULT_ROOT) -> Path:
    """A new, not yet existing ``root/<timestamp>`` directory name."""
    root = Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cand, n = root / stamp, 2
    while cand.exists() or cand.is_symlink():
        cand, n = root / f"{stamp}-{n}", n + 1
    return cand


def point_latest(run: Path, root: str | Path = DEFAULT_ROOT) -> Path | None:
    """Atomically re-point ``root/latest`` at ``run`` (a relative link); None when ``latest``
    is a real file or directory that is not ours to replace."""
    link = Path(root) / LATEST
    if link.exists() and not link.is_symlink():
        return None
    tmp = link.with_name(f".{LATEST}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(os.path.relpath(run.resolve(), link.parent.resolve()), tmp)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return link


def is_run_dir(d: Path) -> bool:
    return any((d / m).exists() for m in RUN_MARKERS)


def check_out_dir(out: str | Path, overwrite: bool, source_path: str | None = None) -> None:
    """Raise InputError unless writing a run into ``out`` is allowed (see module docstring)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise InputError(f"output path {out} is a dangling symbolic link")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    if source_path:
        src = Path(source_path)
        if src.is_dir():
            root, target = src.resolve(), out.resolve()
            if target == root or root in target.parents:
                raise InputError(f"--out {out} lies inside the source folder {root}; write the run elsewhere "
                                 "(the source must not change)")
    if not out.is_dir():
        return
    try:
        empty = next(out.iterdir(), None) is None
    except OSError as e:
        raise InputError(f"cannot list output folder {out} ({e.strerror})") from None
    if empty:
        return
    if not is_run_dir(out):
        raise InputError(f"output folder {out} is not empty and is not an imgclust run directory; "
                         "choose a new or empty folder (nothing in it was changed)")
    if (out / "run.json").exists() and not overwrite:
        raise InputError(f"{out} already holds a finished run; pass --overwrite to replace it, "
                         "or choose another --out (default: a fresh runs/<timestamp>)")


def inside(path: str | Path, folder: str | Path) -> bool:
    """True when ``path`` is ``folder`` or lies below it (symbolic links resolved)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents
