"""Streaming soak: one stream fed an hour of audio faster than real time, and a slow consumer.

    python -m clapedge.bench.soak [--bundle PATH] [--hours 1] [--speed 20] [--doc]

1. Soak. One stream (window 2 s, hop 0.5 s, the bundle's first three banks, frame reuse as
   the bundle allows) is fed ``--hours`` of audio at ``--speed`` x real time: a producer
   thread feeds int16 chunks of random size (10 ms to 500 ms) at 48 kHz (so the streaming
   resampler runs too), paced so that the audio fed never runs ahead of ``speed`` x the
   wall clock, with ``accept_waveform(timeout=...)``: if the decoder falls behind, the
   producer waits (back-pressure) and the achieved speed drops, which the report shows. A
   consumer thread decodes whenever a window is ready and drains ``results()`` every
   second (or at 64 undrained events). A sampler records, every ``--sample-s``: RSS, the
   stream's buffered audio, its undrained events and the frames it caches.
2. Slow consumer. A second stream is fed as fast as it accepts, in refuse mode
   (``accept_waveform`` without timeout: ``AudioError`` past ``max_buffer_s``; the producer
   decodes nothing itself, backs off 5 ms and feeds the same chunk again), while the
   consumer decodes with an extra 20 ms per window and never calls ``results()``. Checks:
   the buffer never exceeds ``max_buffer_s``, undrained events stay at ``max_events`` (the
   oldest dropped and counted), and every window of the audio fed is decoded (a refused
   chunk is not lost).

The bundle: ``--bundle``, else the default model's INT8 bundle that ``bench/stream.py`` uses
(cached; exported when missing, which needs the [export] extra). ``--doc`` writes the "Streaming soak" section of docs/reliability.md.
tests/test_stream_soak.py runs a few-second version on a tiny bundle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clapedge.errors import AudioError

ROOT = Path(__file__).resolve().parents[1]
IN_RATE = 48000
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


class Voice:
    """An endless speech-like int16 signal at IN_RATE: gliding harmonics, syllable envelope,
    pauses, noise; continuous across chunks, deterministic for a seed."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.phase = 0.0
        self.t = 0

    def take(self, n: int) -> np.ndarray:
        t = (self.t + np.arange(n)) / IN_RATE
        f0 = 140 + 60 * np.sin(2 * np.pi * 0.13 * t) + 20 * np.sin(2 * np.pi * 1.1 * t)
        phase = self.phase + 2 * np.pi * np.cumsum(f0) / IN_RATE
        self.phase = float(phase[-1] % (2 * np.pi))
        x = sum(np.sin(h * phase) / h for h in range(1, 6))
        env = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) * (np.sin(2 * np.pi * 0.07 * t) > -0.6)
        y = 0.25 * x * env + 0.01 * self.rng.standard_normal(n)
        self.t += n
        return np.round(np.clip(y, -1, 1) * 32767).astype(np.int16)


@dataclass
class Sample:
    wall_s: float
    audio_s: float
    rss_mb: float
    buffered_s: float
    pending_events: int
    cached_frames: int
    decoded: int


@dataclass
class SoakResult:
    audio_s: float
    wall_s: float
    decoded: int
    expected: int
    refused_waits: int
    max_wait_s: float
    samples: list[Sample] = field(default_factory=list)
    hop_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reuse: str = ""
    dropped: int = 0

    @property
    def speed(self) -> float:
        return self.audio_s / self.wall_s

    def rss_growth_mb(self) -> float:
        """RSS at the end minus RSS after the first fifth (warm-up)."""
        warm = [s for s in self.samples if s.audio_s >= 0.2 * self.audio_s] or self.samples
        return self.samples[-1].rss_mb - warm[0].rss_mb


def soak(rt, audio_s: float, speed: float, *, seed: int = 0, sample_s: float = 1.0,
         max_buffer_s: float = 10.0, banks: list[str] | None = None,
         min_chunk_s: float = 0.01, max_chunk_s: float = 0.5) -> SoakResult:
    """Streams ``audio_s`` seconds at up to ``speed`` x real time (``speed <= 0``:
    unpaced) through one stream of ``rt``; see the module docstring."""
    from clapedge.runtime.audio import frame_windows

    s = rt.create_stream(2.0, 0.5, banks=rt.banks[:3] if banks is None else banks,
                         max_buffer_s=max_buffer_s)
    voice, rng = Voice(seed), np.random.default_rng(seed + 1)
    total_in = int(audio_s * IN_RATE)
    fed = [0]
    decoded = [0]
    hop_ms: list[float] = []
    errors: list[str] = []
    waits = [0, 0.0]
    samples: list[Sample] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def producer():
        try:
            while fed[0] < total_in:
                n = min(total_in - fed[0], int(rng.uniform(min_chunk_s, max_chunk_s) * IN_RATE))
                chunk = voice.take(n)
                if speed > 0:
                    ahead = fed[0] / IN_RATE / speed - (time.perf_counter() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                w0 = time.perf_counter()
                s.accept_waveform(IN_RATE, chunk, timeout=60.0)
                waited = time.perf_counter() - w0
                if waited > 0.05:
                    waits[0] += 1
                    waits[1] = max(waits[1], waited)
                fed[0] += n
            s.input_finished()
        except Exception as e:  # reported, and the run fails
            errors.append(f"producer: {e!r}")
        finally:
            done.set()

    def consumer():
        last_drain = time.perf_counter()
        try:
            while not (done.is_set() and not rt.is_ready(s)):
                if rt.is_ready(s):
                    c0 = time.perf_counter()
                    rt.decode(s)
                    hop_ms.append(1e3 * (time.perf_counter() - c0))
                else:
                    time.sleep(0.001)
                if time.perf_counter() - last_drain >= 1.0 or s.pending_events >= 64:
                    decoded[0] += len(s.results())
                    last_drain = time.perf_counter()
            decoded[0] += len(s.results())
        except Exception as e:
            errors.append(f"consumer: {e!r}")

    def sampler():
        while not stop.is_set():
            frames = s.frames
            samples.append(Sample(time.perf_counter() - t0, fed[0] / IN_RATE, rss_mb(),
                                  s.buffered_seconds, s.pending_events,
                                  0 if frames is None or frames.rows is None
                                  else len(frames.rows), decoded[0] + s.pending_events))
            stop.wait(sample_s)

    stop = threading.Event()
    threads = [threading.Thread(target=f, daemon=True) for f in (producer, consumer, sampler)]
    for t in threads:
        t.start()
    threads[0].join()
    threads[1].join()
    stop.set()
    threads[2].join()
    wall = time.perf_counter() - t0
    n16 = int(round(total_in * rt.sample_rate / IN_RATE))
    expected = len(frame_windows(n16, 2 * rt.sample_rate, rt.sample_rate // 2))
    return SoakResult(fed[0] / IN_RATE, wall, decoded[0], expected, waits[0], waits[1],
                      samples, hop_ms, errors, s.plan_reason, s.dropped_events)


@dataclass
class SlowResult:
    audio_s: float
    wall_s: float
    refusals: int
    max_buffered_s: float
    max_pending: int
    dropped: int
    decoded: int
    expected: int
    max_buffer_s: float
    max_events: int
    rss_start_mb: float
    rss_end_mb: float
    messages: set[str] = field(default_factory=set)


def slow_consumer(rt, audio_s: float, *, decode_delay_s: float = 0.02, seed: int = 2,
                  max_buffer_s: float = 6.0, max_events: int = 32) -> SlowResult:
    """A producer feeding as fast as the stream accepts (refuse mode) against a consumer
    slower than that which never drains ``results()``."""
    from clapedge.runtime.audio import frame_windows

    s = rt.create_stream(2.0, 0.5, banks=[], max_buffer_s=max_buffer_s, max_events=max_events)
    voice, rng = Voice(seed), np.random.default_rng(seed)
    total_in = int(audio_s * IN_RATE)
    state = {"refusals": 0, "max_buf": 0.0, "max_pending": 0, "decoded": 0}
    messages: set[str] = set()
    done = threading.Event()
    rss0 = rss_mb()
    t0 = time.perf_counter()

    def consumer():
        while not (done.is_set() and not rt.is_ready(s)):
            if rt.decode(s) is not None:
                state["decoded"] += 1
                time.sleep(decode_delay_s)
            else:
                time.sleep(0.001)
            state["max_pending"] = max(state["max_pending"], s.pending_events)

    worker = threading.Thread(target=consumer, daemon=True)
    worker.start()
    fed = 0
    while fed < total_in:
        n = min(total_in - fed, int(rng.uniform(0.01, 0.5) * IN_RATE))
        chunk = voice.take(n)
        while True:
            try:
                s.accept_waveform(IN_RATE, chunk)
                break
            except AudioError as e:
                state["refusals"] += 1
                messages.add(str(e).split(";")[0].split(" s of audio")[-1].strip())
                time.sleep(0.005)
            finally:
                state["max_buf"] = max(state["max_buf"], s.buffered_seconds)
        fed += n
    s.input_finished()
    done.set()
    worker.join()
    wall = time.perf_counter() - t0
    n16 = int(round(total_in * rt.sample_rate / IN_RATE))
    expected = len(frame_windows(n16, 2 * rt.sample_rate, rt.sample_rate // 2))
    return SlowResult(fed / IN_RATE, wall, state["refusals"], state["max_buf"],
                      max(state["max_pending"], s.pending_events), s.dropped_events,
                      state["decoded"], expected, max_buffer_s, max_events, rss0, rss_mb(),
                      messages)


# --------------------------------------------------------------------------- report

def _curve(r: SoakResult, points: int = 11) -> list[Sample]:
    picks = []
    for i in range(points):
        target = r.audio_s * i / (points - 1)
        picks.append(min(r.samples, key=lambda s: abs(s.audio_s - target)))
    return picks


def markdown(r: SoakResult, slow: SlowResult, args, machine: str, loads) -> str:
    hop = r.hop_ms
    samples = r.samples
    out = [
        f"Command: `python -m clapedge.bench.soak --hours {args.hours:g} --speed {args.speed:g}"
        f" --doc` on `{args.bundle_label}`. Machine: {machine}; load average "
        f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end (shared with other jobs).",
        "",
        f"**Soak.** {r.audio_s / 3600:.2f} h of audio (48 kHz int16 chunks of 10 to 500 ms, "
        f"resampled to 16 kHz by the stream) through one stream (window 2 s, hop 0.5 s, "
        f"{r.reuse}) in {r.wall_s:.0f} s: **{r.speed:.1f}x real time** (paced at "
        f"{args.speed:g}x; the producer waited for the decoder {r.refused_waits} times, at "
        f"most {r.max_wait_s:.2f} s). {r.decoded} events decoded of {r.expected} windows "
        f"expected, {r.dropped} dropped, errors: "
        f"{'; '.join(r.errors) or 'none'}. Per-hop decode: p50 {np.percentile(hop, 50):.1f} ms, "
        f"p99 {np.percentile(hop, 99):.1f} ms, max {max(hop):.1f} ms.",
        "",
        f"Over the run: RSS {min(s.rss_mb for s in samples):.0f} to "
        f"{max(s.rss_mb for s in samples):.0f} MB, **{r.rss_growth_mb():+.1f} MB from the end "
        f"of warm-up (first fifth of the audio) to the end**; buffered audio at most "
        f"{max(s.buffered_s for s in samples):.2f} s (limit: one window + one hop + one chunk "
        f"when decoding keeps up, `max_buffer_s` {args.max_buffer:g} s otherwise); undrained "
        f"events at most {max(s.pending_events for s in samples)} (drained every second or at 64); "
        f"cached front-end frames at most {max(s.cached_frames for s in samples)} (one window).",
        "",
        "| audio fed | wall | RSS | buffered audio | undrained events | cached frames |",
        "|---|---|---|---|---|---|"]
    for s in _curve(r):
        out.append(f"| {s.audio_s / 60:.0f} min | {s.wall_s:.0f} s | {s.rss_mb:.0f} MB | "
                   f"{s.buffered_s:.2f} s | {s.pending_events} | {s.cached_frames} |")
    out += [
        "",
        f"**Slow consumer.** {slow.audio_s:.0f} s of audio offered as fast as the stream "
        f"accepts it, in refuse mode (`accept_waveform` without `timeout`), to a consumer that "
        f"sleeps {args.slow_delay * 1e3:.0f} ms after each window and never calls `results()`"
        f" (`max_buffer_s={slow.max_buffer_s:g}`, `max_events={slow.max_events}`), "
        f"{slow.wall_s:.0f} s: {slow.refusals} chunks refused with `AudioError` "
        f"(\"{'; '.join(sorted(slow.messages))[:160]}\") and fed again after a 5 ms back-off; "
        f"buffered audio at most **{slow.max_buffered_s:.2f} s** (limit {slow.max_buffer_s:g}); "
        f"undrained events at most **{slow.max_pending}** (limit {slow.max_events}), "
        f"{slow.dropped} older ones dropped and counted in `dropped_events`; {slow.decoded} "
        f"windows decoded of {slow.expected} expected (a refused chunk is not lost); RSS "
        f"{slow.rss_start_mb:.0f} -> {slow.rss_end_mb:.0f} MB.",
        "",
        "Back-pressure is a refusal by default (`AudioError` naming `max_buffer_s`, the chunk "
        "not consumed, so feeding it again loses nothing) or, with `accept_waveform(..., "
        "timeout=s)`, a wait of up to `s` seconds for a decoder thread to make room. "
        "Undrained `results()` are bounded by `max_events` (default 256, the oldest dropped "
        "and counted; `decode` also returns each event). The short version runs in the test "
        "suite: `tests/test_stream_soak.py`."]
    return "\n".join(out) + "\n"


SECTION = "## Streaming soak"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def write_doc(body: str, path: Path = ROOT / "docs" / "reliability.md") -> None:
    """Replaces the body of the "Streaming soak" section (re-read just before writing; the
    other sections are left as they are)."""
    from clapedge.bench.report import replace_section

    block = f"{BEGIN}\n{body.rstrip()}\n{END}\n"
    text = path.read_text()
    if BEGIN in text and END in text:
        replace_section(path, block, BEGIN, END)
        return
    if SECTION not in text:
        raise SystemExit(f"error: {path} has no '{SECTION}' section to fill")
    head, rest = text.split(SECTION, 1)
    nxt = rest.find("\n## ")
    tail = rest[nxt:] if nxt >= 0 else "\n"
    new = head + SECTION + "\n\n" + block + tail
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from clapedge.bench.report import machine_line
    from clapedge.runtime import Runtime

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--speed", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--max-buffer", type=float, default=10.0)
    ap.add_argument("--slow-seconds", type=float, default=120.0,
                    help="audio offered to the slow consumer")
    ap.add_argument("--slow-delay", type=float, default=0.02)
    ap.add_argument("--doc", action="store_true", help="write docs/reliability.md")
    args = ap.parse_args(argv)
    if args.bundle is not None:
        bundle = args.bundle
        if not (bundle / "manifest.json").is_file():
            print(f"error: {bundle}: not a bundle (no manifest.json)", file=sys.stderr)
            return 2
    else:
        from clapedge.bench.stream import CORPUS, default_bundle

        bundle = default_bundle(None, CORPUS)
    try:
        args.bundle_label = str(bundle.resolve().relative_to(ROOT))
    except ValueError:
        args.bundle_label = str(bundle)
    loads = [os.getloadavg()[0]]
    machine = machine_line().split("; load average")[0]
    rt = Runtime(bundle, threads=args.threads)
    print(f"soak: {args.hours:g} h at {args.speed:g}x on {bundle}", flush=True)
    r = soak(rt, args.hours * 3600, args.speed, sample_s=args.sample_s,
             max_buffer_s=args.max_buffer)
    print(f"  {r.wall_s:.0f} s wall, {r.speed:.1f}x, {r.decoded}/{r.expected} events, RSS "
          f"growth {r.rss_growth_mb():+.1f} MB, errors {r.errors}", flush=True)
    slow = slow_consumer(rt, args.slow_seconds, decode_delay_s=args.slow_delay)
    print(f"  slow consumer: {slow.refusals} refusals, max buffered {slow.max_buffered_s:.2f} s,"
          f" max pending {slow.max_pending}, decoded {slow.decoded}/{slow.expected}", flush=True)
    loads.append(os.getloadavg()[0])
    body = markdown(r, slow, args, machine, loads)
    print(body)
    if args.doc:
        write_doc(body)
    ok = (not r.errors and r.decoded == r.expected and slow.decoded == slow.expected
          and slow.max_buffered_s <= slow.max_buffer_s and slow.max_pending <= slow.max_events)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
