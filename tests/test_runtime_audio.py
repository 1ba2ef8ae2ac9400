"""The audio frontend: the bad-input catalogue, resampling, mono mix, the clip policy."""

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import clip_policy, tone  # noqa: E402

from clapedge.errors import AudioError  # noqa: E402
from clapedge.runtime.audio import (batch_segments, frame_windows, load_audio,  # noqa: E402
                                    padded_length, segment)

RATE = 16000


def load(src, sr=None):
    return load_audio(src, sr, target_rate=RATE)


@pytest.fixture
def wav16(tmp_path):
    x = tone(1.0, RATE)
    pcm = np.round(x * 32767).astype(np.int16)
    path = tmp_path / "a.wav"
    sf.write(path, pcm, RATE, subtype="PCM_16")
    return path, pcm


# ---------------------------------------------------------------- decoding

def test_wav_file_equals_int16_array(wav16):
    path, pcm = wav16
    from_file = load(path)
    assert from_file.dtype == np.float32 and from_file.shape == (RATE,)
    np.testing.assert_array_equal(from_file, load(pcm, RATE))
    np.testing.assert_array_equal(from_file, pcm.astype(np.float32) / 32768)


@pytest.mark.parametrize("subtype, tol", [("PCM_U8", 1 / 100), ("PCM_24", 1e-6),
                                          ("PCM_32", 1e-6), ("FLOAT", 0)])
def test_bit_depths(tmp_path, subtype, tol):
    x = tone(0.5, RATE)
    sf.write(tmp_path / "x.wav", x, RATE, subtype=subtype)
    np.testing.assert_allclose(load(tmp_path / "x.wav"), x, atol=tol)


@pytest.mark.parametrize("fmt, ext", [("FLAC", "flac"), ("OGG", "ogg")])
def test_flac_and_ogg(tmp_path, fmt, ext):
    x = tone(1.0, RATE)
    sf.write(tmp_path / f"x.{ext}", x, RATE, format=fmt)
    y = load(tmp_path / f"x.{ext}")
    assert abs(len(y) - len(x)) < 10
    if fmt == "FLAC":
        np.testing.assert_allclose(y, x, atol=1e-4)


def test_wrong_extension_decodes_by_content(tmp_path):
    x = tone(0.5, RATE)
    sf.write(tmp_path / "really_flac.mp3", x, RATE, format="FLAC")
    np.testing.assert_allclose(load(tmp_path / "really_flac.mp3"), x, atol=1e-4)


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = tone(0.5, RATE, 220), tone(0.5, RATE, 330, seed=1)
    stereo = np.stack([left, right], axis=1)
    sf.write(tmp_path / "s.wav", stereo, RATE, subtype="FLOAT")
    expected = (left + right) / 2
    np.testing.assert_allclose(load(tmp_path / "s.wav"), expected, atol=1e-7)
    np.testing.assert_array_equal(load(tmp_path / "s.wav"), load(stereo, RATE))


@pytest.mark.parametrize("rate", [8000, 48000, 44100])
def test_resampled_to_the_bundle_rate(tmp_path, rate):
    t = np.arange(rate) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "r.wav", x, rate, subtype="FLOAT")
    y = load(tmp_path / "r.wav")
    assert len(y) == RATE
    np.testing.assert_allclose(y, soxr.resample(x, rate, RATE, quality="HQ"), atol=1e-6)
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) == 440  # 1 s of signal: bin i is i Hz
    np.testing.assert_array_equal(y, load(x, rate))  # file and array take the same path


def test_array_dtypes():
    x = tone(0.25, RATE)
    np.testing.assert_array_equal(load(x.astype(np.float64), RATE), x)
    i32 = np.round(x * 2**31 * 0.9).astype(np.int32)
    np.testing.assert_allclose(load(i32, RATE), x * 0.9, atol=1e-6)
    np.testing.assert_array_equal(load((x, RATE)), x)


# ---------------------------------------------------------------- the bad-input catalogue

def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: cannot decode audio"):
        load(tmp_path / "empty.wav")


def test_truncated_header(tmp_path, wav16):
    path, _ = wav16
    (tmp_path / "trunc.wav").write_bytes(path.read_bytes()[:20])
    with pytest.raises(AudioError, match=r"trunc\.wav: cannot decode audio"):
        load(tmp_path / "trunc.wav")


def test_not_audio(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n" * 100)
    with pytest.raises(AudioError, match=r"notes\.wav: cannot decode.*readable: WAV, FLAC"):
        load(tmp_path / "notes.wav")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load(tmp_path / "absent.wav")
    with pytest.raises(AudioError, match="is a directory"):
        load(tmp_path)


def test_zero_length_file_and_array(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.int16), RATE)
    with pytest.raises(AudioError, match=r"zero\.wav: contains no audio samples"):
        load(tmp_path / "zero.wav")
    with pytest.raises(AudioError, match="no audio samples"):
        load(np.zeros(0, np.float32), RATE)


def test_nan_samples_name_the_time(tmp_path):
    x = tone(1.0, RATE)
    x[12000] = np.nan
    sf.write(tmp_path / "nan.wav", x, RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: NaN or Inf sample at 0\.750 s"):
        load(tmp_path / "nan.wav")
    y = tone(0.5, RATE)
    y[-1] = np.inf
    with pytest.raises(AudioError, match="NaN or Inf"):
        load(y, RATE)


def test_bad_arrays():
    x = tone(0.5, RATE)
    with pytest.raises(AudioError, match="needs its sample_rate"):
        load(x)
    with pytest.raises(AudioError, match="unsupported dtype uint8"):
        load((x * 100).astype(np.uint8), RATE)
    with pytest.raises(AudioError, match=r"\[channels, samples\]\? pass array\.T"):
        load(np.stack([x, x]), RATE)
    with pytest.raises(AudioError, match="sample_rate"):
        load(x, -1)
    with pytest.raises(AudioError, match="a file path or a numpy array"):
        load([0.1, 0.2])


def test_silence_is_valid():
    assert not load(np.zeros(RATE, np.float32), RATE).any()


def test_long_file_decodes_in_bounded_memory(tmp_path):
    minutes, in_rate = 2, 48000
    frames = minutes * 60 * in_rate
    rng = np.random.default_rng(0)
    with sf.SoundFile(tmp_path / "long.wav", "w", in_rate, 2, subtype="PCM_16") as f:
        for _ in range(minutes * 6):  # 10 s blocks
            f.write((rng.standard_normal((frames // (minutes * 6), 2)) * 3000).astype(np.int16))
    tracemalloc.start()
    y = load(tmp_path / "long.wav")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(y) == minutes * 60 * RATE
    naive = frames * 2 * 4  # the whole file as float32 stereo
    assert peak < 1.3 * y.nbytes < naive / 4


# ---------------------------------------------------------------- clip policy

@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), window=st.integers(1, 800), hop_frac=st.floats(0.05, 1.0))
def test_frame_windows_cover_deterministically(n, window, hop_frac):
    hop = max(1, int(window * hop_frac))
    spans = frame_windows(n, window, hop)
    assert spans == frame_windows(n, window, hop)
    if n <= window:
        assert spans == [(0, n)]
        return
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(e - s == window for s, e in spans)
    starts = [s for s, _ in spans]
    assert all(b - a == hop for a, b in zip(starts[:-2], starts[1:-1]))
    assert all(0 < b - a <= hop for a, b in zip(starts, starts[1:]))


def test_segment_policy():
    clip = clip_policy()  # min 0.5 s, max 3 s, window 2 s, hop 1 s
    short = tone(0.05, RATE)
    (padded,) = segment(short, RATE, clip)
    assert len(padded) == RATE // 2
    np.testing.assert_array_equal(padded[:len(short)], short)
    assert not padded[len(short):].any()
    mid = tone(2.5, RATE)
    (same,) = segment(mid, RATE, clip)
    assert same is mid
    long = tone(5.5, RATE)
    windows = segment(long, RATE, clip)
    assert [len(w) for w in windows] == [2 * RATE] * 5
    np.testing.assert_array_equal(windows[-1], long[-2 * RATE:])
    np.testing.assert_array_equal(windows[1], long[RATE:3 * RATE])


def test_batching_pads_with_mask():
    assert padded_length(1601, 1600) == 3200 and padded_length(7, 0) == 7
    wave, mask = batch_segments([np.ones(3, np.float32), np.ones(5, np.float32)], 8)
    assert wave.shape == mask.shape == (2, 8) and mask.dtype == np.int64
    assert mask.sum(1).tolist() == [3, 5] and wave[0, 3:].sum() == 0
