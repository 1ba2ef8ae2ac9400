"""The audio frontend: decode, mix to mono, resample, validate, cut into model inputs.

Shared by the runtime and by calibration (``calib/``), so a model is calibrated on exactly
the inputs it will see on the device.

Decoding. Files are decoded with soundfile (libsndfile) by their content, not their name:
WAV (8/16/24/32-bit PCM, float), FLAC, OGG (Vorbis, Opus), MP3 and the other formats
libsndfile reads. A FLAC file named ``.wav`` is fine; a file libsndfile cannot decode
(empty, truncated header, a text file, an unsupported codec) raises ``AudioError`` naming
the file and the problem. Arrays are accepted as int16, int32, float32 or float64, 1-D
``[samples]`` or 2-D ``[samples, channels]`` (soundfile's layout), with a sample rate;
integers are scaled to [-1, 1) by 2**15 and 2**31 as libsndfile does. Files and arrays
must have at most ``MAX_CHANNELS`` channels and a rate from ``MIN_RATE`` to ``MAX_RATE``
Hz: a 40 KB WAV whose header claims 1 Hz would otherwise resample to 320 M samples.

Mono and rate. Channels are averaged; the signal is resampled to the bundle's rate with
soxr at "HQ" quality, streamed block by block. Files are read in blocks of
``BLOCK_FRAMES`` frames (fewer for many channels, at most ``BLOCK_SAMPLES`` samples), so
``load_audio`` holds at most the resampled mono float32 signal plus one block, whatever the
file's rate, channel count or length, and ``stream_audio`` (used to embed) only one block.
Arrays go through the same block path, so a file and the same samples as an array give the
same signal.

Validation. No samples (also: none left after resampling) -> ``AudioError``; a NaN or Inf
sample, or one beyond ``MAX_ABS_SAMPLE`` (it would overflow when mixed or resampled) ->
``AudioError`` naming the time of the first one. Silence is valid input.

Clip policy (``ClipPolicy`` in the manifest; ``segment`` below): shorter than
``min_seconds`` -> zero-padded at the end to ``min_seconds``, the padding counted as
signal (mask 1), so the model always sees at least its minimum receptive field; up to
``max_seconds`` -> one segment; longer -> windows of ``window_seconds`` every
``hop_seconds`` (``frame_windows``), the last one ending exactly at the end of the signal.
Deterministic: no random crop anywhere. ``SegmentStream`` yields the same segments from a
signal that arrives in chunks, holding at most ``max_seconds`` (or one window) plus one
chunk, so a file of any length is embedded in bounded memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr

from clapedge.errors import AudioError
from clapedge.runtime.manifest import ClipPolicy

BLOCK_FRAMES = 1 << 16
BLOCK_SAMPLES = 1 << 18
MAX_CHANNELS = 64
MIN_RATE, MAX_RATE = 1000, 768_000
MAX_ABS_SAMPLE = 1e6
_INT_SCALE = {np.dtype(np.int16): 1.0 / 32768.0, np.dtype(np.int32): 1.0 / 2147483648.0}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
READABLE = "WAV, FLAC, OGG (Vorbis/Opus), MP3 and the other formats libsndfile reads"


def load_audio(source, sample_rate: int | None = None, *, target_rate: int,
               block_frames: int = BLOCK_FRAMES) -> np.ndarray:
    """Decode ``source`` to a validated float32 mono signal at ``target_rate``.

    ``source``: a path, a numpy array (with ``sample_rate``), or a tuple
    ``(array, sample_rate)``. ``sample_rate`` is ignored for paths (a file knows its rate).
    """
    src = _open(source, sample_rate, block_frames)
    acc = _Accumulator(src.rate, target_rate, src.frames)
    for mono in src.blocks:
        acc.push(mono)
    return _nonempty(acc.finish(), src, target_rate)


def stream_audio(source, sample_rate: int | None = None, *, target_rate: int,
                 block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """``load_audio`` in pieces: yields float32 mono chunks at ``target_rate`` whose
    concatenation is ``load_audio``'s signal, holding one block at a time. Errors are
    raised where they are found (a NaN an hour in: after the chunks before it)."""
    src = _open(source, sample_rate, block_frames)
    resampler = Resampler(src.rate, target_rate)
    n = 0
    for mono in src.blocks:
        y = resampler.process(mono)
        n += len(y)
        yield y
    y = resampler.flush()
    _nonempty(y, src, target_rate, n)
    yield y


class _Source:
    """An opened audio source: its name, rate, frame count (a hint) and mono blocks."""

    def __init__(self, name: str, rate: int, frames: int, blocks: Iterator[np.ndarray]):
        self.name, self.rate, self.frames, self.blocks = name, rate, frames, blocks


def _open(source, sample_rate, block_frames: int) -> _Source:
    if isinstance(source, (str, os.PathLike)):
        return _open_file(Path(source), block_frames)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        source, sample_rate = source
    if isinstance(source, np.ndarray):
        return _open_array(source, sample_rate, block_frames)
    raise AudioError(f"audio must be a file path or a numpy array, got "
                     f"{type(source).__name__}")


def _nonempty(y: np.ndarray, src: _Source, target_rate: int, before: int = 0) -> np.ndarray:
    if before + len(y) == 0:
        raise AudioError(f"{src.name}: too short: no samples left at {target_rate} Hz (the "
                         f"audio is shorter than one sample at that rate)")
    return y


def describe(source) -> str:
    """A short name of an audio source for messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, tuple) and len(source) == 2:
        source = source[0]
    if isinstance(source, np.ndarray):
        return f"array{tuple(source.shape)} {source.dtype}"
    return type(source).__name__


class Resampler:
    """Streaming soxr "HQ" resampler (or a pass-through at equal rates). Its output does not
    depend on how the input is chunked, so a stream and a whole file give the same signal."""

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate, self.out_rate = in_rate, out_rate
        self._soxr = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def process(self, mono: np.ndarray, last: bool = False) -> np.ndarray:
        if self._soxr is None:
            return mono
        return self._soxr.resample_chunk(mono, last=last)

    def flush(self) -> np.ndarray:
        return self.process(np.zeros(0, np.float32), last=True)


class _Accumulator:
    """Resamples mono blocks (or passes them through) into one growing float32 buffer."""

    def __init__(self, in_rate: int, out_rate: int, expected_in: int):
        self.resampler = Resampler(in_rate, out_rate)
        # a header's frame count can be an estimate (MP3) or absurd: cap the first guess
        expected = min(max(0, expected_in), 1 << 25) * out_rate // in_rate + 64
        self.buf = np.empty(expected, dtype=np.float32)
        self.n = 0

    def _append(self, y: np.ndarray) -> None:
        if self.n + len(y) > len(self.buf):
            grown = np.empty(max(2 * len(self.buf), self.n + len(y)), dtype=np.float32)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:self.n + len(y)] = y
        self.n += len(y)

    def push(self, mono: np.ndarray) -> None:
        self._append(self.resampler.process(mono))

    def finish(self) -> np.ndarray:
        self._append(self.resampler.flush())
        if len(self.buf) > self.n + 4096:
            return self.buf[:self.n].copy()
        return self.buf[:self.n]


def check_finite(mono: np.ndarray, offset: int, rate: int, name: str) -> None:
    """Refuse NaN and Inf samples, and samples beyond ``MAX_ABS_SAMPLE`` (float audio lies
    in [-1, 1], a little beyond when clipped; 1e38 is corrupt data, and would overflow to
    Inf when the channels are mixed or the signal resampled)."""
    ok = np.abs(mono) <= MAX_ABS_SAMPLE  # False for NaN too
    if ok.all():
        return
    first = int(np.argmin(ok))
    i, value = offset + first, float(mono[first])
    where = f"at {i / rate:.3f} s (sample {i})"
    if not np.isfinite(value):
        raise AudioError(f"{name}: NaN or Inf sample {where}; the audio is corrupt")
    raise AudioError(f"{name}: sample of magnitude {abs(value):.3g} {where}; audio samples "
                     f"lie in [-1, 1] (a little beyond when clipped), not beyond "
                     f"{MAX_ABS_SAMPLE:g}; the audio is corrupt")


def _mono(block: np.ndarray) -> np.ndarray:
    if block.shape[1] == 1:
        return block[:, 0]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf: refused by check_finite
        return block.mean(axis=1, dtype=np.float32)


def read_blocks(path: str | os.PathLike, block_frames: int = BLOCK_FRAMES):
    """Decode a file block by block: yields (sample_rate, float32 mono block), each block
    checked for NaN/Inf. Raises ``AudioError`` naming the file for anything unreadable,
    including a file without samples."""
    src = _open_file(Path(path), block_frames)
    for mono in src.blocks:
        yield src.rate, mono


def _open_file(path: Path, block_frames: int) -> _Source:
    name = str(path)
    if not path.exists():
        raise AudioError(f"{name}: no such file")
    if path.is_dir():
        raise AudioError(f"{name}: is a directory, not an audio file")
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{name}: cannot decode audio ({_reason(e)}); readable: "
                         f"{READABLE}") from None
    try:
        check_rate(f.samplerate, name)
        if not 0 < f.channels <= MAX_CHANNELS:
            raise AudioError(f"{name}: {f.channels} channels; at most {MAX_CHANNELS} are "
                             f"supported")
    except AudioError:
        f.close()
        raise
    frames = max(1, min(block_frames, BLOCK_SAMPLES // f.channels))
    return _Source(name, f.samplerate, f.frames, _file_blocks(f, name, frames))


def _file_blocks(f: sf.SoundFile, name: str, block_frames: int) -> Iterator[np.ndarray]:
    with f:
        pos = 0
        blocks = f.blocks(block_frames, dtype="float32", always_2d=True)
        while True:
            try:
                block = next(blocks, None)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise AudioError(f"{name}: decoding failed after {pos} frames "
                                 f"({_reason(e)})") from None
            if block is None:
                break
            mono = _mono(block)
            check_finite(mono, pos, f.samplerate, name)
            pos += len(mono)
            yield mono
    if pos == 0:
        raise AudioError(f"{name}: contains no audio samples (zero length)")


def _reason(e: Exception) -> str:
    text = str(e)
    # libsndfile messages repeat the path: keep the part after it
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text


def check_rate(sample_rate, name: str) -> int:
    if sample_rate is None:
        raise AudioError(f"{name}: a numpy array needs its sample_rate")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or sample_rate <= 0:
        raise AudioError(f"{name}: sample_rate {sample_rate!r} must be a positive integer")
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioError(f"{name}: sample rate {sample_rate} Hz is outside the supported "
                         f"{MIN_RATE}..{MAX_RATE} Hz")
    return int(sample_rate)


def as_frames(array: np.ndarray, name: str) -> np.ndarray:
    """Check an array's dtype and layout; returns it as [samples, channels] (a view)."""
    if array.dtype not in _INT_SCALE and array.dtype not in _FLOATS:
        raise AudioError(f"{name}: unsupported dtype {array.dtype}; use int16, int32, "
                         f"float32 or float64")
    if array.ndim == 1:
        return array[:, None]
    if array.ndim != 2:
        raise AudioError(f"{name}: expected [samples] or [samples, channels], got "
                         f"{array.ndim} dimensions")
    if array.shape[1] > MAX_CHANNELS:
        raise AudioError(f"{name}: expected [samples, channels] (soundfile's layout) with at "
                         f"most {MAX_CHANNELS} channels; is it [channels, samples]? pass "
                         f"array.T")
    return array


def to_mono(frames: np.ndarray) -> np.ndarray:
    """[samples, channels] int16/int32/float -> float32 mono (integers scaled to [-1, 1))."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused next
        block = frames.astype(np.float32)
    scale = _INT_SCALE.get(frames.dtype)
    if scale is not None:
        block *= np.float32(scale)
    return _mono(block)


def _open_array(array: np.ndarray, sample_rate, block_frames: int) -> _Source:
    name = describe(array)
    rate = check_rate(sample_rate, name)
    array = as_frames(array, name)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise AudioError(f"{name}: contains no audio samples (zero length)")
    return _Source(name, rate, array.shape[0], _array_blocks(array, rate, name, block_frames))


def _array_blocks(array: np.ndarray, rate: int, name: str,
                  block_frames: int) -> Iterator[np.ndarray]:
    for start in range(0, array.shape[0], block_frames):
        mono = to_mono(array[start:start + block_frames])
        check_finite(mono, start, rate, name)
        yield mono


# --------------------------------------------------------------------------- clip policy

def seconds_to_samples(seconds: float, rate: int) -> int:
    return max(1, int(round(seconds * rate)))


def frame_windows(n_samples: int, window: int, hop: int) -> list[tuple[int, int]]:
    """Deterministic [start, end) windows covering ``n_samples``: starts 0, hop, 2*hop, ...
    while a full window fits, plus one last window ending exactly at ``n_samples`` when the
    regular ones stop short of it. A signal no longer than ``window`` is one window."""
    if window <= 0 or hop <= 0:
        raise ValueError(f"window ({window}) and hop ({hop}) must be positive")
    if n_samples <= window:
        return [(0, n_samples)]
    spans = [(s, s + window) for s in range(0, n_samples - window + 1, hop)]
    if spans[-1][1] < n_samples:
        spans.append((n_samples - window, n_samples))
    return spans


def segment(signal: np.ndarray, rate: int, clip: ClipPolicy) -> list[np.ndarray]:
    """The model inputs of one signal under the clip policy (see the module docstring).
    Windows are views of ``signal`` (no copy)."""
    n = len(signal)
    min_n = seconds_to_samples(clip.min_seconds, rate)
    if n < min_n:
        padded = np.zeros(min_n, dtype=np.float32)
        padded[:n] = signal
        return [padded]
    if n <= seconds_to_samples(clip.max_seconds, rate):
        return [signal]
    window = seconds_to_samples(clip.window_seconds, rate)
    hop = seconds_to_samples(clip.hop_seconds, rate)
    return [signal[s:e] for s, e in frame_windows(n, window, hop)]


class SegmentStream:
    """``segment`` of a signal that arrives in chunks (``stream_audio``'s), in bounded
    memory: ``head()`` reads up to ``max_seconds`` and returns the whole signal when it ends
    by then (one segment: pass it to ``segment``), else None; then ``windows()`` yields the
    windows of the long signal as they complete (views: use each before asking for the
    next batch is fine, they stay valid). Holds at most ``max_seconds`` of samples (or one
    window) plus one chunk. ``n`` is the number of samples seen so far."""

    def __init__(self, chunks: Iterable[np.ndarray], rate: int, clip: ClipPolicy):
        self._chunks = iter(chunks)
        self.max_n = seconds_to_samples(clip.max_seconds, rate)
        self.window = seconds_to_samples(clip.window_seconds, rate)
        self.hop = seconds_to_samples(clip.hop_seconds, rate)
        self._buf = np.zeros(0, dtype=np.float32)
        self._base = 0  # the signal's index of _buf[0]
        self.n = 0
        self._done = False

    def _pull(self) -> None:
        chunk = next(self._chunks, None)
        if chunk is None:
            self._done = True
            return
        if len(chunk):
            self._buf = np.concatenate([self._buf, np.asarray(chunk, dtype=np.float32)])
            self.n += len(chunk)

    def head(self) -> np.ndarray | None:
        while not self._done and self.n <= self.max_n:
            self._pull()
        return self._buf if self.n <= self.max_n else None

    def windows(self) -> Iterator[np.ndarray]:
        """The windows of ``frame_windows(n, window, hop)``, for a signal longer than
        ``max_seconds`` (call ``head()`` first)."""
        start = last_end = 0
        while True:
            while self.n >= start + self.window:
                offset = start - self._base
                yield self._buf[offset:offset + self.window]
                last_end, start = start + self.window, start + self.hop
            # keep what the next regular window and a final one ending at the end need
            keep = min(start, self.n - self.window)
            if keep > self._base:
                self._buf = self._buf[keep - self._base:]
                self._base = keep
            if self._done:
                break
            self._pull()
        if last_end < self.n:
            yield self._buf[self.n - self.window - self._base:]


def padded_length(n: int, bucket: int) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (0 or 1: ``n`` itself)."""
    return n if bucket <= 1 else bucket * math.ceil(n / bucket)


def batch_segments(segments: Sequence[np.ndarray], length: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(waveform float32 [B, L], attention_mask int64 [B, L]): each segment left-aligned,
    zero-padded to ``length`` (default: the longest), mask 1 on its samples."""
    width = max(len(s) for s in segments) if length is None else length
    waveform = np.zeros((len(segments), width), dtype=np.float32)
    mask = np.zeros((len(segments), width), dtype=np.int64)
    for row, seg in enumerate(segments):
        waveform[row, :len(seg)] = seg
        mask[row, :len(seg)] = 1
    return waveform, mask
