"""Result types of the runtime API (plain dataclasses, like faster-whisper's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


@dataclass(frozen=True)
class Tag:
    """One label of a bank or an attribute head.

    ``score``: for a label bank, the cosine similarity between the audio and the label's
    text embedding (in [-1, 1]); for an attribute head, the softmax probability of the
    head's logits. ``index``: the label's row in the bank (or column of the head).
    """

    label: str
    score: float
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 6)}


class Ranked(NamedTuple):
    """One candidate of ``Runtime.rerank`` and its cosine similarity to the prompt."""

    candidate: Any
    score: float


@dataclass(frozen=True)
class AudioEncoding:
    """The audio tower's view of one input.

    ``embedding``: float32 [embed_dim], L2-normalised (for windowed long audio, the
    re-normalised mean of the window embeddings). ``heads``: attribute-head logits per head
    (mean over windows). ``duration_s``: the signal's duration before any padding;
    ``windows``: how many model inputs it was cut into.
    """

    embedding: np.ndarray
    heads: dict[str, np.ndarray] = field(default_factory=dict)
    duration_s: float = 0.0
    windows: int = 1
