"""Human edits of a clustering: the edit log (``edits.jsonl``), validation, undo and replay.

The review app (:mod:`imgclust.review`) appends one JSON object per line to ``edits.jsonl``
in the run directory; the original ``assignments.csv`` is never written. Every edit has
``seq`` (its line number, from 0), ``time`` (UTC, ISO 8601) and ``op``:

* ``rename``  ``{"cluster": c, "name": "cats"}``
* ``merge``   ``{"clusters": [a, b, ...], "into": a}`` - every image of those clusters goes to ``into``
* ``split``   ``{"cluster": c, "k": 3}`` - k-means (seeded with ``seq``) on the features of the
  cluster's current images; part 0 keeps ``c``, the others become new clusters K, K+1, ...
* ``move``    ``{"ids": [...], "to": c}`` - these images go to cluster ``c``
* ``outlier`` ``{"ids": [...]}`` - these images are outliers: kept in their cluster, left out of retraining
* ``undo``    ``{"target": n}`` - edit ``n`` is ignored from now on (an undone edit stays in the log)

:func:`replay` applies the log, in order and skipping undone edits, to the original labels.
Cluster ids never shift (a merged-away cluster stays, empty), so the edited labels differ
from the original ones exactly by what the edits did. Images that a ``move`` touched are the
*certain* labels of retraining (:func:`imgclust.review.apply.apply_edits`).

Writes are appended under a lock (a thread lock and ``fcntl.flock``), so two browser tabs or
two processes editing at once both get recorded, each line whole, in one order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclust.errors import InputError

EDITS_NAME = "edits.jsonl"
OPS = ("rename", "merge", "split", "move", "outlier", "undo")
MAX_SPLIT_K = 20
MAX_NAME = 100
_lock = threading.Lock()


@dataclass
class Replayed:
    """The labels after the edits and what the edits did."""

    labels: np.ndarray  # (N,) edited cluster per image
    n_clusters: int
    names: dict[int, str]
    outlier: np.ndarray  # (N,) bool, marked by the user
    moved: np.ndarray  # (N,) bool, touched by a move (certain labels)
    reason: list[str]  # per image: "" or the ops that changed it, e.g. "merge+move"
    active: list[dict[str, Any]] = field(default_factory=list)  # edits in effect (not undone, not undo)


def _ids_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(i, str) for i in v):
        raise InputError("'ids' must be a non-empty list of image ids")
    if len(v) > 1_000_000:
        raise InputError("too many ids in one edit")
    return list(dict.fromkeys(v))


def _cluster(v: Any, n_clusters: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_clusters:
        raise InputError(f"{what} must be a cluster number in 0..{n_clusters - 1}, got {v!r}")
    return int(v)


def validate(edit: Any, index: dict[str, int], n_clusters: int, log: list[dict[str, Any]]) -> dict[str, Any]:
    """A checked copy of a client's edit (without seq/time), or InputError with the reason.

    ``index`` maps image id -> row; ``n_clusters`` is the number of clusters after the edits so
    far; ``log`` the edits so far (for ``undo``).
    """
    if not isinstance(edit, dict):
        raise InputError("an edit must be a JSON object")
    op = edit.get("op")
    if op not in OPS:
        raise InputError(f"unknown edit op {op!r}; allowed: {', '.join(OPS)}")
    allowed = {"rename": {"cluster", "name"}, "merge": {"clusters", "into"}, "split": {"cluster", "k"},
               "move": {"ids", "to"}, "outlier": {"ids"}, "undo": {"target"}}[op] | {"op"}
    extra = sorted(set(edit) - allowed)
    if extra:
        raise InputError(f"unknown field(s) {extra} for op {op!r}")
    out: dict[str, Any] = {"op": op}
    if op == "rename":
        out["cluster"] = _cluster(edit.get("cluster"), n_clusters, "cluster")
        name = edit.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise InputError(f"name must be a non-empty string of at most {MAX_NAME} characters")
        out["name"] = name.strip()
    elif op == "merge":
        cl = edit.get("clusters")
        if not isinstance(cl, list) or len(cl) < 2:
            raise InputError("'clusters' must list at least two clusters")
        out["clusters"] = sorted({_cluster(c, n_clusters, "clusters") for c in cl})
        if len(out["clusters"]) < 2:
            raise InputError("'clusters' must list at least two different clusters")
        into = edit.get("into", out["clusters"][0])
        out["into"] = _cluster(into, n_clusters, "into")
        if out["into"] not in out["clusters"]:
            raise InputError("'into' must be one of the merged clusters")
    elif op == "split":
        out["cluster"] = _cluster(edit.get("cluster"), n_clusters, "cluster")
        k = edit.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_SPLIT_K:
            raise InputError(f"k must be an integer in 2..{MAX_SPLIT_K}, got {k!r}")
        out["k"] = k
    elif op in ("move", "outlier"):
        ids = _ids_list(edit.get("ids"))
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise InputError(f"{len(unknown)} id(s) not in this run, e.g. {unknown[0][:80]!r}")
        out["ids"] = ids
        if op == "move":
            out["to"] = _cluster(edit.get("to"), n_clusters, "to")
    else:  # undo
        seq = edit.get("target")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < len(log):
            raise InputError(f"target must name an edit in 0..{len(log) - 1}, got {seq!r}")
        if log[seq]["op"] == "undo":
            raise InputError("an undo cannot be undone; repeat the edit instead")
        if any(e["op"] == "undo" and e.get("target") == seq for e in log):
            raise InputError(f"edit {seq} is already undone")
        out["target"] = seq
    return out


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The edits of a run (empty when there are none). A torn last line (a crash mid-append) is ignored."""
    p = Path(run_dir) / EDITS_NAME
    if not p.is_file():
        return []
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.endswith("\n"):
                break
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{p}: line {n + 1} is not JSON ({err})") from err
            if not isinstance(e, dict) or e.get("op") not in OPS or e.get("seq") != n:
                raise InputError(f"{p}: line {n + 1} is not an edit of this log")
            out.append(e)
    return out


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[None]:
    """Exclusive access to a run's edit log across threads and processes."""
    d = Path(run_dir)
    with _lock, open(d / f".{EDITS_NAME}.lock", "a+") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf.fileno(), fcntl.LOCK_UN)


def append(run_dir: str | Path, edit: Any, index: dict[str, int], base_labels: np.ndarray,
           features: np.ndarray | None = None, n_clusters: int | None = None) -> dict[str, Any]:
    """Validate ``edit`` against the current state and append it to ``edits.jsonl``; returns the
    stored edit (with ``seq`` and ``time``). Invalid edits raise InputError and write nothing."""
    d = Path(run_dir)
    with locked(d):
        log = read_log(d)
        cur = replay(base_labels, log, index, features, n_clusters)
        e = validate(edit, index, cur.n_clusters, log)
        if e["op"] == "split" and features is None:
            raise InputError("splitting needs the run's features (the feature cache entry is gone)")
        if e["op"] == "split" and int((cur.labels == e["cluster"]).sum()) < e["k"]:
            raise InputError(f"cluster {e['cluster']} has fewer than {e['k']} images")
        stored = {"seq": len(log), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **e}
        line = json.dumps(stored, ensure_ascii=False) + "\n"
        _drop_torn_tail(d / EDITS_NAME)
        fd = os.open(d / EDITS_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return stored


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-append; read_log ignores it) before appending."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def replay(base_labels: np.ndarray, log: list[dict[str, Any]], index: dict[str, int],
           features: np.ndarray | None = None, n_clusters: int | None = None) -> Replayed:
    """Apply the edits of ``log`` (skipping undone ones) to ``base_labels`` (N,), which stay unchanged.
    ``n_clusters``: the run's K (default: the largest label + 1)."""
    labels = np.asarray(base_labels, dtype=np.int64).copy()
    n = len(labels)
    k = max(int(labels.max()) + 1 if n else 0, int(n_clusters or 0))
    names: dict[int, str] = {}
    outlier = np.zeros(n, bool)
    moved = np.zeros(n, bool)
    why: list[set[str]] = [set() for _ in range(n)]
    undone = {e["target"] for e in log if e["op"] == "undo"}
    active = [e for e in log if e["op"] != "undo" and e["seq"] not in undone]
    for e in active:
        op = e["op"]
        before = labels.copy()
        if op == "rename":
            names[int(e["cluster"])] = e["name"]
        elif op == "merge":
            labels[np.isin(labels, e["clusters"])] = int(e["into"])
        elif op == "split":
            rows = np.flatnonzero(labels == int(e["cluster"]))
            if features is None or len(rows) < int(e["k"]):
                continue
            part = _kmeans(np.asarray(features)[rows], int(e["k"]), seed=int(e["seq"]))
            new = np.where(part == 0, int(e["cluster"]), k + part - 1)
            labels[rows] = new
            k += int(e["k"]) - 1
        elif op == "move":
            rows = np.asarray([index[i] for i in e["ids"] if i in index], dtype=np.int64)
            labels[rows] = int(e["to"])
            moved[rows] = True
            for r in rows:
                why[r].add("move")
        elif op == "outlier":
            rows = np.asarray([index[i] for i in e["ids"] if i in index], dtype=np.int64)
            outlier[rows] = True
            for r in rows:
                why[r].add("outlier")
        if op in ("merge", "split"):
            for r in np.flatnonzero(labels != before):
                why[r].add(op)
    reason = ["+".join(sorted(w)) for w in why]
    return Replayed(labels, k, names, outlier, moved, reason, active)


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means inside one cluster (L2-normalised features, cosine geometry as the clustering sees
    it); parts numbered by size, largest first, so part 0 (which keeps the cluster's id) is the bulk."""
    from sklearn.cluster import KMeans

    xn = np.asarray(x, dtype=np.float32)
    xn = xn / np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
    lab = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(xn)
    order = np.argsort(-np.bincount(lab, minlength=k), kind="stable")
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return rank[lab]
