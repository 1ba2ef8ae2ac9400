"""The streaming soak in seconds (bench/soak.py runs the hour): a tiny bundle with the
streaming split, minutes of 48 kHz audio in random chunks through one stream; memory and
queues stay bounded, a slow consumer gets back-pressure, no window is lost."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import FRAME, build_bundle  # noqa: E402

from clapedge.bench.soak import slow_consumer, soak  # noqa: E402
from clapedge.export.stream_split import FrameGeometry, add_to_bundle  # noqa: E402
from clapedge.runtime import Runtime  # noqa: E402


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("soak") / "b")
    add_to_bundle(root, FrameGeometry(FRAME, FRAME))
    return Runtime(root, threads=1)


def test_soak_is_bounded_and_loses_nothing(rt):
    tracemalloc.start()
    try:
        short = soak(rt, 40.0, speed=0, sample_s=0.05, max_buffer_s=4.0)
        _, peak_short = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        long = soak(rt, 240.0, speed=0, sample_s=0.05, max_buffer_s=4.0)
        _, peak_long = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for r in (short, long):
        assert r.errors == [] and r.decoded == r.expected and r.dropped == 0
        assert "reusing front-end frames" in r.reuse
        # Unpaced, the producer outruns the decoder and waits for room (timeout mode).
        assert max(s.buffered_s for s in r.samples) <= 4.0
        assert max(s.pending_events for s in r.samples) <= 64 + 1
        assert max(s.cached_frames for s in r.samples) <= 2 * 16000 // FRAME
    # Six times the audio, not more memory at the peak (events are drained every second).
    assert peak_long < peak_short + (1 << 20)


def test_slow_consumer_gets_back_pressure(rt):
    r = slow_consumer(rt, 30.0, decode_delay_s=0.004, max_buffer_s=4.0, max_events=8)
    assert r.refusals > 0 and all("max_buffer_s=4.0" in m for m in r.messages)
    assert r.max_buffered_s <= 4.0
    assert r.max_pending <= 8 and r.dropped == r.decoded - 8
    assert r.decoded == r.expected
