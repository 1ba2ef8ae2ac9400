"""The user-facing exception family.

User errors (a bad file, a bad value, a missing dependency) raise a subclass of
``ClapEdgeError`` whose message names the file or value and says what to do. Internal bugs
are plain Python exceptions. CLIs print ``ClapEdgeError`` messages and exit non-zero, never a
traceback.
"""

from __future__ import annotations


class ClapEdgeError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(ClapEdgeError, ValueError):
    """An invalid configuration value (names the field and the accepted values)."""


class CheckpointError(ClapEdgeError):
    """A checkpoint file that cannot be read safely or does not match the model."""


class BundleError(ClapEdgeError):
    """A bundle that is missing files, fails its checksums or has an unknown version."""


class AudioError(ClapEdgeError, ValueError):
    """Audio that cannot be decoded or used (names the file and the problem)."""


class MissingDependencyError(ClapEdgeError, ImportError):
    """An optional dependency is needed for this feature; the message says what to install."""
