"""Disk space: allocate before writing, and turn ENOSPC / EDQUOT into one clear line.

Two failure modes motivated this module (issue 22):

* Writing through a memory map into a *sparse* file (``numpy.lib.format.open_memmap``
  creates one) on a full file system does not fail with an error: the kernel sends SIGBUS
  and the process dies with "Bus error" (status 135) and no message. :func:`reserve` calls
  ``posix_fallocate`` on the whole file first, so a full disk is an ``ENOSPC`` at open time,
  before any row is written, and the half-made file is removed.
* Ordinary writes fail with ``OSError(ENOSPC)`` from deep inside a library (torch's zip
  serializer even re-raises it as a ``RuntimeError``); :func:`disk_full` converts such an
  error into :class:`~imgclust.errors.DiskFullError` naming the destination, the bytes still
  needed and the bytes free, which the CLI prints as one line.

Fault injection for tests: ``IMGCLUST_FAKE_FREE_BYTES`` (an integer) makes :func:`reserve`
and :func:`check_free` behave as if only that many bytes were free on every file system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from imgclust.errors import DiskFullError

#: errno values that mean "no room": out of space, or over quota.
NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system holding ``path`` (or its nearest existing parent)."""
    fake = os.environ.get("IMGCLUST_FAKE_FREE_BYTES")
    if fake:
        return int(fake)
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_no_space(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library wrapped it (torch: RuntimeError 'file write failed')."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and is_no_space(cause)


def disk_full(dest: str | Path, needed: int | None = None, at_least: bool = False) -> DiskFullError:
    """The one-line error for a write to ``dest`` that ran out of space (``at_least``: ``needed``
    is what was written before it failed, so more than that is needed)."""
    free = free_bytes(Path(dest).parent)
    if needed is None:
        need = "needs more space"
    else:
        need = f"needs more than {human_bytes(needed)}" if at_least else f"needs {human_bytes(needed)}"
    e = DiskFullError(errno.ENOSPC, f"no space left on device writing {dest} ({need}, {human_bytes(free)} free); "
                                    "free some space or choose another location")
    e.filename = None  # the message already names it
    return e


def check_free(dest: str | Path, needed: int) -> None:
    """Raise :class:`DiskFullError` when fewer than ``needed`` bytes are free where ``dest`` goes."""
    free = free_bytes(Path(dest).parent)
    if free is not None and free < needed:
        raise disk_full(dest, needed)


def reserve(fd: int, nbytes: int, dest: str | Path) -> None:
    """Allocate ``nbytes`` for the open file ``fd`` (``posix_fallocate``), or raise DiskFullError.

    File systems without native support get glibc's emulation (it writes zeros); platforms
    without ``posix_fallocate`` fall back to a free-space check.
    """
    fake = os.environ.get("IMGCLUST_FAKE_FREE_BYTES")
    if fake is not None and int(fake) < nbytes:
        raise disk_full(dest, nbytes)
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        check_free(dest, nbytes)
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise disk_full(dest, nbytes) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        check_free(dest, nbytes)


def reserve_path(path: str | Path, nbytes: int, remove_on_failure: bool = True) -> None:
    """:func:`reserve` for a file by name (it must exist); removes it when there is no room
    (unless ``remove_on_failure`` is False: a partial file worth resuming later)."""
    p = Path(path)
    fd = os.open(p, os.O_RDWR)
    try:
        reserve(fd, nbytes, p)
    except DiskFullError:
        os.close(fd)
        if remove_on_failure:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    os.close(fd)


@contextlib.contextmanager
def writing(dest: str | Path, needed: int | None = None) -> Iterator[None]:
    """Convert an out-of-space error raised in the block into :class:`DiskFullError` about ``dest``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_no_space(e):
            raise disk_full(dest, needed) from None
        raise
