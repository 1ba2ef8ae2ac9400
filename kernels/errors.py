"""Errors of the kernels: both are ``ValueError`` (bad input) and ``ClapEdgeError`` (a user
can cause and fix them), and their messages say which argument or file is wrong and how."""

from __future__ import annotations

from clapedge.errors import ClapEdgeError


class KernelInputError(ClapEdgeError, ValueError):
    """Bad input to a kernel: shapes, dtypes, NaN/Inf, k, filters, an unavailable SIMD level."""


class GalleryFileError(ClapEdgeError, ValueError):
    """A saved gallery that is truncated, corrupt, or of an unknown format version."""
