"""Progress bars (tqdm, with ETA) for every long step, switched off in quiet mode."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled(requested: bool = True) -> bool:
    """Bars are shown unless asked not to or ``IMGCLUST_QUIET=1`` is set."""
    return requested and os.environ.get("IMGCLUST_QUIET", "") not in ("1", "true", "yes")


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, enable: bool = True) -> tqdm:
    return tqdm(
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
