"""Streaming: events equal the offline windows, bounded buffers, smoothing, bad input."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import RATE, build_bundle, tone  # noqa: E402

from clapedge.errors import AudioError, ConfigError  # noqa: E402
from clapedge.runtime import Runtime  # noqa: E402
from clapedge.runtime.audio import frame_windows  # noqa: E402


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("stream") / "b")
    return Runtime(root, threads=1)


def feed(rt, stream, signal, rate, chunks, decode_every=True):
    """Feed ``signal`` in the given chunk sizes (cycled), decoding as it goes."""
    pos, i, peak = 0, 0, 0.0
    while pos < len(signal):
        n = chunks[i % len(chunks)]
        stream.accept_waveform(rate, signal[pos:pos + n])
        pos, i = pos + n, i + 1
        peak = max(peak, stream.buffered_seconds)
        while decode_every and rt.is_ready(stream):
            rt.decode(stream)
    stream.input_finished()
    while rt.is_ready(stream):
        rt.decode(stream)
    return stream.results(), peak


@pytest.mark.parametrize("seconds", [5.3, 2.0, 4.5, 0.3])
def test_events_are_the_offline_windows(rt, seconds):
    x = tone(seconds, seed=3)
    s = rt.create_stream(window_s=2.0, hop_s=0.5, banks=["emotion", "sex", "style"], k=2)
    events, _ = feed(rt, s, x, RATE, [37, 1000, 4001, 160])
    spans = frame_windows(len(x), 2 * RATE, RATE // 2)
    assert [(e.start_s, e.end_s) for e in events] == [(a / RATE, b / RATE) for a, b in spans]
    for event, (a, b) in zip(events, spans):
        window = x[a:b]
        assert event.embedding.tobytes() == rt.embed_audio(window, RATE)[0].tobytes()
        assert event.tags == rt.tag_all(window, ["emotion", "sex", "style"], k=2,
                                        sample_rate=RATE)


def test_resampled_int16_stereo_stream_matches_offline(rt):
    x48 = np.stack([tone(3.1, 48000, seed=1), tone(3.1, 48000, 330, seed=2)], axis=1)
    pcm = np.round(x48 * 32767).astype(np.int16)
    s = rt.create_stream(window_s=1.0, hop_s=0.25)
    events, _ = feed(rt, s, pcm, 48000, [480, 7777, 48000])
    offline = rt.load_audio(pcm, 48000)
    spans = frame_windows(len(offline), RATE, RATE // 4)
    assert len(events) == len(spans)
    for event, (a, b) in zip(events, spans):
        assert event.embedding.tobytes() == rt.embed_audio(offline[a:b], RATE)[0].tobytes()
        assert list(event.tags) == ["emotion"]


def test_buffer_stays_within_one_window_plus_one_hop(rt):
    s = rt.create_stream(window_s=1.0, hop_s=0.5, banks=[])
    chunk = 1600
    events, peak = feed(rt, s, tone(30.0, seed=4), RATE, [chunk])
    assert len(events) == 59 and all(e.tags == {} for e in events)
    assert peak <= 1.0 + 0.5 + chunk / RATE


def test_feeding_without_decoding_is_bounded(rt):
    s = rt.create_stream(window_s=1.0, hop_s=0.5, max_buffer_s=3.0)
    with pytest.raises(AudioError, match="max_buffer_s=3.0; call decode"):
        feed(rt, s, tone(10.0), RATE, [1600], decode_every=False)


def test_smoothing_averages_recent_windows(rt):
    x = tone(4.0, seed=6, freq=300)
    s = rt.create_stream(window_s=1.0, hop_s=0.5, banks=["emotion"], k=5, smooth=3)
    events, _ = feed(rt, s, x, RATE, [4000])
    bank = rt.bundle.bank("emotion")
    for i, event in enumerate(events):
        recent = np.stack([e.embedding for e in events[max(0, i - 2):i + 1]])
        mean = recent.mean(0)
        mean /= np.linalg.norm(mean)
        scores = {t.label: t.score for t in event.tags["emotion"]}
        expected = dict(zip(rt.labels("emotion"), bank @ mean))
        assert scores == pytest.approx(expected, abs=1e-5)


def test_results_are_drained_and_empty_streams_are_quiet(rt):
    s = rt.create_stream(window_s=1.0, hop_s=0.5)
    s.accept_waveform(RATE, tone(1.2))
    while rt.is_ready(s):
        rt.decode(s)
    assert len(s.results()) == 1 and s.results() == []
    empty = rt.create_stream()
    empty.input_finished()
    assert not rt.is_ready(empty) and rt.decode(empty) is None and empty.results() == []


def test_bad_stream_input(rt):
    s = rt.create_stream()
    s.accept_waveform(RATE, tone(0.1))
    with pytest.raises(AudioError, match="sample_rate changed from 16000 to 8000"):
        s.accept_waveform(8000, tone(0.1, 8000))
    bad = tone(0.1)
    bad[5] = np.nan
    with pytest.raises(AudioError, match="NaN or Inf"):
        s.accept_waveform(RATE, bad)
    s.input_finished()
    with pytest.raises(AudioError, match="after input_finished"):
        s.accept_waveform(RATE, tone(0.1))
    with pytest.raises(ConfigError, match="hop_s"):
        rt.create_stream(window_s=1.0, hop_s=2.0)
    with pytest.raises(ConfigError, match="'pitch'"):
        rt.create_stream(banks=["pitch"])
    event = rt.decode(s)
    assert event.to_dict()["start_s"] == 0.0 and event.to_dict()["end_s"] == 0.1
