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
``rt.embed_audio(window)`` (except where a causal bundle's step runs, below): the streaming
resampler gives the same samples as decoding the whole file (soxr's output does not depend
on the chunking).

Causal bundles. A bundle of a causal model (``audio.causal_context``, models/causal.py)
carries a streaming step (manifest ``stream.step``, ``audio_step.onnx``): the encoder for a
hop's new frames only, against cached keys/values of the last L frames per layer, the last
K-1 encoder-input frames (the causal positional conv's past) and the final states of the
window's older frames (mean pooling). With ``reuse="auto"`` (and an exact split) a stream
runs the step: a hop costs the front end on its new samples plus the step on its new frames,
and each window's embedding is exactly what encoding the whole stream at once and pooling the
window's frames gives (tests/test_causal.py), which is how a causal model sees a stream:
the window's first frames attend to the audio before the window. An offline window
(``rt.embed_audio(window)``) starts from silence instead, so after the first window the two
differ (on the default model, speakers changing every 2.7 s: 85% of top-1 tags the same,
docs/benchmarks.md); ``reuse="frames"`` gives the offline
windows exactly, at the cost of re-encoding every window. The state is fixed-size
(``StepState``).

Reuse across overlapping windows. A bundle exported with a streaming split (manifest
``stream``: ``audio_frontend.onnx`` + ``audio_encoder.onnx``, the audio tower cut after its
per-frame conv front end, see ``export/stream_split.py``) lets each hop compute front-end
frames only for its new samples: frame t covers samples [S*t, S*t + R) (S = 320, R = 400 for
the wav2vec2 family at 16 kHz), the stream keeps the frames of the current window (at most
one window's worth, ``FrameCache``) and runs only the encoder over them. ``reuse`` picks:

- ``"auto"`` (default): reuse where it is exact: the split is marked ``exact`` (frame-local
  front end; the export checked that reuse is bit-identical), ``hop`` is a multiple of the
  frame stride (window starts on a frame boundary) and a window is encoded offline as one
  unpadded clip (``min_seconds <= window_s <= max_seconds``, a multiple of
  ``bucket_seconds``). Then events are bit-identical to the offline windows. Otherwise every
  window is encoded whole, and ``create_stream`` logs why (logger ``clapedge.runtime``).
- ``"frames"``: front-end frame reuse only, never the causal step (events are the offline
  windows bit for bit, as ``"auto"`` gives for other bundles).
- ``"approx"``: also reuse when the split is not exact: a front end normalised over time
  (GroupNorm in the first conv, the WavLM-base-plus shape) normalises each hop's new frames
  over that hop's samples instead of the window's, so events differ from the offline
  windows (docs/runtime.md gives the measured difference).
- ``"off"``: always encode whole windows.

The end-aligned last window when it does not start on a frame boundary, and a stream
shorter than one window, are always encoded whole. ``"approx"`` also runs a causal bundle's
step over an inexact split's frames.

Memory and back-pressure. The stream keeps the audio from the start of the last decoded
window on: at most one window plus one hop when ``decode`` keeps up. Audio fed faster than it
is decoded is refused once more than ``max_buffer_s`` would be waiting: ``accept_waveform``
raises ``AudioError`` naming the limit, or, with ``timeout=`` seconds, first waits that long
for ``decode`` (on another thread) to make room. A refused chunk is not consumed (the
resampler has not seen it): feed it again. Undrained events wait in ``results()``, at most
``max_events`` of them; past that the oldest are dropped and counted in ``dropped_events``
(``decode`` also returns each event, for callers that never call ``results()``).

Smoothing: with ``smooth=n``, tags come from the re-normalised mean of the last ``n`` window
embeddings (head logits: their mean); ``StreamEvent.embedding`` stays the window's own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from clapedge.errors import AudioError, BundleError, ConfigError
from clapedge.runtime.audio import (Resampler, as_frames, check_finite, check_rate,
                                    padded_length, segment, to_mono)
from clapedge.runtime.manifest import (ATTENTION_MASK, EMBEDDING, FRAMES, HEAD_PREFIX,
                                       WAVEFORM)
from clapedge.runtime.results import AudioEncoding, Tag

if TYPE_CHECKING:
    from clapedge.runtime.api import Runtime

log = logging.getLogger("clapedge.runtime")

REUSE_MODES = ("auto", "frames", "approx", "off")


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
    reuse: str = "auto"
    max_events: int = 256

    def __post_init__(self):
        if not (self.window_s > 0 and 0 < self.hop_s <= self.window_s):
            raise ConfigError(f"stream: need window_s > 0 and 0 < hop_s <= window_s, got "
                              f"window_s={self.window_s}, hop_s={self.hop_s}")
        if isinstance(self.smooth, bool) or not isinstance(self.smooth, int) or self.smooth < 1:
            raise ConfigError(f"stream: smooth={self.smooth!r} must be an integer >= 1")
        if self.max_buffer_s < self.window_s + self.hop_s:
            raise ConfigError(f"stream: max_buffer_s={self.max_buffer_s} must hold at least "
                              f"one window plus one hop ({self.window_s + self.hop_s} s)")
        if self.reuse not in REUSE_MODES:
            raise ConfigError(f"stream: reuse={self.reuse!r} must be one of "
                              f"{', '.join(REUSE_MODES)}")
        if isinstance(self.max_events, bool) or not isinstance(self.max_events, int) \
                or self.max_events < 1:
            raise ConfigError(f"stream: max_events={self.max_events!r} must be an integer "
                              f">= 1")


@dataclass(frozen=True)
class FramePlan:
    """How a stream reuses front-end frames: frame t covers samples
    [stride*t, stride*t + receptive_field); a window holds ``frames`` of them."""

    stride: int
    receptive_field: int
    frames: int
    exact: bool
    step: bool = False   # a causal bundle's step encodes only each hop's new frames


class FrameCache:
    """The front-end frames of the stream's current window by absolute frame index (at most
    one window's worth); ``window`` computes only the frames it does not hold yet."""

    def __init__(self, plan: FramePlan):
        self.plan = plan
        self.first = 0                     # absolute index of rows[0]
        self.rows: np.ndarray | None = None
        self.computed = 0                  # frames computed so far (for benchmarks)
        self.reused = 0                    # frames taken from the cache

    def window(self, start: int, samples: np.ndarray,
               compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The frames of the window starting at stream sample ``start`` (a multiple of the
        stride) whose samples are ``samples``; ``compute(chunk)`` runs the front end."""
        p = self.plan
        first = start // p.stride
        if self.rows is not None and self.first <= first <= self.first + len(self.rows):
            self.rows = self.rows[first - self.first:]
        else:
            self.rows = None
        self.first = first
        have = 0 if self.rows is None else len(self.rows)
        self.reused += have
        if have < p.frames:
            a = (first + have) * p.stride - start
            b = (first + p.frames - 1) * p.stride + p.receptive_field - start
            new = compute(samples[a:b])
            if new.ndim != 2 or len(new) != p.frames - have:
                raise BundleError(f"the audio front end returned frames of shape {new.shape} "
                                  f"for {b - a} samples, expected {p.frames - have} frames "
                                  f"(stride {p.stride}, receptive field {p.receptive_field})")
            self.computed += len(new)
            self.rows = new if self.rows is None else np.concatenate([self.rows, new])
        return self.rows


class AudioStream:
    """Audio fed in chunks; ``Runtime.is_ready`` / ``Runtime.decode`` turn it into events.
    Create it with ``Runtime.create_stream``. Feeding and decoding may happen on different
    threads."""

    def __init__(self, rate: int, config: StreamConfig, plan: FramePlan | None = None,
                 plan_reason: str = ""):
        self.config = config
        self.rate = rate
        self.window = max(1, int(round(config.window_s * rate)))
        self.hop = max(1, int(round(config.hop_s * rate)))
        self.max_buffer = int(round(config.max_buffer_s * rate))
        self.plan = plan
        self.plan_reason = plan_reason       # why frames are (not) reused
        self.frames = FrameCache(plan) if plan is not None else None
        self.step: StepState | None = None   # set by plan_reuse's caller for a step plan
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
        self._events: deque[StreamEvent] = deque(maxlen=config.max_events)
        self.dropped_events = 0  # events pushed out of results() undrained
        self.recent: deque[AudioEncoding] = deque(maxlen=config.smooth)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # signalled when decode frees audio
        self.decode_lock = threading.Lock()  # one decode at a time keeps events in order

    # -- feeding

    def accept_waveform(self, sample_rate: int, samples: np.ndarray, *,
                        timeout: float | None = None) -> None:
        """Append samples (int16/int32/float, [n] or [n, channels]) at ``sample_rate``;
        the rate must stay the same for the whole stream. Past ``max_buffer_s`` of waiting
        audio the chunk is refused (``AudioError``, chunk not consumed), after waiting up
        to ``timeout`` seconds for ``decode`` on another thread to make room."""
        name = "stream"
        rate = check_rate(sample_rate, name)
        frames = as_frames(np.asarray(samples), name)
        if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
            raise ConfigError(f"stream: timeout={timeout!r} must be a number of seconds >= 0")
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
            self._wait_for_room(len(mono), timeout)
            self._in_samples += len(mono)
            self._append(self._resampler.process(mono))

    def _bound_after(self, n_in: int) -> int:
        """An upper bound of the stream's length (at the bundle's rate) once ``n_in`` more
        input samples are resampled: soxr's total output never exceeds the exact ratio."""
        total_in = self._in_samples + n_in
        if self._in_rate == self.rate:
            return total_in
        return max(self._total, math.ceil(total_in * self.rate / self._in_rate) + 1)

    def _wait_for_room(self, n_in: int, timeout: float | None) -> None:
        chunk = self._bound_after(n_in) - self._total
        if chunk > self.max_buffer:
            raise AudioError(f"stream: a chunk of {chunk / self.rate:.1f} s is longer than "
                             f"max_buffer_s={self.config.max_buffer_s}; feed smaller chunks")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pending = self._bound_after(n_in) - self._buf_start
            if pending <= self.max_buffer:
                return
            # Nothing to decode: no decoder can make room until more audio comes.
            stuck = self._next_span() is None
            left = 0.0 if deadline is None or stuck else deadline - time.monotonic()
            if left <= 0:
                waited = "" if timeout is None or stuck else f" (waited {timeout:g} s)"
                hint = (f"feed chunks of at most max_buffer_s - window_s - hop_s = "
                        f"{(self.max_buffer - self.window - self.hop) / self.rate:g} s"
                        if stuck else "call decode while feeding")
                raise AudioError(f"stream: {pending / self.rate:.1f} s of audio would be "
                                 f"waiting, more than max_buffer_s={self.config.max_buffer_s}"
                                 f"{waited}; {hint} (the chunk was not consumed: feed it "
                                 f"again)")
            self._room.wait(left)

    def input_finished(self) -> None:
        """No more audio: the final window becomes ready."""
        with self._lock:
            if self._finished:
                return
            if self._resampler is not None:
                self._append(self._resampler.flush())
            self._finished = True
            self._room.notify_all()

    def _append(self, y: np.ndarray) -> None:
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
                self._room.notify_all()
            return start, end, samples

    def _emit(self, event: StreamEvent) -> None:
        with self._lock:
            if len(self._events) == self._events.maxlen:
                if self.dropped_events == 0:
                    log.warning("stream: %d undrained events; dropping the oldest (call "
                                "results() to drain, or raise max_events)", len(self._events))
                self.dropped_events += 1
            self._events.append(event)

    def results(self) -> list[StreamEvent]:
        """Events decoded since the last call (each event is returned once; at most
        ``max_events``, the oldest dropped past that)."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
            return out

    @property
    def buffered_seconds(self) -> float:
        """Audio held by the stream (the last window's start on), in seconds."""
        with self._lock:
            return len(self._buf) / self.rate

    @property
    def pending_events(self) -> int:
        """Decoded events not yet fetched with ``results()``."""
        with self._lock:
            return len(self._events)


def smoothed(recent: Sequence[AudioEncoding]) -> AudioEncoding:
    """The re-normalised mean embedding and mean head logits of recent windows."""
    if len(recent) == 1:
        return recent[0]
    emb = np.mean([r.embedding for r in recent], axis=0)
    emb = (emb / np.linalg.norm(emb)).astype(np.float32)
    heads = {h: np.mean([r.heads[h] for r in recent], axis=0) for h in recent[-1].heads}
    return AudioEncoding(emb, heads, recent[-1].duration_s, len(recent))


# --------------------------------------------------------------------------- frame reuse

def plan_reuse(rt: "Runtime", config: StreamConfig) -> tuple[FramePlan | None, str]:
    """Whether a stream with ``config`` can reuse front-end frames on ``rt``'s bundle, and
    why (not). Opens the split's two sessions when it can."""
    m = rt.manifest
    split = m.stream
    rate = m.sample_rate
    window = max(1, int(round(config.window_s * rate)))
    hop = max(1, int(round(config.hop_s * rate)))
    if config.reuse == "off":
        return None, "reuse='off'"
    if split is None:
        return None, ("the bundle has no streaming split (audio_frontend.onnx + "
                      "audio_encoder.onnx: re-export it, or add one with python -m "
                      "clapedge.export.stream_split BUNDLE)")
    if not split.exact and config.reuse != "approx":
        return None, ("the bundle's front end is not frame-local (stream.exact is false: "
                      "it normalises over time, e.g. GroupNorm), so reused frames would "
                      "differ from the offline windows; pass reuse='approx' to reuse them "
                      "anyway")
    if hop % split.frame_stride:
        return None, (f"hop {hop} samples is not a multiple of the frame stride "
                      f"{split.frame_stride} (windows would not start on a frame)")
    if window < split.receptive_field:
        return None, f"window {window} samples is shorter than one frame"
    segments = segment(np.zeros(window, np.float32), rate, m.clip)
    bucket = (max(1, int(round(m.clip.bucket_seconds * rate)))
              if m.clip.bucket_seconds > 0 else 0)
    if len(segments) != 1 or len(segments[0]) != window \
            or padded_length(window, bucket) != window:
        return None, (f"an offline window of {config.window_s} s is not encoded as one "
                      f"unpadded clip (clip policy min/max_seconds, bucket_seconds)")
    rt.bundle.tower("audio_frontend")
    frames = (window - split.receptive_field) // split.frame_stride + 1
    new = hop // split.frame_stride
    if split.step is not None and min(frames, new) >= MIN_STEP_FRAMES and (
            (config.reuse == "auto" and split.exact) or config.reuse == "approx"):
        rt.bundle.tower("audio_step")
        plan = FramePlan(split.frame_stride, split.receptive_field, frames, split.exact,
                         step=True)
        return plan, (f"causal step: encoding only each hop's {new} new frames against "
                      f"cached keys/values ({split.causal_context} frames of left context "
                      f"per layer{'' if split.exact else ', approximate front-end frames'}); "
                      f"windows see the stream before them")
    rt.bundle.tower("audio_encoder")
    plan = FramePlan(split.frame_stride, split.receptive_field, frames, split.exact)
    return plan, (f"reusing front-end frames ({frames} per window, {new}"
                  f" new per hop{'' if split.exact else ', approximate'})")


MIN_STEP_FRAMES = 2  # the exported step's smallest input (export/stream_step.py)


class StepState:
    """What a causal bundle's stream carries between hops (all bounded): the last
    ``step_context`` encoder-input frames (the positional conv's past), the keys/values of
    the last ``causal_context`` frames per layer, and the final states of the current
    window's frames (for its mean pooling)."""

    def __init__(self, rt: "Runtime"):
        split = rt.manifest.stream
        step = split.step
        kv = step.input("past_key").shape
        self.layers, self.left, self.hidden = int(kv[0]), int(kv[2]), int(kv[3])
        self.context = np.zeros((1, split.step_context, self.hidden), np.float32)
        self.keys = np.zeros((self.layers, 1, self.left, self.hidden), np.float32)
        self.values = np.zeros_like(self.keys)
        self.valid = 0
        self.finals = np.zeros((0, self.hidden), np.float32)  # frames [finals_first, done)
        self.finals_first = 0
        self.done = 0          # frames encoded so far (absolute index of the next one)
        self.encoded = 0       # frames the step computed (for benchmarks)

    def encode(self, step, first: int, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Runs the step for the window whose first frame is ``first`` and whose frames
        are ``frames`` [W, H]: only those past ``done`` are new."""
        if not first <= self.done <= first + len(frames):
            raise BundleError(f"stream: the causal step lost its place (window at frame "
                              f"{first}, {self.done} frames encoded)")
        new = frames[self.done - first:]
        older = self.finals[first - self.finals_first:] if self.done > first else \
            np.zeros((0, self.hidden), np.float32)
        heads = list(step.spec.heads)
        names = [EMBEDDING] + [HEAD_PREFIX + h for h in heads] + [
            "new_key", "new_value", "new_hidden"]
        out = step.run({FRAMES: new[None], "context": self.context, "past_key": self.keys,
                        "past_value": self.values,
                        "past_valid": np.array([self.valid], np.int64),
                        "past_sum": older.sum(axis=0, dtype=np.float32)[None],
                        "past_count": np.array([len(older)], np.float32)}, names)
        n = len(new)
        self.keys = np.concatenate([self.keys, out["new_key"]], axis=2)[:, :, -self.left:]
        self.values = np.concatenate([self.values, out["new_value"]], axis=2)[:, :, -self.left:]
        self.valid = min(self.left, self.valid + n)
        c = self.context.shape[1]
        self.context = np.concatenate([self.context, new[None]], axis=1)[:, -c:] if c else \
            self.context
        self.finals = np.concatenate([older, out["new_hidden"][0]])
        self.finals_first = first
        self.done = first + len(frames)
        self.encoded += n
        return out


def encode_window(rt: "Runtime", stream: AudioStream, start: int,
                  samples: np.ndarray) -> AudioEncoding | None:
    """The window's encoding from cached front-end frames plus the encoder, or None when
    this window must be encoded whole (no plan, a short or end-aligned window)."""
    plan, cache = stream.plan, stream.frames
    if plan is None or cache is None or len(samples) != stream.window \
            or start % plan.stride:
        return None
    frontend = rt.bundle.tower("audio_frontend")
    encoder = None if plan.step else rt.bundle.tower("audio_encoder")

    def compute(chunk: np.ndarray) -> np.ndarray:
        feeds = {WAVEFORM: chunk[None]}
        if frontend.has_input(ATTENTION_MASK):
            feeds[ATTENTION_MASK] = np.ones((1, len(chunk)), np.int64)
        return frontend.run(feeds, [FRAMES])[FRAMES][0]

    frames = cache.window(start, samples, compute)
    if plan.step:
        step = rt.bundle.tower("audio_step")
        if stream.step is None:
            stream.step = StepState(rt)
        result = stream.step.encode(step, start // plan.stride, frames)
        heads = list(step.spec.heads)
        rt._check_embedding(result[EMBEDDING], 1, "audio step")
        return AudioEncoding(result[EMBEDDING][0].astype(np.float32, copy=True),
                             {h: result[HEAD_PREFIX + h][0].copy() for h in heads},
                             len(samples) / rt.sample_rate, 1)
    heads = list(encoder.spec.heads)
    outputs = [EMBEDDING] + [HEAD_PREFIX + h for h in heads]
    feeds = {FRAMES: frames[None]}
    if encoder.has_input(ATTENTION_MASK):
        feeds[ATTENTION_MASK] = np.ones((1, len(samples)), np.int64)
    result = encoder.run(feeds, outputs)
    rt._check_embedding(result[EMBEDDING], 1, "audio encoder")
    return AudioEncoding(result[EMBEDDING][0].astype(np.float32, copy=True),
                         {h: result[HEAD_PREFIX + h][0].copy() for h in heads},
                         len(samples) / rt.sample_rate, 1)
