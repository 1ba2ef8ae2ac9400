"""Typed export errors (user-facing: ``ClapEdgeError`` subclasses)."""

from __future__ import annotations

from clapedge.errors import ClapEdgeError


class ExportError(ClapEdgeError):
    """The model could not be exported (the message says which tower and why)."""


class ParityError(ExportError):
    """The exported graph disagrees with PyTorch beyond tolerance.

    ``differences`` maps each checked case (tower, output, shape) to its cosine and max abs
    error, so the report shows where it broke.
    """

    def __init__(self, message: str, differences: dict[str, dict[str, float]]):
        super().__init__(message)
        self.differences = differences


class AccuracyBudgetError(ExportError):
    """INT8 lost more task accuracy than ``--max-drop`` allows even after fallbacks."""
