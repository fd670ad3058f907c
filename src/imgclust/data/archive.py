"""``ArchiveSource``: images read straight from a ``.tar[.gz|.bz2|.xz]`` or ``.zip`` archive.

Nothing is extracted to disk. Plain tars and zips are indexed once and read by member
(random access); compressed tars have no random access, so the archive is decompressed in
ONE sequential pass when the source is created and the selected members' bytes are kept in
memory (the CIFAR-10 JPEG tar, 60,000 images, is ~20 MB compressed).

Member selection: regular files with an image extension; hidden names (a path component
starting with ``.``), ``__MACOSX/``, links, and unsafe names (absolute, drive letters,
``..`` components: path traversal) are skipped. When every image lies below one top-level
folder (a "wrapper", as in ``project-master/...`` zips), that folder is treated as the
archive root. ``subdir`` then selects a sub-tree (``subdir="test"`` -> ``test/...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np

from imgclust.data.base import ImageSource
from imgclust.data.decode import DEFAULT_MAX_PIXELS, decode_image, is_image_name
from imgclust.data.folder import check_label_mode, extensions_hint, labels_from_relpaths
from imgclust.errors import BadImageError, InputError

__all__ = ["ARCHIVE_SUFFIXES", "ArchiveSource", "is_archive_name"]

#: Recognised archive name endings (lower-case).
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz",
    ".tbz2",
    ".tar.xz",
    ".txz",
    ".zip",
)
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz")
_DRIVE = re.compile(r"^[A-Za-z]:")


def is_archive_name(path: str | Path) -> bool:
    """True when the file name ends with one of :data:`ARCHIVE_SUFFIXES`."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def safe_member_name(name: str) -> str | None:
    """Normalised POSIX member name, or ``None`` for names to skip.

    Skips absolute paths, Windows drive letters, ``..`` components (path traversal), hidden
    components and ``__MACOSX``. Backslashes (written by some Windows zip tools) count as
    separators.
    """
    name = name.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return "/".join(parts)


def _wrapper_prefix(names: list[str]) -> str:
    """The chain of top-level folders shared by every name (``"a/b/"``), or ``""``."""
    if not names:
        return ""
    prefix = ""
    split = [n.split("/") for n in names]
    depth = 0
    while True:
        if any(len(s) <= depth + 1 for s in split):  # some image sits at this level
            return prefix
        heads = {s[depth] for s in split}
        if len(heads) != 1:
            return prefix
        prefix += heads.pop() + "/"
        depth += 1


class ArchiveSource(ImageSource):
    """Images inside a tar or zip archive, sorted by member path.

    Args:
        path: the archive (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.zip``;
            the tar compression is detected from the content).
        subdir: only members below this folder of the archive (after an optional wrapper
            folder, see the module doc); ids are relative to it.
        labels: ``"auto"`` | ``"folder"`` | ``"none"``, same rules as folders (first folder
            level below ``subdir``).
        max_pixels: decompression-bomb cap passed to :func:`decode_image`.

    ``ids()`` are member paths relative to the selected root; ``path(i)`` is ``None``.
    Reads are safe from several threads (per-member ``os.pread`` for tars, a lock for
    zips) and after ``fork``; the object pickles (handles are reopened lazily).

    Raises:
        InputError: missing/unreadable/corrupt archive, ``subdir`` absent, no images.
    """

    def __init__(
        self,
        path: str | Path,
        subdir: str | None = None,
        labels: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        check_label_mode(labels)
        p = Path(os.path.abspath(Path(path).expanduser()))
        if not p.exists():
            raise InputError(f"archive not found: {p}")
        if not p.is_file():
            raise InputError(f"{p} is not an archive file")
        self.archive = p
        self.label_mode = labels
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        self.subdir = None if subdir in (None, "", ".") else str(subdir).strip("/")
        self.name = p.name
        self._lock = threading.Lock()
        self._handle: object | None = None
        self._handle_pid: int | None = None
        # member key per image: tar -> (data offset, size); zip -> member name;
        # compressed tar -> bytes held in memory.
        self._kind: str
        self._rel: list[str]
        self._members: list = []
        self._all_names: list[str] = []  # every image member, for messages
        self._sigs: dict[str, str] = {}  # member name -> content signature (for the fingerprint)
        try:
            if zipfile.is_zipfile(p):
                self._kind = "zip"
                entries = self._index_zip()
            else:
                entries = self._index_tar()
        except InputError:
            raise
        except PermissionError as e:
            raise InputError(f"permission denied: {p}") from e
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise InputError(f"cannot read archive {p}: {e}") from e
        names = sorted(entries, key=lambda n: n.split("/"))
        base = self._select_base(list(entries), self._all_names)
        self._all_names = []
        rels = [n[len(base) :] for n in names if n.startswith(base)]
        self._rel = rels
        self._members = [entries[base + r] for r in rels]
        sig = hashlib.sha256()
        for r in rels:
            sig.update(f"{r}\0{self._sigs.get(base + r, '')}\n".encode("utf-8", "surrogateescape"))
        self._content_sig = sig.hexdigest()
        self._sigs = {}
        self.base = base
        self.labels, self.class_names, self.labels_from = labels_from_relpaths(
            rels, labels, f"{p}:{base or '/'}"
        )

    # ------------------------------------------------------------------ indexing

    def _wanted(self, name: str) -> bool:
        """Cheap pre-filter for compressed tars: could ``name`` lie below ``subdir``?"""
        if self.subdir is None:
            return True
        prefix = self.subdir + "/"
        if name.startswith(prefix):
            return True
        # below a wrapper folder of any depth
        return ("/" + prefix) in name

    def _select_base(self, names: list[str], all_names: list[str]) -> str:
        """The member prefix that becomes the source root (wrapper + subdir).

        ``names`` are the candidate members (for compressed tars, only those that passed
        :meth:`_wanted`); ``all_names`` every image member, used in error messages.
        """
        if not all_names:
            raise InputError(f"no images found in archive {self.archive} (looked for {extensions_hint()})")
        wrapper = _wrapper_prefix(names)
        if self.subdir is None:
            return wrapper
        want = self.subdir + "/"
        if any(n.startswith(want) for n in names):
            return want
        # ``subdir`` below wrapper folder(s): the shallowest occurrence, if unambiguous.
        found_bases: set[str] = set()
        for n in names:
            k = n.find("/" + want)
            if k >= 0:
                found_bases.add(n[: k + 1] + want)
        if found_bases:
            depth = min(b.count("/") for b in found_bases)
            shallow = sorted(b for b in found_bases if b.count("/") == depth)
            if len(shallow) == 1:
                return shallow[0]
            raise InputError(
                f"folder '{self.subdir}' is ambiguous in archive {self.archive}: "
                f"{', '.join(s.rstrip('/') for s in shallow[:5])}; give the full path as subdir"
            )
        outer = _wrapper_prefix(all_names)
        tops = sorted({n[len(outer) :].split("/")[0] for n in all_names if "/" in n[len(outer) :]})
        found = f" (top-level folders: {', '.join(tops[:10])})" if tops else ""
        raise InputError(f"no folder '{self.subdir}' with images in archive {self.archive}{found}")

    def _index_zip(self) -> dict[str, str]:
        entries: dict[str, str] = {}
        with zipfile.ZipFile(self.archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                mode = (info.external_attr >> 16) & 0xFFFF
                if mode and stat.S_ISLNK(mode):
                    continue
                name = safe_member_name(info.filename)
                if name is None or not is_image_name(name):
                    continue
                self._all_names.append(name)
                if name not in entries:
                    entries[name] = info.filename
                    self._sigs[name] = f"crc={info.CRC:08x}:{info.file_size}"
        return entries

    def _index_tar(self) -> dict[str, object]:
        lower = str(self.archive).lower()
        with open(self.archive, "rb") as f:
            head = f.read(6)
        compressed = (
            lower.endswith(_COMPRESSED_TAR)
            or head[:2] == b"\x1f\x8b"
            or head[:3] == b"BZh"
            or head == b"\xfd7zXZ\x00"
        )
        entries: dict[str, object] = {}
        if not compressed:
            self._kind = "tar"
            with tarfile.open(self.archive, mode="r:") as tf:
                for m in tf:
                    name = self._tar_member_name(m)
                    if name is not None:
                        self._all_names.append(name)
                        if name not in entries:
                            entries[name] = (m.offset_data, m.size)
                            self._sigs[name] = f"{m.size}:{m.mtime}"
            return entries
        self._kind = "memory"
        # One sequential pass: names and bytes together (streaming mode, no seeks).
        with tarfile.open(self.archive, mode="r|*") as tf:
            for m in tf:
                name = self._tar_member_name(m)
                if name is None:
                    continue
                self._all_names.append(name)
                if name in entries or not self._wanted(name):
                    continue
                fobj = tf.extractfile(m)
                entries[name] = b"" if fobj is None else fobj.read()
                self._sigs[name] = hashlib.blake2b(entries[name], digest_size=16).hexdigest()
        return entries

    @staticmethod
    def _tar_member_name(m: tarfile.TarInfo) -> str | None:
        if not m.isreg() or m.issparse():
            return None  # directories, links, devices, sparse files
        name = safe_member_name(m.name)
        if name is None or not is_image_name(name):
            return None
        return name

    # ------------------------------------------------------------------ handles

    def _get_handle(self):
        """The open file (tar) or ZipFile (zip) for this process; call with the lock held."""
        pid = os.getpid()
        if self._handle is None or self._handle_pid != pid:
            if self._kind == "zip":
                self._handle = zipfile.ZipFile(self.archive)
            else:
                self._handle = open(self.archive, "rb")  # noqa: SIM115 - kept open for reads
            self._handle_pid = pid
        return self._handle

    def _member_bytes(self, i: int) -> bytes:
        member = self._members[i]
        if self._kind == "memory":
            return member
        try:
            if self._kind == "tar":
                offset, size = member
                with self._lock:
                    f = self._get_handle()
                    if hasattr(os, "pread"):
                        fd = f.fileno()
                    else:
                        f.seek(offset)
                        return f.read(size)
                data = os.pread(fd, size, offset)
                if len(data) < size:
                    raise BadImageError("truncated archive member")
                return data
            with self._lock:
                zf = self._get_handle()
                return zf.read(member)
        except BadImageError:
            raise
        except RuntimeError as e:  # zipfile: encrypted member
            raise BadImageError(
                "encrypted archive member"
                if "encrypt" in str(e).lower()
                else f"cannot read archive member ({e})"
            ) from e
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
            raise BadImageError(f"cannot read archive member ({e})") from e

    def close(self) -> None:
        """Close the archive handle (reads reopen it)."""
        with self._lock:
            if self._handle is not None:
                try:
                    self._handle.close()  # type: ignore[attr-defined]
                finally:
                    self._handle = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        h = getattr(self, "_handle", None)
        if h is not None:
            with contextlib.suppress(Exception):
                h.close()

    # ------------------------------------------------------------------ ImageSource API

    def __len__(self) -> int:
        return len(self._rel)

    def read(self, i: int) -> np.ndarray:
        return decode_image(self._member_bytes(i), self.max_pixels)

    def read_bytes(self, i: int) -> bytes:
        """The raw encoded bytes of image ``i``."""
        return self._member_bytes(i)

    def ids(self) -> list[str]:
        return list(self._rel)

    def fingerprint(self) -> str:
        """sha256 over the selected members' content signatures, label mode[, pixel cap].

        Content, not the archive's path or mtime: a copied, moved or re-downloaded identical
        archive keeps its feature cache, and any changed, added or removed image changes the
        fingerprint. Per member: zip CRC-32 + size; plain tar size + mtime; compressed tar
        (already read into memory) a BLAKE2 hash of the bytes.
        """
        h = hashlib.sha256()
        h.update(f"archive-content\0{self._content_sig}\0labels={self.label_mode}".encode())
        if self.max_pixels != DEFAULT_MAX_PIXELS:  # another cap skips other images
            h.update(f"\0max_pixels={self.max_pixels}".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            kind="archive",
            archive=str(self.archive),
            subdir=self.base.rstrip("/") or None,
            labels_from=self.labels_from,
        )
        return d
