"""ONNX Runtime ``CalibrationDataReader`` over prepared clips (audio tower inputs)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def audio_feeds(clips: list[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    for clip in clips:
        yield {"waveform": clip[None, :].astype(np.float32),
               "attention_mask": np.ones((1, len(clip)), dtype=np.int64)}


def make_reader(feeds: list[dict[str, np.ndarray]]):
    """A fresh CalibrationDataReader over ``feeds`` (onnxruntime.quantization is imported
    lazily: it needs the ``onnx`` package, which device installs do not have)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _Reader()
