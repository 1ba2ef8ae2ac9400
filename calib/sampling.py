"""Class-balanced, deterministic selection of calibration clips at deployment lengths."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np

from clapedge.calib.readers import CalibItem


def class_balanced(items: list[CalibItem], n: int, *, key: str | None = None,
                   seed: int = 0) -> list[CalibItem]:
    """``n`` items drawn round-robin over the classes of attribute ``key`` (or the first
    attribute the items have), so rare classes are as present as frequent ones. Without labels,
    a seeded uniform sample. Deterministic for a seed."""
    rng = random.Random(seed)
    key = key or next((k for it in items for k in sorted(it.attributes)), None)
    if key is None:
        return rng.sample(items, min(n, len(items)))
    groups: dict[str, list[CalibItem]] = defaultdict(list)
    for item in items:
        groups[str(item.attributes.get(key))].append(item)
    queues = {label: rng.sample(g, len(g)) for label, g in sorted(groups.items())}
    chosen: list[CalibItem] = []
    while len(chosen) < min(n, len(items)):
        for label in sorted(queues):
            if queues[label] and len(chosen) < n:
                chosen.append(queues[label].pop())
    return chosen


def at_length(signals: list[np.ndarray], start: int, samples: int) -> np.ndarray:
    """A deterministic clip of exactly ``samples``: the signal at ``start``, continued by the
    following signals (cyclically) when it is shorter — calibration must see activations of
    the lengths the model will be run at, not only of the corpus clip lengths."""
    out = np.empty(samples, dtype=np.float32)
    filled, i = 0, start
    while filled < samples:
        piece = signals[i % len(signals)][: samples - filled]
        out[filled:filled + len(piece)] = piece
        filled += len(piece)
        i += 1
    return out


def length_buckets(signals: list[np.ndarray], lengths_s: list[float], sample_rate: int,
                   per_length: int) -> list[np.ndarray]:
    """``per_length`` clips at each deployment length, spread over the signals."""
    clips = []
    for length in lengths_s:
        samples = max(1, int(round(length * sample_rate)))
        step = max(1, len(signals) // max(1, per_length))
        for j in range(per_length):
            clips.append(at_length(signals, (j * step) % len(signals), samples))
    return clips
