"""Latency, real-time factor, load time and memory of a bundle (``clap-bench``).

Offline: ``embed_audio`` of one synthetic clip of ``clip_s`` seconds, ``runs`` times after
``warmup`` calls; latency percentiles and RTF = latency / audio duration (below 1 is faster
than real time). Batch: ``embed_audio`` of ``batch_size`` equal clips, as clips per second.
Streaming: a ``stream_s`` signal fed hop by hop; the latency of each ``decode`` (one hop) and
RTF = decode time / hop duration. Load: ``Bundle.load`` (manifest + audio session, files
already in the page cache) and the first call after it. Peak RSS is the process's maximum
resident set so far (it includes whatever ran before in the same process).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from clapedge.runtime.api import Runtime
from clapedge.runtime.bundle import Bundle


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    rtf: float  # p50 latency / audio seconds

    @classmethod
    def of(cls, seconds: Sequence[float], audio_s: float) -> "Latency":
        ms = np.asarray(seconds) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(round(float(p50), 3), round(float(p90), 3), round(float(p99), 3),
                   round(float(ms.mean()), 3), len(ms), round(float(p50) / 1e3 / audio_s, 5))


@dataclass(frozen=True)
class BenchReport:
    bundle: str
    model: str
    precision: str
    providers: list[str]
    threads: int
    load_ms: float
    first_call_ms: float
    clip_s: float
    offline: Latency
    batch_size: int
    batch_clips_per_s: float
    window_s: float
    hop_s: float
    stream: Latency
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_audio(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Deterministic speech-like test signal: a gliding harmonic tone under noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(0.2 / h * np.sin(h * phase) for h in range(1, 6))
    x = x + 0.02 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_benchmark(path: str | os.PathLike, *, providers="auto", threads: int | None = None,
                  clip_s: float = 4.0, runs: int = 30, warmup: int = 3, batch_size: int = 8,
                  window_s: float = 2.0, hop_s: float = 0.5, stream_s: float = 20.0
                  ) -> BenchReport:
    t0 = time.perf_counter()
    bundle = Bundle.load(path, providers=providers, threads=threads)
    load_s = time.perf_counter() - t0
    rt = Runtime(bundle)
    rate = rt.sample_rate
    clip = synthetic_audio(clip_s, rate)
    t0 = time.perf_counter()
    rt.embed_audio(clip, rate)
    first_s = time.perf_counter() - t0
    _timed(lambda: rt.embed_audio(clip, rate), warmup)
    offline = Latency.of(_timed(lambda: rt.embed_audio(clip, rate), runs), clip_s)
    clips = [synthetic_audio(clip_s, rate, seed=i) for i in range(batch_size)]
    batch_times = _timed(lambda: rt.embed_audio(clips, rate, batch_size=batch_size),
                         max(1, runs // batch_size))
    stream = rt.create_stream(window_s, hop_s, banks=[])
    signal = synthetic_audio(stream_s, rate, seed=1)
    hop = max(1, int(round(hop_s * rate)))
    hop_times = []
    for start in range(0, len(signal), hop):
        stream.accept_waveform(rate, signal[start:start + hop])
        while rt.is_ready(stream):
            t0 = time.perf_counter()
            rt.decode(stream)
            hop_times.append(time.perf_counter() - t0)
    stream.input_finished()
    stream.results()
    tower = bundle.tower("audio")
    return BenchReport(
        bundle=str(path), model=rt.manifest.model.name, precision=tower.spec.precision,
        providers=tower.providers,
        threads=tower.threads,
        load_ms=round(load_s * 1e3, 3), first_call_ms=round(first_s * 1e3, 3), clip_s=clip_s,
        offline=offline, batch_size=batch_size,
        batch_clips_per_s=round(batch_size / float(np.median(batch_times)), 3),
        window_s=window_s, hop_s=hop_s, stream=Latency.of(hop_times, hop_s),
        peak_rss_mb=round(_peak_rss_mb(), 1))
