"""Streaming: embeddings and tags over sliding windows, in the sherpa-onnx shape.

    s = rt.create_stream(window_s=2.0, hop_s=0.5, banks=["emotion"])
    s.accept_waveform(48000, chunk)          # any chunk size, any (fixed) rate, any dtype
    while rt.is_ready(s):
        rt.decode(s)
    s.input_finished()
    while rt.is_ready(s):
        rt.decode(s)
    for event in s.results():                # events decoded since the last call
        print(event.start_s, event.end_s, event.tags)

Windows follow ``audio.frame_windows`` over the whole stream: starts 0, hop, 2*hop, ... while
a full window fits, plus, once the input is finished, one last window ending at the end of
the stream (or the whole stream, when it is shorter than one window). So the events are the
offline windows of the same signal, and each window's embedding is bit-identical to
``rt.embed_audio(window)``: the streaming resampler gives the same samples as decoding the
whole file (soxr's output does not depend on the chunking).

Memory: the stream keeps the audio from the start of the last decoded window on, at most one
window plus one hop when ``decode`` keeps up with ``accept_waveform``; audio fed faster than
it is decoded is refused past ``max_buffer_s`` (an ``AudioError`` naming the limit).
Events wait in ``results()`` until fetched.

Smoothing: with ``smooth=n``, tags come from the re-normalised mean of the last ``n`` window
embeddings (head logits: their mean); ``StreamEvent.embedding`` stays the window's own.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from clapedge.errors import AudioError, ConfigError
from clapedge.runtime.audio import Resampler, as_frames, check_finite, check_rate, to_mono
from clapedge.runtime.results import AudioEncoding, Tag

if TYPE_CHECKING:
    from clapedge.runtime.api import Runtime


@dataclass(frozen=True)
class StreamEvent:
    """One decoded window: its time span in the stream (seconds), its embedding, and the
    tags of the stream's banks and heads (smoothed over hops when asked)."""

    start_s: float
    end_s: float
    embedding: np.ndarray
    tags: dict[str, list[Tag]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"start_s": round(self.start_s, 6), "end_s": round(self.end_s, 6),
                "tags": {b: [t.to_dict() for t in ts] for b, ts in self.tags.items()}}


@dataclass(frozen=True)
class StreamConfig:
    """Validated stream settings (seconds at the bundle's rate)."""

    window_s: float = 2.0
    hop_s: float = 0.5
    banks: tuple[str, ...] = ()
    k: int | None = 3
    smooth: int = 1
    max_buffer_s: float = 60.0

    def __post_init__(self):
        if not (self.window_s > 0 and 0 < self.hop_s <= self.window_s):
            raise ConfigError(f"stream: need window_s > 0 and 0 < hop_s <= window_s, got "
                              f"window_s={self.window_s}, hop_s={self.hop_s}")
        if isinstance(self.smooth, bool) or not isinstance(self.smooth, int) or self.smooth < 1:
            raise ConfigError(f"stream: smooth={self.smooth!r} must be an integer >= 1")
        if self.max_buffer_s < self.window_s + self.hop_s:
            raise ConfigError(f"stream: max_buffer_s={self.max_buffer_s} must hold at least "
                              f"one window plus one hop ({self.window_s + self.hop_s} s)")


class AudioStream:
    """Audio fed in chunks; ``Runtime.is_ready`` / ``Runtime.decode`` turn it into events.
    Create it with ``Runtime.create_stream``. Feeding and decoding may happen on different
    threads."""

    def __init__(self, rate: int, config: StreamConfig):
        self.config = config
        self.rate = rate
        self.window = max(1, int(round(config.window_s * rate)))
        self.hop = max(1, int(round(config.hop_s * rate)))
        self.max_buffer = int(round(config.max_buffer_s * rate))
        self._resampler: Resampler | None = None
        self._in_rate: int | None = None
        self._in_samples = 0
        self._buf = np.zeros(0, np.float32)
        self._buf_start = 0      # stream index of self._buf[0]
        self._total = 0          # samples received (at the bundle's rate)
        self._next = 0           # start of the next regular window
        self._last_end = 0       # end of the last decoded window
        self._finished = False
        self._done = False
        self._events: deque[StreamEvent] = deque()
        self.recent: deque[AudioEncoding] = deque(maxlen=config.smooth)
        self._lock = threading.Lock()
        self.decode_lock = threading.Lock()  # one decode at a time keeps events in order

    # -- feeding

    def accept_waveform(self, sample_rate: int, samples: np.ndarray) -> None:
        """Append samples (int16/int32/float, [n] or [n, channels]) at ``sample_rate``;
        the rate must stay the same for the whole stream."""
        name = "stream"
        rate = check_rate(sample_rate, name)
        frames = as_frames(np.asarray(samples), name)
        with self._lock:
            if self._finished:
                raise AudioError("stream: accept_waveform after input_finished")
            if self._in_rate is None:
                self._in_rate, self._resampler = rate, Resampler(rate, self.rate)
            elif rate != self._in_rate:
                raise AudioError(f"stream: sample_rate changed from {self._in_rate} to {rate}; "
                                 f"create a new stream")
            if len(frames) == 0:
                return
            mono = to_mono(frames)
            check_finite(mono, self._in_samples, rate, name)
            self._in_samples += len(mono)
            self._append(self._resampler.process(mono))

    def input_finished(self) -> None:
        """No more audio: the final window becomes ready."""
        with self._lock:
            if self._finished:
                return
            if self._resampler is not None:
                self._append(self._resampler.flush(), check=False)
            self._finished = True

    def _append(self, y: np.ndarray, check: bool = True) -> None:
        pending = self._total + len(y) - self._buf_start
        if check and pending > self.max_buffer:
            raise AudioError(f"stream: {pending / self.rate:.1f} s of audio waiting, more than "
                             f"max_buffer_s={self.config.max_buffer_s}; call decode while "
                             f"feeding")
        self._buf = np.concatenate([self._buf, y]) if len(self._buf) else y.astype(
            np.float32, copy=True)
        self._total += len(y)

    # -- decoding (called through Runtime.is_ready / Runtime.decode)

    def _next_span(self) -> tuple[int, int] | None:
        if self._done:
            return None
        if self._next + self.window <= self._total:
            return self._next, self._next + self.window
        if not self._finished:
            return None
        if self._last_end == 0 and self._total > 0:
            return 0, self._total                       # shorter than one window
        if self._total > self._last_end:
            return self._total - self.window, self._total  # end-aligned last window
        return None

    def is_ready(self) -> bool:
        with self._lock:
            return self._next_span() is not None

    def take_window(self) -> tuple[int, int, np.ndarray] | None:
        """The next window's span and samples (a copy), advancing the stream."""
        with self._lock:
            span = self._next_span()
            if span is None:
                return None
            start, end = span
            samples = self._buf[start - self._buf_start:end - self._buf_start].copy()
            if end - start == self.window and start == self._next:
                self._next += self.hop
            else:
                self._done = True
            self._last_end = end
            # keep from this window's start on: an end-aligned last window may need it
            drop = start - self._buf_start
            if drop > 0:
                self._buf = self._buf[drop:].copy()
                self._buf_start = start
            return start, end, samples

    def _emit(self, event: StreamEvent) -> None:
        with self._lock:
            self._events.append(event)

    def results(self) -> list[StreamEvent]:
        """Events decoded since the last call (each event is returned once)."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
            return out

    @property
    def buffered_seconds(self) -> float:
        with self._lock:
            return len(self._buf) / self.rate


def smoothed(recent: Sequence[AudioEncoding]) -> AudioEncoding:
    """The re-normalised mean embedding and mean head logits of recent windows."""
    if len(recent) == 1:
        return recent[0]
    emb = np.mean([r.embedding for r in recent], axis=0)
    emb = (emb / np.linalg.norm(emb)).astype(np.float32)
    heads = {h: np.mean([r.heads[h] for r in recent], axis=0) for h in recent[-1].heads}
    return AudioEncoding(emb, heads, recent[-1].duration_s, len(recent))
