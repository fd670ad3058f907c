"""Export a run's clusters: folders of images, an ImageFolder tree, or a table.

``imgclust export RUN_DIR --to FORMAT DEST``:

* ``folders``: ``DEST/cluster_07/<file>``, one folder per cluster, by default **symbolic
  links** to the original files (``--mode hardlink|copy`` for the others).
* ``imagefolder``: the torchvision ``ImageFolder`` layout (``DEST/<class>/<file>``) with
  **copies** by default, plus ``classes.txt`` (one folder name per line) and
  ``manifest.csv`` (file, cluster, confidence, original id and path): rename the folders to
  class names, move the strays, and the tree is a labelled data set (Label Studio, CVAT and
  most training scripts import it as is).
* ``csv`` | ``json`` | ``parquet``: the assignments as one table file (Parquet needs pyarrow).

Source files are only ever read: never moved, renamed, touched or re-written (a test checks
their sha256 and mtime). Images with no file of their own (inside an archive, or arrays such
as the bundled digits) cannot be linked: archive members are written out byte for byte,
arrays as PNG. A hard link shares the original's data: editing the exported file edits the
original, which is why links are opt-in for ``imagefolder``. ``DEST`` must not exist or be
empty, and must not lie inside the source folder (that would change the source) nor inside
the run directory (that would replace the run's own files). A tree is built in a hidden
sibling folder ``.<DEST>.imgclust-export.tmp`` and renamed onto ``DEST`` when complete, so a
failed export (full disk, Ctrl-C) leaves nothing and can simply be re-run; a table file is
written atomically and an existing file is never replaced. Flattened names longer than 200
bytes are shortened with a stable hash suffix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from imgclust.data import is_image_name
from imgclust.errors import InputError
from imgclust.report.rundata import (
    RunData,
    encode_png,
    load_run,
    open_run_source,
    raw_bytes,
)
from imgclust.rundir import atomic_open, write_csv, write_json

FORMATS: tuple[str, ...] = ("folders", "imagefolder", "csv", "json", "parquet")
MODES: tuple[str, ...] = ("symlink", "hardlink", "copy")


def export_run(
    run_dir: str | Path,
    to: str,
    dest: str | Path,
    mode: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Export ``run_dir`` as ``to`` (one of :data:`FORMATS`) into ``dest``; returns a summary.

    ``mode`` (folders/imagefolder only): ``symlink`` (folders' default), ``hardlink`` or
    ``copy`` (imagefolder's default).
    """
    if to not in FORMATS:
        raise InputError(f"unknown export format {to!r}; use one of: {', '.join(FORMATS)}")
    if mode is not None and mode not in MODES:
        raise InputError(f"unknown export mode {mode!r}; use one of: {', '.join(MODES)}")
    if mode is not None and to not in ("folders", "imagefolder"):
        raise InputError(f"--mode applies to folders and imagefolder exports, not to {to}")
    data = load_run(run_dir)
    dest = Path(dest)
    _check_outside(dest, data)
    if to in ("csv", "json", "parquet"):
        return _export_table(data, to, dest)
    return _export_tree(data, dest, mode or ("symlink" if to == "folders" else "copy"), to, progress)


def _records(data: RunData) -> list[dict[str, Any]]:
    out = []
    for i in range(len(data.ids)):
        r: dict[str, Any] = {"id": data.ids[i], "path": data.paths[i], "cluster": int(data.clusters[i]),
                             "confidence": float(data.confidence[i])}
        if data.label_names is not None:
            r["label"] = data.label_names[i]
        out.append(r)
    return out


def _check_outside(dest: Path, data: RunData) -> None:
    """Export never writes inside the run directory (it would replace the run's own files)
    nor inside the source folder (the source must not change)."""
    from imgclust.outdir import inside

    if inside(dest, data.run_dir):
        raise InputError(f"{dest} lies inside the run directory {data.run_dir}; export outside it "
                         "(the run's own files must not change)")
    src_path = ((data.run.get("config") or {}).get("source") or {}).get("path")
    if isinstance(src_path, str) and src_path and Path(src_path).is_dir() and inside(dest, src_path):
        raise InputError(f"{dest} lies inside the source folder {Path(src_path).resolve()}; export outside it "
                         "(the source must not change)")


def _export_table(data: RunData, to: str, dest: Path) -> dict[str, Any]:
    if dest.is_dir():
        raise InputError(f"{dest} is a folder; give a file name for a {to} export")
    if dest.exists() or dest.is_symlink():
        raise InputError(f"{dest} already exists; choose a new file name (existing files are never replaced)")
    recs = _records(data)
    if to == "csv":
        cols = list(recs[0]) if recs else ["id", "path", "cluster", "confidence"]
        fmt = {"confidence": lambda v: f"{v:.4f}"}  # as in assignments.csv
        write_csv(dest, cols, [[fmt.get(c, lambda v: v)(r[c]) for c in cols] for r in recs])
    elif to == "json":
        write_json(dest, {"run": str(data.run_dir.resolve()), "n_clusters": data.k, "assignments": recs})
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError("Parquet export needs pyarrow: pip install pyarrow (or use --to csv / --to json)") from None
        table = pa.Table.from_pylist(recs)
        with atomic_open(dest, "wb") as f:
            pq.write_table(table, f)
    return {"format": to, "dest": str(dest), "n_images": len(recs), "n_clusters": data.k}


#: Longest exported file name in bytes (file systems allow 255; room is left for ``~N`` and ``.png``).
NAME_MAX_BYTES = 200


def _safe_name(image_id: str) -> str:
    """A flat, portable file name from an image id (``cat/001.jpg`` -> ``cat__001.jpg``).

    Names longer than :data:`NAME_MAX_BYTES` keep their start and extension and get a stable
    hash of the full id (``<start>-<12 hex>.jpg``), so a re-run gives the same name.
    """
    name = image_id.replace("\\", "/").strip("/").replace("/", "__")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    name = name or "image"
    if len(name.encode()) > NAME_MAX_BYTES:
        import hashlib

        stem, ext = os.path.splitext(name)
        ext = ext if len(ext) <= 16 else ""
        digest = hashlib.sha256(image_id.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        name = f"{stem[:NAME_MAX_BYTES - len(ext) - 13]}-{digest}{ext}"
    return name


def _check_dest(dest: Path, data: RunData) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest} exists and is not an empty folder; choose a new destination")
    src_path = ((data.run.get("config") or {}).get("source") or {}).get("path")
    if src_path and Path(src_path).is_dir():
        root = Path(src_path).resolve()
        target = dest.resolve()
        if target == root or root in target.parents:
            raise InputError(f"{dest} lies inside the source folder {root}; export outside it (the source must not change)")


def _export_tree(data: RunData, dest: Path, mode: str, to: str, progress: bool) -> dict[str, Any]:
    """Build the tree in a hidden sibling folder and rename it onto ``dest`` at the end, so an
    export that fails (full disk, a missing source file, Ctrl-C) leaves nothing behind and
    the same command can simply be run again."""
    from imgclust.diskspace import check_free, disk_full, is_no_space

    _check_dest(dest, data)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.imgclust-export.tmp"
    if work.is_dir() and not work.is_symlink():  # left by a killed export: ours by its name
        shutil.rmtree(work)
    if mode == "copy":  # fail before the first byte when the copies cannot fit
        check_free(dest, sum(os.path.getsize(p) for p in data.paths if p and os.path.isfile(p)))
    work.mkdir()
    current: list[Path] = [dest]
    try:
        summary = _write_tree(data, work, dest, mode, to, progress, current)
        os.replace(work, dest)  # rename(2) replaces an empty directory atomically
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if is_no_space(e):
            raise disk_full(current[0]) from None
        raise
    return summary


def _write_tree(data: RunData, work: Path, dest: Path, mode: str, to: str, progress: bool,
                current: list[Path]) -> dict[str, Any]:
    from imgclust.progress import progress_bar

    k = data.k
    width = max(2, len(str(k - 1)))
    folder = [f"cluster_{c:0{width}d}" for c in range(k)]
    source = None
    needs_source = [i for i, p in enumerate(data.paths) if not p]
    if needs_source:
        source = open_run_source(data.run)
        index = {sid: j for j, sid in enumerate(source.ids())}
    for c in range(k):
        (work / folder[c]).mkdir(exist_ok=True)
    used: set[str] = set()
    manifest = []
    counts = {"linked": 0, "copied": 0, "written": 0}
    bar = progress_bar(len(data.ids), f"export {to}", unit="img", enable=progress)
    for i, image_id in enumerate(data.ids):
        c = int(data.clusters[i])
        if not 0 <= c < k:
            raise InputError(f"{data.run_dir}: assignments.csv has cluster {c} outside 0..{k - 1}")
        name = _safe_name(image_id)
        if not is_image_name(name):
            name += ".png"
        rel = f"{folder[c]}/{name}"
        n_dup = 1
        while rel in used:  # two ids that flatten to one name
            stem, ext = os.path.splitext(name)
            rel = f"{folder[c]}/{stem}~{n_dup}{ext}"
            n_dup += 1
        used.add(rel)
        target = work / rel
        current[0] = dest / rel
        src_file = data.paths[i]
        if src_file:
            src = Path(src_file)
            if not src.is_file():
                raise InputError(f"source image {src} is missing (moved or deleted since the run)")
            if mode == "symlink":
                os.symlink(src.resolve(), target)
                counts["linked"] += 1
            elif mode == "hardlink":
                try:
                    os.link(src, target)
                except OSError as e:
                    raise InputError(f"cannot hard-link {src} into {dest} ({e.strerror}); "
                                     "hard links need the same file system: use --mode copy or symlink") from e
                counts["linked"] += 1
            else:
                shutil.copyfile(src, target)  # content only: the source's metadata is not even read-modified
                counts["copied"] += 1
        else:
            assert source is not None
            j = index.get(image_id)
            if j is None:
                raise InputError(f"image {image_id!r} is not in the source any more")
            blob = raw_bytes(source, j)
            if blob is None or not is_image_name(image_id):
                blob = encode_png(source.read(j))
            with open(target, "wb") as f:
                f.write(blob)
            counts["written"] += 1
        manifest.append([rel, c, f"{data.confidence[i]:.4f}", image_id, src_file]
                        + ([data.label_names[i]] if data.label_names is not None else []))
        bar.update(1)
    bar.close()
    current[0] = dest
    if to == "imagefolder":
        with atomic_open(work / "classes.txt", "w", encoding="utf-8") as f:
            f.write("\n".join(folder) + "\n")
        write_csv(work / "manifest.csv", ["file", "cluster", "confidence", "id", "source_path"]
                  + (["label"] if data.label_names is not None else []), manifest)
    summary = {"format": to, "dest": str(dest), "mode": mode, "n_images": len(data.ids), "n_clusters": k, **counts}
    if to == "imagefolder":
        with atomic_open(work / "export.json", "w", encoding="utf-8") as f:
            json.dump({**summary, "run": str(data.run_dir.resolve())}, f, indent=2)
    return summary
