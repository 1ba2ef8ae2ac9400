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


def test_refused_chunk_is_not_consumed_and_can_be_fed_again(rt):
    # At 48 kHz the chunk goes through the resampler: a refusal must come before it.
    x48 = tone(6.0, 48000, seed=8)
    s = rt.create_stream(window_s=1.0, hop_s=0.5, banks=[], max_buffer_s=2.0)
    refusals, pos, chunk = 0, 0, 4800
    while pos < len(x48):
        try:
            s.accept_waveform(48000, x48[pos:pos + chunk])
        except AudioError as e:
            assert "max_buffer_s=2.0" in str(e) and "not consumed" in str(e)
            assert s.buffered_seconds <= 2.0
            refusals += 1
            while rt.is_ready(s):
                rt.decode(s)
            continue  # the same chunk again
        pos += chunk
        if pos % (5 * chunk) == 0:  # decode only now and then: the buffer fills up
            while rt.is_ready(s):
                rt.decode(s)
    s.input_finished()
    while rt.is_ready(s):
        rt.decode(s)
    offline = rt.load_audio(x48, 48000)
    spans = frame_windows(len(offline), RATE, RATE // 2)
    events = s.results()
    assert refusals > 0 and len(events) == len(spans)
    for event, (a, b) in zip(events, spans):
        assert event.embedding.tobytes() == rt.embed_audio(offline[a:b], RATE)[0].tobytes()


def test_accept_with_timeout_waits_for_a_decoder_thread(rt):
    import threading
    import time

    x = tone(8.0, seed=9)
    s = rt.create_stream(window_s=1.0, hop_s=0.5, banks=[], max_buffer_s=2.0)
    peak, done = [0.0], threading.Event()

    def consumer():
        while not done.is_set() or rt.is_ready(s):
            if not rt.decode(s):
                time.sleep(0.002)
            time.sleep(0.003)  # a slow consumer
            peak[0] = max(peak[0], s.buffered_seconds)

    worker = threading.Thread(target=consumer)
    worker.start()
    try:
        for pos in range(0, len(x), 3200):  # fed as fast as the stream allows
            s.accept_waveform(RATE, x[pos:pos + 3200], timeout=10.0)
        s.input_finished()
    finally:
        done.set()
        worker.join()
    assert len(s.results()) == len(frame_windows(len(x), RATE, RATE // 2))
    assert peak[0] <= 2.0
    lone = rt.create_stream(window_s=1.0, hop_s=0.5, max_buffer_s=2.0)
    lone.accept_waveform(RATE, x[:RATE])
    lone.accept_waveform(RATE, x[RATE:2 * RATE])
    t0 = time.monotonic()
    with pytest.raises(AudioError, match=r"waited 0.2 s"):
        lone.accept_waveform(RATE, x[2 * RATE:2 * RATE + 1600], timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    with pytest.raises(AudioError, match="call decode while feeding"):
        lone.accept_waveform(RATE, x[:RATE])
    with pytest.raises(AudioError, match="longer than max_buffer_s=2.0"):
        lone.accept_waveform(RATE, x[:int(2.5 * RATE)], timeout=5)


def test_undrained_events_are_bounded(rt):
    s = rt.create_stream(window_s=1.0, hop_s=0.5, banks=[], max_events=3)
    x = tone(5.0, seed=10)
    returned = []
    for pos in range(0, len(x), 4000):
        s.accept_waveform(RATE, x[pos:pos + 4000])
        while rt.is_ready(s):
            returned.append(rt.decode(s))
    assert s.pending_events == 3 and s.dropped_events == len(returned) - 3
    kept = s.results()
    assert [e.start_s for e in kept] == [e.start_s for e in returned[-3:]]
    assert s.pending_events == 0


def test_stream_options_are_validated(rt):
    with pytest.raises(ConfigError, match="reuse='maybe'"):
        rt.create_stream(reuse="maybe")
    with pytest.raises(ConfigError, match="max_events=0"):
        rt.create_stream(max_events=0)
    with pytest.raises(ConfigError, match="timeout"):
        rt.create_stream().accept_waveform(RATE, tone(0.1), timeout=-1)
