"""Errors a user can act on.

Every predictable problem (bad path, bad K, unreadable image, missing weights) raises an
:class:`ImgclustError` subclass with a one-line message; the CLI prints that line and exits
with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class ImgclustError(Exception):
    """Base class of errors whose message is meant for the user."""


class InputError(ImgclustError, ValueError):
    """Bad user input: missing/empty source, wrong file type, invalid K, bad option."""


class BadImageError(ImgclustError):
    """One image could not be decoded; the run skips it and lists it with this reason."""


class WeightsError(ImgclustError):
    """Backbone weights missing, unreadable, unsafe, or in an unexpected key layout."""


class DiskFullError(ImgclustError, OSError):
    """No space (or quota) left where imgclust writes; the message names the destination and
    the space needed. Also an OSError (``errno`` ENOSPC or EDQUOT) for callers that catch those."""

    def __str__(self) -> str:  # OSError's own str() would prefix "[Errno 28]"
        return self.strerror or super().__str__()
