"""Load and concurrency: many threads calling one ``Runtime`` at once.

    python -m clapedge.bench.load [--bundle build/default-int8] [--threads 8] [--calls 10000]

Every thread makes ``--calls`` calls on the same ``Runtime``, each one of ``embed_audio``,
``tag`` (default bank, k=3) or ``embed_text`` (``--mix``) on an input drawn from a pool:
audio of random length (``--min-s`` .. ``--max-s``, uniform) given as WAV files (16 and
48 kHz), float32 arrays at 16 kHz or int16 arrays at 44.1 kHz, and texts (the corpus
captions, else generated descriptions). Before the threads start, every (call, input) pair
of the workload is run once serially; each threaded result must then equal its serial
result bit for bit (arrays byte for byte, tags label, score and index exactly). Any error,
any mismatch fails the run (exit status 1).

A sampler thread records the process's resident memory (RSS, ``/proc/self/statm``) every
``--sample-s`` seconds with the number of calls done; the summary is the RSS at 0, 10, ...,
100 % of the calls and the growth between 20 % and 100 % (after warm-up). ``--plot`` writes
the curve as a PNG, ``--doc`` the ``load`` section of docs/reliability.md.

The test suite runs a small version (tests/test_reliability_load.py: 4 threads x 200 calls
on a tiny bundle).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("embed_audio", "tag", "embed_text")
DEFAULT_MIX = "embed_audio=0.4,tag=0.4,embed_text=0.2"
FRACTIONS = tuple(i / 10 for i in range(11))
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


# --------------------------------------------------------------------------- workload

@dataclass
class Pool:
    """The inputs calls draw from: audio sources (as the API takes them) and texts."""

    audio: list[Any]
    seconds: list[float]
    texts: list[str]


def _speech(corpus: Path | None) -> tuple[list[np.ndarray], list[str]]:
    """Corpus clips (16 kHz float32) and captions, or nothing when there is no corpus."""
    if corpus is None or not (corpus / "manifest.jsonl").is_file():
        return [], []
    import soundfile as sf

    clips, captions = [], []
    for line in (corpus / "manifest.jsonl").read_text().splitlines()[:200]:
        row = json.loads(line)
        x, rate = sf.read(str(corpus / row["path"]), dtype="float32")
        if rate == 16000 and x.ndim == 1 and len(x):
            clips.append(x)
        captions += row.get("captions", [])[:1]
    return clips, captions


def _synthetic(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    """A voiced-sounding test signal: harmonics of a gliding f0, syllable-rate envelope."""
    t = np.arange(n) / rate
    f0 = rng.uniform(90, 260) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(h * phase) / h for h in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)
    return (0.2 * x * envelope + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _signal(rng: np.random.Generator, seconds: float, clips: list[np.ndarray]) -> np.ndarray:
    n = max(1, int(round(seconds * 16000)))
    if not clips:
        return _synthetic(rng, n, 16000)
    parts, have = [], 0
    while have < n:
        clip = clips[int(rng.integers(len(clips)))]
        parts.append(clip)
        have += len(clip)
    x = np.concatenate(parts)
    start = int(rng.integers(0, len(x) - n + 1))
    return np.ascontiguousarray(x[start:start + n])


def _texts(rng: np.random.Generator, n: int, captions: list[str]) -> list[str]:
    if captions:
        return [captions[int(i)] for i in rng.choice(len(captions), n, replace=n > len(captions))]
    words = [["a calm", "an angry", "a happy", "a sad", "a neutral", "a whispering"],
             ["low-pitched", "high-pitched", "mid-pitched"], ["female", "male"],
             ["voice", "speaker"], ["", ", speaking slowly", ", speaking fast", ", loudly"]]
    return [" ".join(w[int(rng.integers(len(w)))] for w in words[:4])
            + words[4][int(rng.integers(len(words[4])))] for _ in range(n)]


def make_pool(n_audio: int, n_text: int, *, min_s: float, max_s: float, seed: int,
              workdir: Path, corpus: Path | None = None) -> Pool:
    """``n_audio`` audio inputs of uniform random length in [min_s, max_s], cycling through
    WAV files (16/48 kHz, written into ``workdir``), float32 arrays at 16 kHz and int16
    arrays at 44.1 kHz; ``n_text`` texts."""
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(seed)
    clips, captions = _speech(corpus)
    audio, seconds = [], []
    for i in range(n_audio):
        s = float(rng.uniform(min_s, max_s))
        x = _signal(rng, s, clips)
        form = i % 3
        if form == 0:  # a WAV file
            rate = 16000 if i % 2 == 0 else 48000
            y = x if rate == 16000 else soxr.resample(x, 16000, rate, quality="HQ")
            path = workdir / f"clip_{i:05d}.wav"
            sf.write(str(path), y, rate, subtype="PCM_16")
            audio.append(str(path))
        elif form == 1:  # float32 at the model rate
            audio.append((x, 16000))
        else:  # int16 at 44.1 kHz
            y = soxr.resample(x, 16000, 44100, quality="HQ")
            audio.append((np.clip(y * 32767, -32768, 32767).astype(np.int16), 44100))
        seconds.append(s)
    return Pool(audio, seconds, _texts(rng, n_text, captions))


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in KINDS:
            raise ValueError(f"--mix: unknown call {name.strip()!r}; known: {', '.join(KINDS)}")
        mix[name.strip()] = float(value)
    total = sum(mix.values())
    if total <= 0 or min(mix.values()) < 0:
        raise ValueError("--mix: weights must be >= 0 and not all 0")
    return {k: v / total for k, v in mix.items()}


def make_calls(pool: Pool, threads: int, calls: int, mix: dict[str, float],
               seed: int) -> list[list[tuple[str, int]]]:
    """Per thread, ``calls`` (kind, input index) pairs."""
    kinds, weights = list(mix), list(mix.values())
    plans = []
    for t in range(threads):
        rng = random.Random(seed * 7919 + t)
        plan = []
        for kind in rng.choices(kinds, weights, k=calls):
            n = len(pool.texts) if kind == "embed_text" else len(pool.audio)
            plan.append((kind, rng.randrange(n)))
        plans.append(plan)
    return plans


# --------------------------------------------------------------------------- calls

def call(rt, pool: Pool, kind: str, item: int):
    if kind == "embed_audio":
        source = pool.audio[item]
        if isinstance(source, tuple):
            return rt.embed_audio(source[0], sample_rate=source[1])
        return rt.embed_audio(source)
    if kind == "tag":
        source = pool.audio[item]
        if isinstance(source, tuple):
            return rt.tag(source[0], k=3, sample_rate=source[1])
        return rt.tag(source, k=3)
    return rt.embed_text(pool.texts[item])


def identical(a, b) -> bool:
    """Bit-identical results: arrays byte for byte, tag lists label, score and index."""
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
                and a.tobytes() == b.tobytes())
    return [(t.label, t.score, t.index) for t in a] == [(t.label, t.score, t.index) for t in b]


def difference(a, b) -> float:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape:
        return float(np.max(np.abs(a.astype(np.float64) - b)))
    return float("inf")


# --------------------------------------------------------------------------- running

class RssSampler(threading.Thread):
    """Samples (seconds, calls done, RSS bytes) every ``interval`` s until ``stop()``."""

    def __init__(self, interval: float, done):
        super().__init__(daemon=True)
        self.interval, self.done = interval, done
        self.samples: list[tuple[float, int, int]] = []
        self._stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        self.samples.append((time.perf_counter() - self.t0, self.done(), rss_bytes()))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


@dataclass
class LoadResult:
    threads: int
    calls: int                  # calls made (the planned ones unless stopped early)
    planned: int = 0
    checked: int = 0
    mismatches: int = 0
    max_abs_diff: float = 0.0
    errors: list[str] = field(default_factory=list)
    serial_s: float = 0.0
    concurrent_s: float = 0.0
    rss_start: int = 0          # before the serial pass (bundle loaded)
    rss_after_serial: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and self.mismatches == 0 and self.checked == self.calls > 0

    def rss_at(self, fraction: float) -> int:
        """RSS at the first sample with at least ``fraction`` of the calls done."""
        want = fraction * self.calls
        for _, done, rss in self.samples:
            if done >= want:
                return rss
        return self.samples[-1][2]

    def growth(self, lo: float = 0.2, hi: float = 1.0) -> int:
        return self.rss_at(hi) - self.rss_at(lo)

    def to_dict(self) -> dict:
        mb = 1 / 2 ** 20
        return {"threads": self.threads, "calls": self.calls, "planned": self.planned,
                "checked": self.checked,
                "mismatches": self.mismatches, "max_abs_diff": self.max_abs_diff,
                "errors": self.errors[:10], "n_errors": len(self.errors),
                "serial_s": round(self.serial_s, 2), "concurrent_s": round(self.concurrent_s, 2),
                "calls_per_s": round(self.calls / max(self.concurrent_s, 1e-9), 1),
                "counts": self.counts,
                "rss_mb": {"start": round(self.rss_start * mb, 1),
                           "after_serial": round(self.rss_after_serial * mb, 1),
                           **{f"{int(f * 100)}%": round(self.rss_at(f) * mb, 1)
                              for f in FRACTIONS},
                           "peak": round(max(s[2] for s in self.samples) * mb, 1)},
                "growth_20_100_mb": round(self.growth() * mb, 1)}


def run_load(rt, pool: Pool, plans: list[list[tuple[str, int]]], *,
             sample_s: float = 1.0, progress=None, stop: threading.Event | None = None
             ) -> LoadResult:
    """Serial reference pass over every (kind, input) pair in ``plans``, then all plans at
    once, one thread each; every threaded result is compared with its serial one. Setting
    ``stop`` ends the threads after their current call (the result covers what was done)."""
    stop = stop or threading.Event()
    result = LoadResult(threads=len(plans), calls=sum(len(p) for p in plans))
    result.planned = result.calls
    result.rss_start = rss_bytes()
    t0 = time.perf_counter()
    reference = {}
    for key in sorted({c for plan in plans for c in plan}):
        try:
            reference[key] = call(rt, pool, *key)
        except Exception as e:  # noqa: BLE001 - a serial failure is reported, not raised
            result.errors.append(f"serial {key}: {type(e).__name__}: {e}")
    result.serial_s = time.perf_counter() - t0
    result.rss_after_serial = rss_bytes()

    done = [0] * len(plans)
    lock = threading.Lock()
    start = threading.Barrier(len(plans) + 1)

    def worker(t: int) -> None:
        mismatches, worst, errors, counts = 0, 0.0, [], {}
        start.wait()
        for kind, item in plans[t]:
            if stop.is_set():
                break
            try:
                got = call(rt, pool, kind, item)
                ref = reference.get((kind, item))
                if ref is not None and not identical(got, ref):
                    mismatches += 1
                    worst = max(worst, difference(got, ref))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"thread {t} {kind} {item}: {type(e).__name__}: {e}")
            done[t] += 1
            counts[kind] = counts.get(kind, 0) + 1
        with lock:
            for kind, n in counts.items():
                result.counts[kind] = result.counts.get(kind, 0) + n
            result.checked += done[t]
            result.mismatches += mismatches
            result.max_abs_diff = max(result.max_abs_diff, worst)
            result.errors += errors

    sampler = RssSampler(sample_s, lambda: sum(done))
    workers = [threading.Thread(target=worker, args=(t,), daemon=True)
               for t in range(len(plans))]
    for w in workers:
        w.start()
    sampler.sample()
    sampler.start()
    start.wait()
    t0 = time.perf_counter()
    while any(w.is_alive() for w in workers):
        time.sleep(min(10.0, 10 * sample_s))
        if progress is not None:
            progress(sum(done), result.calls, rss_bytes())
    for w in workers:
        w.join()
    result.concurrent_s = time.perf_counter() - t0
    sampler.stop()
    result.calls = sum(done)
    result.samples = sampler.samples
    return result


# --------------------------------------------------------------------------- report

def plot(result: LoadResult, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = 1 / 2 ** 20
    x = [100 * done / result.calls for _, done, _ in result.samples]
    y = [rss * mb for _, _, rss in result.samples]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(x, y, lw=1.2, label="RSS during the threaded calls")
    ax.axhline(result.rss_start * mb, color="grey", ls=":", lw=1,
               label="bundle loaded (before the serial pass)")
    ax.axhline(result.rss_after_serial * mb, color="grey", ls="--", lw=1,
               label="after the serial reference pass")
    ax.axvspan(20, 100, color="tab:green", alpha=0.06)
    ax.set_xlabel(f"calls done (% of {result.calls:,})")
    ax.set_ylabel("RSS (MiB)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, max(y) * 1.15)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: LoadResult, *, command: str, machine: str, bundle: str,
             plot_rel: str | None) -> str:
    d = result.to_dict()
    rss = d["rss_mb"]
    lines = [
        f"Command: `{command}`  ",
        f"Bundle: `{bundle}`. Machine: {machine}.",
        "",
        f"{result.threads} threads x {result.planned // result.threads:,} calls = "
        f"{result.planned:,} calls on one `Runtime` ("
        + ("" if result.calls == result.planned else
           f"stopped by the time limit after {result.calls:,}; ")
        + ", ".join(f"{k} {v:,}" for k, v in sorted(result.counts.items()))
        + f") in {result.concurrent_s:.0f} s ({d['calls_per_s']} calls/s); serial reference "
        f"pass {result.serial_s:.0f} s. **{result.checked:,} results compared with the "
        f"serial ones: {result.mismatches} differ"
        + (f" (max abs difference {result.max_abs_diff:.3g})" if result.mismatches else
           " (all bit-identical)")
        + f"; {len(result.errors)} errors.**",
        "",
        "| calls done | " + " | ".join(f"{int(f * 100)} %" for f in FRACTIONS) + " |",
        "|---|" + "---:|" * len(FRACTIONS),
        "| RSS (MiB) | " + " | ".join(f"{rss[f'{int(f * 100)}%']:.0f}" for f in FRACTIONS)
        + " |",
        "",
        f"RSS with the bundle loaded: {rss['start']:.0f} MiB; after the serial pass: "
        f"{rss['after_serial']:.0f} MiB; peak {rss['peak']:.0f} MiB. "
        f"**Growth from 20 % to 100 % of the calls: {d['growth_20_100_mb']:+.1f} MiB.**",
    ]
    if plot_rel:
        lines += ["", f"![RSS over the load run]({plot_rel})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("build/default-int8"))
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--calls", type=int, default=10000, help="calls per thread")
    ap.add_argument("--pool-audio", type=int, default=300)
    ap.add_argument("--pool-text", type=int, default=100)
    ap.add_argument("--min-s", type=float, default=0.1)
    ap.add_argument("--max-s", type=float, default=10.0)
    ap.add_argument("--mix", default=DEFAULT_MIX)
    ap.add_argument("--ort-threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads per session (default: physical cores)")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus-default"),
                    help="speech clips and captions to draw inputs from (synthetic if absent)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--plot", type=Path, default=None, help="write the RSS curve (PNG)")
    ap.add_argument("--doc", type=Path, default=None,
                    help="write the 'load' section of this markdown file")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop the threads after this long (also on SIGTERM) and report "
                    "the calls made so far")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, default=None,
                    help="write the summary and every RSS sample as JSON")
    args = ap.parse_args(argv)

    from clapedge.bench.report import ROOT, machine_line, write_section
    from clapedge.runtime import Runtime

    machine = machine_line()
    rt = Runtime(args.bundle, threads=args.ort_threads)
    with tempfile.TemporaryDirectory(prefix="clapedge-load-") as tmp:
        pool = make_pool(args.pool_audio, args.pool_text, min_s=args.min_s, max_s=args.max_s,
                         seed=args.seed, workdir=Path(tmp),
                         corpus=args.corpus if args.corpus.is_dir() else None)
        plans = make_calls(pool, args.threads, args.calls, parse_mix(args.mix), args.seed)

        def progress(done, total, rss):
            print(f"  {done:,}/{total:,} calls, RSS {rss / 2 ** 20:.0f} MiB", file=sys.stderr,
                  flush=True)

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        if args.max_minutes:
            timer = threading.Timer(60 * args.max_minutes, stop.set)
            timer.daemon = True
            timer.start()
        result = run_load(rt, pool, plans, sample_s=args.sample_s, progress=progress,
                          stop=stop)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    if args.save:
        args.save.write_text(json.dumps({**result.to_dict(), "samples": result.samples}))
    title = (f"{args.threads} threads x {args.calls:,} calls, one Runtime "
             f"({args.bundle.name}); {machine.split(',')[0]}")
    if args.plot:
        plot(result, args.plot, title)
    body = markdown(result, command="python -m clapedge.bench.load "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
                    machine=machine, bundle=str(args.bundle),
                    plot_rel=(os.path.relpath(args.plot, args.doc.parent)
                              if args.plot and args.doc else None))
    print(body)
    if args.doc:
        write_section("load", body, args.doc if args.doc.is_absolute() else ROOT / args.doc)
    if not result.ok:
        for e in result.errors[:20]:
            print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
