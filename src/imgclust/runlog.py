"""A machine-readable log of a run: one JSON object per line in ``<run dir>/log.jsonl``.

Every line has ``time`` (ISO 8601, local), ``elapsed_s`` (since the log was opened) and
``event``; stages add ``stage`` and, when they end, ``seconds``::

    {"time": "2026-11-22T20:21:06", "elapsed_s": 0.0, "event": "run_start", "out_dir": "runs/x"}
    {"time": "...", "elapsed_s": 0.01, "event": "stage_start", "stage": "features"}
    {"time": "...", "elapsed_s": 3.2, "event": "stage_end", "stage": "features", "seconds": 3.19}
    {"time": "...", "elapsed_s": 5.0, "event": "epoch", "stage": "method", "epoch": 3, "loss": 1.87}
    {"time": "...", "elapsed_s": 5.1, "event": "run_end", "seconds": 5.1}

A failed stage ends with ``"event": "stage_error"`` and the error's one-line message.
Lines are appended and flushed one by one (not atomic like the other run files): a log is
most useful exactly when the run died, so it must hold everything up to that point.
``IMGCLUST_QUIET`` does not affect it (it silences the terminal, not the record).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

LOG_NAME = "log.jsonl"


class RunLog:
    """Append JSON lines to ``path``; ``RunLog(None)`` logs nothing (library use without a run dir)."""

    def __init__(self, path: str | Path | None, fresh: bool = True) -> None:
        self.path = None if path is None else Path(path)
        self._t0 = time.perf_counter()
        self._f: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w" if fresh else "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            _ACTIVE[:] = [self]  # warnings raised from here on are recorded in this log

    def event(self, event: str, **fields: Any) -> None:
        if self._f is None:
            return
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "elapsed_s": round(time.perf_counter() - self._t0, 3),
               "event": event}
        rec.update(fields)
        self._f.write(json.dumps(rec, default=_default) + "\n")
        self._f.flush()

    @contextlib.contextmanager
    def stage(self, name: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Log ``stage_start``/``stage_end`` around a block; extra fields put into the yielded
        dict appear on the ``stage_end`` line."""
        self.event("stage_start", stage=name, **fields)
        t = time.perf_counter()
        extra: dict[str, Any] = {}
        try:
            yield extra
        except BaseException as e:
            self.event("stage_error", stage=name, seconds=round(time.perf_counter() - t, 3),
                       error=f"{type(e).__name__}: {e}")
            raise
        self.event("stage_end", stage=name, seconds=round(time.perf_counter() - t, 3), **extra)

    def history(self, stage: str, history: dict[str, Any]) -> None:
        """One ``epoch`` line per epoch of a method's ``history_["loss"]``, with every other
        numeric list of the same length (e.g. TEMI's ``pmi``, ``ce``) on the same line.
        Methods without a per-epoch loss (k-means) log nothing here."""
        loss = (history or {}).get("loss")
        if not isinstance(loss, list) or not loss:
            return
        series = {k: v for k, v in history.items() if isinstance(v, list) and len(v) == len(loss)
                  and all(isinstance(x, (int, float)) for x in v)}
        for i in range(len(loss)):
            self.event("epoch", stage=stage, epoch=i + 1, **{k: v[i] for k, v in series.items()})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def __enter__(self) -> RunLog:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The events of a ``log.jsonl`` (a torn last line, from a killed process, is ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


# --------------------------------------------------------------------- warning capture
# Issue 22: identical images made scikit-learn print 194 ConvergenceWarning lines with
# --k auto. The CLI routes warnings here: each is recorded as a "warning" event in the
# active run's log.jsonl (or, without one, kept in memory) and one summary line is printed
# at exit. Library use (no route_warnings call) keeps Python's default behaviour.
_ACTIVE: list[RunLog] = []
_SEEN: dict[tuple[str, str], int] = {}
_LOGS_USED: list[str] = []
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    log = _ACTIVE[0] if _ACTIVE else None
    if os.path.abspath(filename).startswith(_OWN_DIR):  # imgclust's own: a message for the user, one line
        print(f"warning: {message}", file=sys.stderr)
        if log is not None and log._f is not None:
            with contextlib.suppress(Exception):
                log.event("warning", category=category.__name__, message=str(message)[:2000])
        return
    key = (category.__name__, str(message).strip().splitlines()[0][:300] if str(message).strip() else "")
    _SEEN[key] = _SEEN.get(key, 0) + 1
    if log is not None and log._f is not None:
        with contextlib.suppress(Exception):
            log.event("warning", category=key[0], message=str(message)[:2000], where=f"{filename}:{lineno}")
        if str(log.path) not in _LOGS_USED:
            _LOGS_USED.append(str(log.path))


def route_warnings() -> None:
    """Record warnings instead of printing them (see above); idempotent."""
    import warnings

    warnings.showwarning = _showwarning


def report_warnings(stream: Any = None) -> int:
    """Print one line summarising the captured warnings (if any) to stderr; returns their count."""
    import sys

    n = sum(_SEEN.values())
    if n:
        (cat, msg), _ = max(_SEEN.items(), key=lambda kv: kv[1])
        where = f"recorded in {', '.join(_LOGS_USED)}" if _LOGS_USED else "not shown"
        print(f"note: {n} warning(s) from libraries ({len(_SEEN)} distinct; most frequent: {cat}: {msg[:160]}) "
              f"{where}", file=stream or sys.stderr)
        _SEEN.clear()
        _LOGS_USED.clear()
    return n
