"""espeak-ng as a styled-speech source: the voice inventory and one synthesis call.

espeak-ng runs as a subprocess. Voice quality comes from variant files derived from the
stock male/female variants (a whispered and a creaky version of each), written into a private
copy of the espeak-ng data directory (symlinks plus the new files) so that nothing on the
system changes. espeak-ng silently falls back to the default voice when a variant is missing,
so every variant is checked here before use.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf

from clapedge.errors import ConfigError, MissingDependencyError

ESPEAK = "espeak-ng"
INSTALL_HINT = ("install it with `apt-get install espeak-ng` (Debian/Ubuntu, as root or with "
                "sudo) or `make system-deps`")

# Stock espeak-ng variants (espeak-ng-data/voices/!v) used as speakers, by sex.
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5", "belinda", "steph")
# Never in the train or val splits: the test split measures generalisation to new voices.
HELD_OUT_VARIANTS = ("m6", "f4")

# Accent label -> espeak-ng language voice.
ACCENT_VOICES = {
    "american": "en-us",
    "british": "en",
    "scottish": "en-gb-scotland",
    "caribbean": "en-029",
    "northern": "en-gb-x-gbclan",
    "midlands": "en-gb-x-gbcwmd",
}

# Settings replaced in a stock variant to make its whispered / creaky version. The whisper
# block follows espeak-ng's own `whisper` variant (weak voicing, breath noise in the formants,
# the voicing bar removed); creaky maximises `roughness` (glottal pulses damped periodically,
# espeak-ng's diplophonic "creak") and raises `flutter` (pitch jitter) far above the stock
# variants' 1-20: the result is a rough, unsteady voice more than true vocal fry.
_REPLACED = {"name", "voicing", "breath", "breathw", "flutter", "roughness"}
_WHISPER = ("voicing 18", "breath 75 75 50 40 15 10", "breathw 150 150 200 200 400 400",
            "flutter 20")
_CREAKY = ("roughness 7", "flutter 100")
VOICE_QUALITY_SETTINGS = {"modal": (), "whispered": _WHISPER, "creaky": _CREAKY}


def espeak_executable() -> str:
    """The espeak-ng program on PATH, or a MissingDependencyError that says how to install it."""
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise MissingDependencyError(
            f"espeak-ng is not installed (no `{ESPEAK}` on PATH); the styled-speech corpus "
            f"synthesises its speech with it: {INSTALL_HINT}.")
    return exe


def _version_line() -> str:
    out = subprocess.run([espeak_executable(), "--version"], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def espeak_version() -> str:
    """The espeak-ng version number, e.g. "1.51"."""
    m = re.search(r"text-to-speech:\s*(\S+)", _version_line())
    return m.group(1) if m else "unknown"


def espeak_data_dir() -> Path:
    """The espeak-ng-data directory the installed espeak-ng reads."""
    m = re.search(r"Data at:\s*(.+)$", _version_line())
    if not m:
        raise MissingDependencyError(f"cannot find espeak-ng's data directory; {INSTALL_HINT}.")
    return Path(m.group(1).strip())


# espeak-ng 1.51 overflows a fixed buffer (abort) on long "language+variant" names such as
# "en-gb-x-gbcwmd+clap_belinda_whispered" (37 characters); keep them well below that.
MAX_VOICE_SPEC = 30


def variant_name(base: str, voice_quality: str) -> str:
    """The (short) name of the derived variant file of ``base`` in ``voice_quality``,
    e.g. "cm3w" for the whispered version of m3."""
    return f"c{base}{voice_quality[0]}"


def voice_spec(accent: str, base: str, voice_quality: str) -> str:
    """The espeak-ng ``-v`` argument, e.g. "en-gb-scotland+cm3w"."""
    spec = f"{ACCENT_VOICES[accent]}+{variant_name(base, voice_quality)}"
    if len(spec) > MAX_VOICE_SPEC:
        raise ConfigError(f"espeak-ng voice name {spec!r} is longer than {MAX_VOICE_SPEC} "
                          f"characters, which crashes espeak-ng 1.51; use a shorter variant")
    return spec


def derive_variant(stock_text: str, voice_quality: str) -> str:
    """The text of a variant file: ``stock_text`` with the voice-quality settings replaced."""
    if voice_quality not in VOICE_QUALITY_SETTINGS:
        raise ConfigError(f"unknown voice quality {voice_quality!r}; "
                          f"known: {', '.join(VOICE_QUALITY_SETTINGS)}")
    lines = []
    for line in stock_text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("//", "#")) or words[0] in _REPLACED:
            continue
        if voice_quality == "whispered" and words[:2] == ["formant", "0"] and len(words) >= 4:
            words[3] = "0"  # no voicing bar in a whisper
            line = " ".join(words)
        lines.append(line)
    return "\n".join(lines + list(VOICE_QUALITY_SETTINGS[voice_quality])) + "\n"


class VariantLibrary:
    """A private espeak-ng data directory holding the derived variants of every speaker.

    Use as a context manager; ``path`` is passed to espeak-ng as ``--path``.
    """

    def __init__(self, bases: tuple[str, ...] = MALE_VARIANTS + FEMALE_VARIANTS):
        self.bases = bases
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.path: Path | None = None

    def __enter__(self) -> "VariantLibrary":
        src = espeak_data_dir()
        self._tmp = tempfile.TemporaryDirectory(prefix="clapedge-espeak-")
        root = Path(self._tmp.name) / "espeak-ng-data"
        variants = root / "voices" / "!v"
        variants.mkdir(parents=True)
        for entry in src.iterdir():
            if entry.name != "voices":
                (root / entry.name).symlink_to(entry)
        for entry in (src / "voices").iterdir():
            if entry.name != "!v":
                (root / "voices" / entry.name).symlink_to(entry)
        for base in self.bases:
            stock = src / "voices" / "!v" / base
            if not stock.is_file():
                raise MissingDependencyError(
                    f"espeak-ng variant {base!r} is missing from {stock.parent}; the corpus "
                    f"needs the full espeak-ng data ({INSTALL_HINT}).")
            text = stock.read_text(encoding="utf-8", errors="replace")
            for quality in VOICE_QUALITY_SETTINGS:
                (variants / variant_name(base, quality)).write_text(
                    f"name {variant_name(base, quality)}\n" + derive_variant(text, quality))
        self.path = Path(self._tmp.name)
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
        self._tmp, self.path = None, None


@dataclass(frozen=True)
class SynthParams:
    """One espeak-ng call. ``pitch`` 0-99 (-p), ``pitch_range`` 0-100 (SSML prosody range),
    ``rate_wpm`` words per minute (-s)."""

    text: str
    accent: str
    base: str
    voice_quality: str
    pitch: int
    pitch_range: int
    rate_wpm: int

    def __post_init__(self) -> None:
        if self.accent not in ACCENT_VOICES:
            raise ConfigError(f"unknown accent {self.accent!r}; known: {', '.join(ACCENT_VOICES)}")
        if not 0 <= self.pitch <= 99 or not 0 <= self.pitch_range <= 100:
            raise ConfigError(f"pitch must be 0-99 and pitch_range 0-100, got "
                              f"{self.pitch}, {self.pitch_range}")
        if not 80 <= self.rate_wpm <= 450:
            raise ConfigError(f"rate_wpm must be 80-450, got {self.rate_wpm}")


def synthesize(params: SynthParams, library_path: Path | str) -> tuple[np.ndarray, int]:
    """Speak ``params`` with espeak-ng; returns float32 mono samples in [-1, 1] and the rate."""
    variant = variant_name(params.base, params.voice_quality)
    if not (Path(library_path) / "espeak-ng-data" / "voices" / "!v" / variant).is_file():
        raise ConfigError(f"variant {variant!r} is not in the library at {library_path}")
    ssml = (f'<speak><prosody range="{params.pitch_range}">{escape(params.text)}'
            f"</prosody></speak>")
    cmd = [espeak_executable(), f"--path={library_path}", "-v",
           voice_spec(params.accent, params.base, params.voice_quality), "-p", str(params.pitch),
           "-s", str(params.rate_wpm), "-a", "100", "-z", "-m", "--stdout", ssml]
    env = {k: v for k, v in os.environ.items() if k != "ESPEAK_DATA_PATH"}
    out = subprocess.run(cmd, capture_output=True, env=env)
    if out.returncode != 0 or len(out.stdout) <= 44:
        raise RuntimeError(f"espeak-ng failed ({out.returncode}) for {cmd[1:8]}: "
                           f"{out.stderr.decode(errors='replace').strip()}")
    audio, sr = sf.read(io.BytesIO(out.stdout), dtype="float32")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    return audio, sr
