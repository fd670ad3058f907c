"""Progress bars (tqdm, with ETA) for every long step, switched off in quiet mode.

While a run is being recorded (:func:`record_progress`, used by ``imgclust cluster``), every
bar also writes ``progress`` events to the run's ``log.jsonl`` — at most one per
:data:`LOG_EVERY_S` seconds per bar, plus one when it closes — whether or not the bar is
shown (``--quiet`` silences the terminal, not the record)::

    {"event": "progress", "stage": "k-means restarts", "n": 4, "total": 10, "bar_s": 1.9, "rate": 2.1, "eta_s": 2.9}
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

#: seconds between two ``progress`` events of one bar in log.jsonl
LOG_EVERY_S = 5.0
_sinks: list[Any] = []  # run logs (objects with .event(name, **fields)) receiving progress events


def progress_enabled(requested: bool = True) -> bool:
    """Bars are shown unless asked not to or ``IMGCLUST_QUIET=1`` is set."""
    return requested and os.environ.get("IMGCLUST_QUIET", "") not in ("1", "true", "yes")


@contextlib.contextmanager
def record_progress(log: Any) -> Iterator[None]:
    """Send every bar's progress to ``log`` (a :class:`~imgclust.runlog.RunLog`) inside the block."""
    _sinks.append(log)
    try:
        yield
    finally:
        _sinks.remove(log)


def log_progress(stage: str, **fields: Any) -> None:
    """One ``progress`` event for a step that has no bar (e.g. "drawing the map")."""
    for sink in _sinks:
        sink.event("progress", stage=stage, **fields)


class LoggedBar(tqdm):
    """A tqdm bar that also reports to the recording run log (counts even when disabled)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stage = kwargs.get("desc") or "progress"
        self._count = int(kwargs.get("initial") or 0)
        self._t_start = time.perf_counter()
        self._t_logged = self._t_start
        self._closed_logged = False
        super().__init__(*args, **kwargs)
        if _sinks:
            self._emit()

    def _emit(self) -> None:
        total = getattr(self, "total", None)
        el = time.perf_counter() - self._t_start
        rate = self._count / el if el > 0 else None
        eta = (total - self._count) / rate if rate and total else None
        log_progress(self._stage, n=self._count, total=total, bar_s=round(el, 2),
                     rate=None if rate is None else round(rate, 3), eta_s=None if eta is None else round(eta, 1))
        self._t_logged = time.perf_counter()

    def update(self, n: float | None = 1) -> bool | None:
        self._count += int(n or 0)
        if _sinks and time.perf_counter() - self._t_logged >= LOG_EVERY_S:
            self._emit()
        return super().update(n)

    def close(self) -> None:
        if _sinks and not self._closed_logged:
            self._closed_logged = True
            self._emit()
        super().close()


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, enable: bool = True) -> tqdm:
    return LoggedBar(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(enable),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        leave=True,
    )
