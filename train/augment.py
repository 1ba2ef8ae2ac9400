"""Level measurement and label-preserving augmentation (noise, synthetic room reverb).

numpy only. Loudness labels are active speech levels in dBFS, so every augmentation is
followed by ``set_level`` back to the clip's target level.
"""

from __future__ import annotations

import numpy as np

_FRAME = 0.02  # seconds
_GATE_DB = 35.0  # frames this far below the loudest frame are pauses, not speech


def frame_levels_db(audio: np.ndarray, sr: int) -> np.ndarray:
    """Mean-square level of each 20 ms frame, in dBFS."""
    n = max(1, int(_FRAME * sr))
    frames = audio[: len(audio) // n * n].reshape(-1, n) if len(audio) >= n else audio[None]
    return 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)


def active_level_db(audio: np.ndarray, sr: int) -> float:
    """The speech level in dBFS: the power mean over frames within 35 dB of the loudest frame
    (a simple stand-in for ITU-T P.56 active speech level: pauses do not count)."""
    levels = frame_levels_db(audio, sr)
    active = levels[levels > levels.max() - _GATE_DB]
    return float(10 * np.log10(np.mean(10 ** (active / 10))))


def set_level(audio: np.ndarray, sr: int, target_db: float, peak: float = 0.99) -> np.ndarray:
    """``audio`` scaled to an active level of ``target_db`` dBFS; peaks above ``peak`` are
    soft-limited (which lowers the level by a fraction of a dB at most at our targets)."""
    gain = 10 ** ((target_db - active_level_db(audio, sr)) / 20)
    out = audio.astype(np.float64) * gain
    knee = 0.8 * peak
    over = np.abs(out) > knee
    if over.any():
        excess = (np.abs(out[over]) - knee) / (peak - knee)
        out[over] = np.sign(out[over]) * (knee + (peak - knee) * np.tanh(excess))
    return out.astype(np.float32)


def trim_silence(audio: np.ndarray, sr: int, threshold_db: float = 50.0) -> np.ndarray:
    """``audio`` without leading/trailing frames more than ``threshold_db`` below its peak."""
    levels = frame_levels_db(audio, sr)
    keep = np.flatnonzero(levels > levels.max() - threshold_db)
    if keep.size == 0:
        return audio
    n = int(_FRAME * sr)
    return audio[keep[0] * n: (keep[-1] + 1) * n]


def add_noise(audio: np.ndarray, sr: int, snr_db: float, rng: np.random.Generator,
              colour: str = "white") -> np.ndarray:
    """``audio`` plus stationary noise at ``snr_db`` relative to its active level.
    ``colour``: white, pink (1/f) or brown (1/f^2)."""
    noise = rng.standard_normal(len(audio))
    if colour != "white":
        spec = np.fft.rfft(noise)
        f = np.maximum(np.fft.rfftfreq(len(noise), 1 / sr), 20.0)
        spec /= np.sqrt(f) if colour == "pink" else f
        noise = np.fft.irfft(spec, n=len(noise))
    noise_db = 10 * np.log10(np.mean(noise ** 2) + 1e-12)
    target = active_level_db(audio, sr) - snr_db
    noise *= 10 ** ((target - noise_db) / 20)
    return (audio + noise).astype(np.float32)


def room_impulse_response(sr: int, rt60: float, rng: np.random.Generator,
                          direct_to_reverb_db: float = 3.0) -> np.ndarray:
    """A synthetic room: a unit direct path followed by exponentially decaying noise whose
    energy falls by 60 dB in ``rt60`` seconds."""
    n = int(rt60 * sr)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # ln(1000) = 6.9078
    tail[: int(0.002 * sr)] = 0.0  # the first reflections arrive a little after the direct path
    tail *= np.sqrt(10 ** (-direct_to_reverb_db / 10) / (np.sum(tail ** 2) + 1e-12))
    tail[0] = 1.0
    return tail


def reverberate(audio: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """``audio`` convolved with ``ir`` (FFT), keeping the reverberant tail."""
    n = len(audio) + len(ir) - 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(ir, size), size)[:n]
    return out.astype(np.float32)
