"""Re-open the images of a recorded run: the one place a source is rebuilt from a config.

A run records its source as ``config.source`` (:class:`imgclust.config.SourceConfig`, or the
same keys as a dict in ``run.json``): path, split, kind, labels, coarse, max_pixels and
``limit`` (a seeded random subset). ``imgclust cluster`` (:mod:`imgclust.run`), ``refine``,
the report, export and apply-edits all open it through :func:`open_recorded_source`, so a
subset drawn with ``--limit`` is the same subset everywhere (issue 17: it was rebuilt in
three places).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from imgclust.data.base import ImageSource, SubsetSource
from imgclust.errors import InputError


def open_recorded_source(source: Mapping[str, Any] | Any, seed: int = 0) -> ImageSource:
    """The source a run recorded (a ``SourceConfig`` or its dict); ``seed`` draws the ``limit`` subset."""
    from imgclust.data import open_source

    s = dataclasses.asdict(source) if dataclasses.is_dataclass(source) else dict(source or {})
    if not s.get("path"):
        raise InputError("the recorded config names no source path")
    max_pixels, limit = s.get("max_pixels"), s.get("limit")
    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"max pixels must be >= 1, got {max_pixels}")
    src = open_source(s["path"], split=s.get("split"), kind=s.get("kind", "auto"), labels=s.get("labels", "auto"),
                      coarse=bool(s.get("coarse", False)), max_pixels=max_pixels)
    if limit is not None:
        if int(limit) < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        src = SubsetSource.sample(src, int(limit), seed=int(seed))
    return src


__all__ = ["open_recorded_source"]
