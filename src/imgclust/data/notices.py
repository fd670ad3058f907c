"""Notices about a source that is probably not what the user meant (issue 24).

An archive or folder holding ``train/`` and ``test/`` read without ``--split`` clusters both
splits together (CIFAR-10's JPEG tar: 60,000 images, not the 10,000 of the test split) —
allowed, but said, with the flag that picks one.
"""

from __future__ import annotations

from imgclust.data.base import ImageSource
from imgclust.data.folder import SPLIT_NAMES


def mixed_splits_note(source: ImageSource, split: str | None) -> str | None:
    """A one-line notice when ``source`` (read with ``split``) spans several split folders."""
    if split not in (None, "all"):
        return None
    tops: dict[str, int] = {}
    for i in source.ids():
        head, sep, _ = i.partition("/")
        if sep:
            tops[head] = tops.get(head, 0) + 1
    splits = sorted(t for t in tops if t.lower() in SPLIT_NAMES)
    if len(splits) < 2:
        return None
    counts = ", ".join(f"{t}/ {tops[t]:,}" for t in splits)
    what = "all of them together" if split is None else "all of them (--split all)"
    return (f"{source.name} holds several splits ({counts} images); clustering {what}. "
            f"Give --split {' or --split '.join(splits)} to use one")


__all__ = ["mixed_splits_note"]
