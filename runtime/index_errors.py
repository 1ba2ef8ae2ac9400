"""Errors of the embedding index (``runtime/index.py``), all ``ClapEdgeError``: a user can
cause and fix them, and each message names the index, the segment or the value and says what
to do. Internal bugs stay plain exceptions."""

from __future__ import annotations

from clapedge.errors import ClapEdgeError


class ClapIndexError(ClapEdgeError):
    """Base of the index errors (named so as not to shadow Python's ``IndexError``)."""


class IndexFormatError(ClapIndexError, ValueError):
    """Not an index, an unknown format version, or a bad argument (dimension, dtype, k)."""


class IndexLockedError(ClapIndexError):
    """Another writer holds the index (one writer at a time; readers are never refused)."""


class IndexReadOnlyError(ClapIndexError):
    """A change was asked of an index opened read-only (by request, or because a segment is
    damaged: then ``repair`` is the only change allowed)."""


class IndexBundleMismatchError(ClapIndexError):
    """The bundle given is not the one the index was built with (its embeddings live in
    another space, so scores against them would be meaningless)."""


class IndexWriteError(ClapIndexError):
    """A change could not be written (disk full, quota, I/O error, read-only file system).
    The change was not applied; the index keeps every change acknowledged before it."""


class IndexCorruptError(ClapIndexError):
    """A segment that fails its checks: truncated, a checksum mismatch, missing files, or a
    header that contradicts the catalog. ``segment`` names it, ``reason`` says what failed."""

    def __init__(self, segment: str, reason: str, *, missing: bool = False):
        super().__init__(f"segment {segment}: {reason}")
        self.segment = segment
        self.reason = reason
        self.missing = missing


class IndexDamagedWarning(UserWarning):
    """An index opened with damaged segments excluded (read-only until repaired)."""
