"""The bad audio catalogue: every case of broken, odd or extreme audio and its documented
behaviour (docs/reliability.md, "Bad audio catalogue", lists the same cases).

Each case goes through ``Runtime.encode_audio`` of a tiny bundle: either it embeds (a finite,
unit-norm embedding) or it raises ``AudioError`` with the documented reason, the file or
array named. None may raise anything else (a CLI would print a traceback), give a NaN
embedding, or use memory that grows with the audio's length (the hour-long file runs in a
subprocess that measures its peak RSS).
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import RATE, build_bundle, clip_policy, tone  # noqa: E402

from clapedge.errors import AudioError  # noqa: E402
from clapedge.subproc import fresh  # noqa: E402
from clapedge.runtime import Runtime  # noqa: E402
from clapedge.runtime.audio import SegmentStream, segment  # noqa: E402
from clapedge.runtime.cli_tag import main as clap_tag  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OK = "embeds"


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("bad-audio") / "b")
    return Runtime(root, threads=1)


@dataclass(frozen=True)
class Case:
    """``make(dir)`` -> (source, sample_rate or None); ``expect``: OK or a regex of the
    ``AudioError`` message; ``doc``: the behaviour as docs/reliability.md states it."""

    make: Callable[[Path], tuple[object, int | None]]
    expect: str
    doc: str


def _wav(x: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _file(name: str, data: bytes | Callable[[], bytes]):
    def make(d: Path):
        (d / name).write_bytes(data() if callable(data) else data)
        return d / name, None
    return make


def _array(x: Callable[[], object], rate: int | None = RATE):
    return lambda d: (x(), rate)


def _pcm16(seconds: float = 1.0, rate: int = RATE, channels: int = 1) -> np.ndarray:
    x = tone(seconds, rate)
    x = np.round(x * 32767).astype(np.int16)
    return x if channels == 1 else np.stack([np.roll(x, 7 * c) for c in range(channels)], 1)


def _patched(offset: int, value: bytes, x: np.ndarray | None = None) -> Callable[[], bytes]:
    def make() -> bytes:
        data = bytearray(_wav(_pcm16() if x is None else x))
        data[offset:offset + len(value)] = value
        return bytes(data)
    return make


def _with_nan(value: float, subtype: str) -> Callable[[], bytes]:
    def make() -> bytes:
        x = tone(1.0).astype(np.float64)
        x[RATE // 2] = value
        return _wav(x, subtype=subtype)
    return make


def _nan_array() -> np.ndarray:
    x = tone(1.0)
    x[100] = np.nan
    return x


CASES: dict[str, Case] = {
    # ---- not audio, or not enough of it
    "empty file": Case(_file("empty.wav", b""), r"empty\.wav: cannot decode audio",
                       "AudioError: cannot decode audio"),
    "WAV header, zero frames": Case(_file("zero.wav", lambda: _wav(_pcm16()[:0])),
                                    r"zero\.wav: contains no audio samples",
                                    "AudioError: contains no audio samples"),
    "truncated header": Case(_file("cut.wav", lambda: _wav(_pcm16())[:30]),
                             r"cut\.wav: cannot decode audio",
                             "AudioError: cannot decode audio"),
    "data cut short (header claims 1 s, 0.25 s present)": Case(
        _file("short.wav", lambda: _wav(_pcm16())[:44 + RATE // 2]), OK,
        "embeds the frames present (libsndfile corrects the length)"),
    "text file named .wav": Case(_file("notes.wav", b"just some text\n" * 50),
                                 r"notes\.wav: cannot decode audio",
                                 "AudioError: cannot decode audio"),
    "random bytes": Case(_file("noise.wav", np.random.default_rng(0).bytes(4096)),
                         r"noise\.wav: cannot decode audio", "AudioError: cannot decode audio"),
    "MP4/AAC container": Case(_file("clip.m4a", b"\0\0\0\x20ftypM4A \0\0\0\0M4A mp42isom"
                                    + bytes(2000)),
                              r"clip\.m4a: cannot decode audio \(Format not recognised",
                              "AudioError: cannot decode audio (format not recognised)"),
    "unsupported codec in WAV (WMA tag)": Case(
        _file("wma.wav", _patched(20, struct.pack("<H", 0x0161))),
        r"wma\.wav: cannot decode audio", "AudioError: cannot decode audio (malformed fmt)"),
    "Ogg page with no codec": Case(_file("bad.ogg", b"OggS" + bytes(2000)),
                                   r"bad\.ogg: cannot decode audio",
                                   "AudioError: cannot decode audio (unimplemented format)"),
    # ---- decoded by content, whatever the name
    "MP3 bytes named .wav": Case(_file("mp3.wav", lambda: _wav(_pcm16(), fmt="MP3",
                                                               subtype="MPEG_LAYER_III")),
                                 OK, "embeds (decoded by content)"),
    "FLAC bytes named .wav": Case(_file("flac.wav", lambda: _wav(_pcm16(), fmt="FLAC")), OK,
                                  "embeds (decoded by content)"),
    "Opus in Ogg named .mp3": Case(_file("opus.mp3", lambda: _wav(
        _pcm16(rate=48000), 48000, fmt="OGG", subtype="OPUS")), OK,
        "embeds (decoded by content)"),
    # ---- sample formats
    "8-bit unsigned PCM": Case(_file("u8.wav", lambda: _wav(_pcm16(), subtype="PCM_U8")), OK,
                               "embeds"),
    "16-bit PCM": Case(_file("s16.wav", lambda: _wav(_pcm16(), subtype="PCM_16")), OK, "embeds"),
    "24-bit PCM": Case(_file("s24.wav", lambda: _wav(_pcm16(), subtype="PCM_24")), OK, "embeds"),
    "32-bit PCM": Case(_file("s32.wav", lambda: _wav(_pcm16(), subtype="PCM_32")), OK, "embeds"),
    "float32 WAV with NaN": Case(_file("nan32.wav", _with_nan(np.nan, "FLOAT")),
                                 r"nan32\.wav: NaN or Inf sample at 0\.500 s",
                                 "AudioError: NaN or Inf sample at (time)"),
    "float32 WAV with +Inf": Case(_file("inf32.wav", _with_nan(np.inf, "FLOAT")),
                                  r"inf32\.wav: NaN or Inf sample at 0\.500 s",
                                  "AudioError: NaN or Inf sample at (time)"),
    "float64 WAV with -Inf": Case(_file("inf64.wav", _with_nan(-np.inf, "DOUBLE")),
                                  r"inf64\.wav: NaN or Inf sample at 0\.500 s",
                                  "AudioError: NaN or Inf sample at (time)"),
    "float32 WAV with samples near 1e38": Case(_file("huge.wav", lambda: _wav(
        (tone(1.0) * np.float32(1e38)).astype(np.float32), subtype="FLOAT")),
        r"huge\.wav: sample of magnitude .* not beyond 1e\+06",
        "AudioError: sample of magnitude (value) at (time); beyond 1e6 is corrupt"),
    "float WAV clipping at +-4.0": Case(_file("hot.wav", lambda: _wav(
        np.clip(tone(1.0, amp=8.0), -4, 4), subtype="FLOAT")), OK,
        "embeds (samples outside [-1, 1] are passed on unchanged)"),
    "int16 square wave at full scale": Case(_array(lambda: np.where(
        tone(1.0) > 0, 32767, -32768).astype(np.int16)), OK, "embeds"),
    "DC offset 0.5": Case(_array(lambda: tone(1.0) + np.float32(0.5)), OK,
                          "embeds (no DC removal)"),
    "silence": Case(_array(lambda: np.zeros(RATE, np.float32)), OK, "embeds (silence is valid)"),
    "pure tone 440 Hz": Case(_array(lambda: (0.5 * np.sin(
        2 * np.pi * 440 * np.arange(RATE) / RATE)).astype(np.float32)), OK, "embeds"),
    "10 ms clip": Case(_array(lambda: tone(0.01)), OK,
                       "embeds (zero-padded to clip.min_seconds)"),
    # ---- channels and rates
    **{f"{c} channel{'s' if c > 1 else ''}": Case(
        _file(f"ch{c}.wav", lambda c=c: _wav(_pcm16(channels=c))), OK,
        "embeds (channels averaged)") for c in range(1, 9)},
    "65 channels": Case(_file("ch65.wav", lambda: _wav(np.zeros((400, 65), np.int16))),
                        r"ch65\.wav: 65 channels; at most 64",
                        "AudioError: at most 64 channels"),
    **{f"{r} Hz": Case(_file(f"r{r}.wav", lambda r=r: _wav(_pcm16(0.5, r), r)), OK,
                       "embeds (resampled to the bundle's rate)")
       for r in (8000, 11025, 22050, 44100, 48000, 96000, 192000)},
    "header claiming 1 Hz": Case(_file("r1.wav", _patched(24, struct.pack("<II", 1, 2))),
                                 r"r1\.wav: sample rate 1 Hz is outside the supported",
                                 "AudioError: rate outside 1000..768000 Hz"),
    "header claiming 2^31-1 Hz": Case(
        _file("rmax.wav", _patched(24, struct.pack("<II", 2 ** 31 - 1, 2 ** 32 - 2))),
        r"rmax\.wav: sample rate 2147483647 Hz is outside the supported",
        "AudioError: rate outside 1000..768000 Hz"),
    # ---- arrays passed directly
    "int16 array": Case(_array(lambda: _pcm16()), OK, "embeds (scaled by 2^-15)"),
    "int32 array": Case(_array(lambda: _pcm16().astype(np.int32) << 16), OK,
                        "embeds (scaled by 2^-31)"),
    "float32 array": Case(_array(lambda: tone(1.0)), OK, "embeds"),
    "float64 array": Case(_array(lambda: tone(1.0).astype(np.float64)), OK, "embeds"),
    "float32 array with NaN": Case(_array(_nan_array),
                                   r"array\(16000,\) float32: NaN or Inf sample at 0\.006 s",
                                   "AudioError: NaN or Inf sample at (time)"),
    "int8 array": Case(_array(lambda: np.zeros(RATE, np.int8)),
                       r"unsupported dtype int8; use int16, int32, float32 or float64",
                       "AudioError: unsupported dtype"),
    "[channels, samples] array": Case(_array(lambda: np.zeros((2, RATE), np.float32)),
                                      r"is it \[channels, samples\]\? pass array\.T",
                                      "AudioError: suggests array.T"),
    "empty array": Case(_array(lambda: np.zeros(0, np.float32)),
                        r"contains no audio samples", "AudioError: no audio samples"),
    "array without a sample rate": Case(_array(lambda: tone(1.0), None),
                                        r"a numpy array needs its sample_rate",
                                        "AudioError: needs its sample_rate"),
    "array at 1 Hz": Case(_array(lambda: tone(1.0), 1),
                          r"sample rate 1 Hz is outside the supported 1000\.\.768000 Hz",
                          "AudioError: rate outside 1000..768000 Hz"),
    "a list, not an array": Case(_array(lambda: [0.1, 0.2, 0.3]),
                                 r"audio must be a file path or a numpy array",
                                 "AudioError: must be a path or an array"),
    "missing file": Case(lambda d: (d / "nope.wav", None), r"nope\.wav: no such file",
                         "AudioError: no such file"),
    "a directory": Case(lambda d: (d, None), r"is a directory, not an audio file",
                        "AudioError: is a directory"),
}


def test_the_catalogue_has_at_least_30_cases_and_all_are_documented():
    assert len(CASES) >= 30
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [name for name in CASES if f"| {name} |" not in doc]
    assert not missing, f"docs/reliability.md lacks rows for {missing}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_audio_case(rt, tmp_path, name):
    case = CASES[name]
    source, rate = case.make(tmp_path)
    if case.expect == OK:
        (enc,) = rt.encode_audio(source, rate)
        assert enc.embedding.dtype == np.float32 and np.isfinite(enc.embedding).all()
        assert abs(float(np.linalg.norm(enc.embedding)) - 1.0) < 1e-4
        assert all(np.isfinite(v).all() for v in enc.heads.values())
        assert enc.duration_s > 0
    else:
        with pytest.raises(AudioError, match=case.expect):
            rt.encode_audio(source, rate)


# ------------------------------------------------------------------ long audio

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12_000), chunk=st.integers(1, 5000),
       policy=st.sampled_from([(0.05, 0.25, 0.1, 0.05), (0.01, 0.1, 0.1, 0.1),
                               (0.02, 0.3, 0.15, 0.07)]))
def test_streamed_segments_equal_the_in_memory_ones(n, chunk, policy):
    clip = clip_policy(min_seconds=policy[0], max_seconds=policy[1], window_seconds=policy[2],
                       hop_seconds=policy[3])
    rate = 16000
    signal = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    stream = SegmentStream((signal[i:i + chunk] for i in range(0, n, chunk)), rate, clip)
    head = stream.head()
    expected = segment(signal, rate, clip)
    if head is not None:
        np.testing.assert_array_equal(segment(head, rate, clip)[0], expected[0])
        assert len(expected) == 1
    else:
        got = [w.copy() for w in stream.windows()]
        assert len(got) == len(expected) > 1
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    assert stream.n == n


_HOUR = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, soundfile as sf
    from clapedge.runtime import Runtime

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    bundle, path, rate = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:  # one hour, 10 s blocks
        block = (np.random.default_rng(0).standard_normal(rate * 10) * 3000).astype(np.int16)
        for _ in range(360):
            f.write(block)
    rt = Runtime(bundle, threads=1)
    short = rt.encode_audio(block, rate)[0]       # warm up on 10 s
    base = peak_mb()
    t0 = time.perf_counter()
    enc = rt.encode_audio(path)[0]
    seconds = time.perf_counter() - t0
    print(json.dumps({"windows": enc.windows, "duration_s": enc.duration_s,
                      "finite": bool(np.isfinite(enc.embedding).all()),
                      "norm": float(np.linalg.norm(enc.embedding)), "seconds": seconds,
                      "base_mb": base, "peak_mb": peak_mb(), "short_windows": short.windows}))
""")


def test_an_hour_long_file_is_embedded_in_bounded_memory(tmp_path):
    root, _ = build_bundle(tmp_path / "b")
    rate = 8000  # 58 MB on disk; resampled to 16 kHz it would be 230 MB held whole
    proc = subprocess.run(fresh([sys.executable, "-c", _HOUR, str(root),
                                 str(tmp_path / "hour.wav"), str(rate)]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["duration_s"] == 3600.0 and r["windows"] == 3599  # 2 s windows, 1 s hop
    assert r["finite"] and abs(r["norm"] - 1) < 1e-5
    whole_signal_mb = 3600 * RATE * 4 / 2 ** 20
    assert r["peak_mb"] - r["base_mb"] < 40 < whole_signal_mb / 4, r
    print(json.dumps(r))


# ------------------------------------------------------------------ the CLI

def test_clap_tag_reports_each_bad_file_and_exits_non_zero(rt, tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, _pcm16(), RATE, subtype="PCM_16")
    bad = {}
    for name in ("empty file", "text file named .wav", "float32 WAV with NaN",
                 "65 channels", "header claiming 1 Hz", "missing file"):
        source, _ = CASES[name].make(tmp_path)
        bad[str(source)] = CASES[name].expect
    result = CliRunner().invoke(clap_tag, [str(rt.bundle.root), str(good), *bad, "--json"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = {x["path"]: x for x in map(json.loads, result.stdout.splitlines())}
    assert "tags" in lines[str(good)]
    for path, reason in bad.items():
        assert "error" in lines[path], lines[path]
        assert re.search(reason, lines[path]["error"]), (reason, lines[path])
    assert f"{len(bad)} of {len(bad) + 1} files failed" in result.stderr
