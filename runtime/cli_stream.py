"""``clap-stream BUNDLE (FILE | -)``: stream audio through a bundle, one JSON line per event.

A FILE is fed in chunks of ``--chunk-ms`` at ``--speed`` times real time (0: as fast as
possible); ``-`` reads raw signed 16-bit little-endian PCM from stdin at ``--rate`` with
``--channels``. Each decoded window prints::

    {"start_s": 0.5, "end_s": 2.5, "tags": {"emotion": [{"label": "calm", "score": 0.31}]},
     "decode_ms": 4.1}

Exit status: 0 done, 1 the audio failed midway, 2 the bundle, options or input are unusable.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Iterator

import click
import numpy as np

from clapedge.errors import AudioError, ClapEdgeError
from clapedge.runtime.api import Runtime
from clapedge.runtime.audio import read_blocks


def _fail(message: str, code: int) -> None:
    click.echo(f"clap-stream: error: {message}", err=True)
    sys.exit(code)


def _file_chunks(path: str, chunk_ms: float) -> Iterator[tuple[int, np.ndarray]]:
    for rate, block in read_blocks(path):
        step = max(1, int(rate * chunk_ms / 1000))
        for start in range(0, len(block), step):
            yield rate, block[start:start + step]


def _stdin_chunks(rate: int, channels: int,
                  chunk_ms: float) -> Iterator[tuple[int, np.ndarray]]:
    frame_bytes = 2 * channels
    step = max(1, int(rate * chunk_ms / 1000)) * frame_bytes
    stream = sys.stdin.buffer
    carry = b""
    while True:
        data = stream.read(step)
        if not data:
            break
        data = carry + data
        usable = len(data) - len(data) % frame_bytes
        carry = data[usable:]
        if usable:
            yield rate, np.frombuffer(data[:usable], dtype="<i2").reshape(-1, channels)


def _print_events(rt: Runtime, stream) -> None:
    while rt.is_ready(stream):
        t0 = time.perf_counter()
        event = rt.decode(stream)
        line = event.to_dict()
        line["decode_ms"] = round(1e3 * (time.perf_counter() - t0), 3)
        click.echo(json.dumps(line, ensure_ascii=False))
    stream.results()  # printed already; do not let them pile up


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path())
@click.argument("source")
@click.option("--window", "window_s", default=2.0, show_default=True, type=float,
              help="Window length in seconds.")
@click.option("--hop", "hop_s", default=0.5, show_default=True, type=float,
              help="Hop between windows in seconds.")
@click.option("--bank", "banks", multiple=True, metavar="NAME",
              help="Bank or attribute head to report; repeat for several (default: the "
                   "bundle's default bank).")
@click.option("-k", "--top-k", "k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--smooth", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tags from the mean of the last N window embeddings.")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Feed a FILE at this multiple of real time (0: as fast as possible).")
@click.option("--rate", type=click.IntRange(min=1), default=None,
              help="Sample rate of raw PCM on stdin (default: the bundle's rate).")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Channels of raw PCM on stdin.")
@click.option("--chunk-ms", default=100.0, show_default=True,
              type=click.FloatRange(min=1, min_open=False), help="Feed size in milliseconds.")
@click.option("--reuse", type=click.Choice(["auto", "frames", "approx", "off"]),
              default="auto", show_default=True,
              help="Work reuse across overlapping windows: auto = a causal bundle's step (only "
                   "each hop's new frames) or front-end frame reuse, where exact; frames = "
                   "front-end frames only (events = the offline windows); approx = also "
                   "where inexact; off = whole windows (see docs/runtime.md).")
@click.option("--providers", default="auto", show_default=True,
              help="'auto' or a comma-separated list, e.g. 'cuda,cpu'.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
def main(bundle, source, window_s, hop_s, banks, k, smooth, speed, rate, channels, chunk_ms,
         reuse, providers, threads) -> None:
    """Stream SOURCE (an audio file, or - for raw 16-bit PCM on stdin) through BUNDLE."""
    requested = providers if providers == "auto" else [p.strip() for p in providers.split(",")]
    try:
        rt = Runtime(bundle, providers=requested, threads=threads)
        stream = rt.create_stream(window_s, hop_s, list(banks) or None, k=k, smooth=smooth,
                                  reuse=reuse)
    except ClapEdgeError as e:
        _fail(str(e), 2)
    if source == "-":
        chunks, pace = _stdin_chunks(rate or rt.sample_rate, channels, chunk_ms), 0.0
    else:
        chunks, pace = _file_chunks(source, chunk_ms), speed
    start, fed_s, started = time.perf_counter(), 0.0, False
    try:
        for chunk_rate, chunk in chunks:
            started = True
            stream.accept_waveform(chunk_rate, chunk)
            _print_events(rt, stream)
            fed_s += len(chunk) / chunk_rate
            if pace > 0:
                time.sleep(max(0.0, fed_s / pace - (time.perf_counter() - start)))
        stream.input_finished()
        _print_events(rt, stream)
    except AudioError as e:
        _fail(str(e), 1 if started else 2)
    except ClapEdgeError as e:
        _fail(str(e), 1)


if __name__ == "__main__":
    main()
