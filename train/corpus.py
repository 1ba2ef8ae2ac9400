"""The styled-speech corpus: espeak-ng speech with known speaking-style labels and captions.

``clap-corpus OUT_DIR --size tiny|small|default --seed N [--augment] [--force]`` writes

    OUT_DIR/wavs/clip_NNNNN.wav   16 kHz mono PCM16
    OUT_DIR/manifest.jsonl        one clip a line: path (relative to OUT_DIR), split, duration,
                                  sentence id and text, voice, attributes, captions, synthesis
                                  parameters, augmentation
    OUT_DIR/corpus.json           seed, size, versions (espeak-ng included), counts

How a clip is made: its arousal level is drawn first; rate, pitch, pitch range and loudness
levels are then drawn from distributions centred on it, so arousal is a learnable prosodic
proxy (not acted emotion, see docs/corpus.md). Sex, voice (stock espeak-ng variant), voice
quality (modal / whispered / creaky variant files) and accent are drawn independently.
Whispered clips have no pitch, so their pitch and pitch-range labels are ``None``.
Loudness is set after synthesis (and after any augmentation) as an active speech level in
dBFS, so it is measurable in the file. Everything is planned from ``random.Random(seed)`` up
front and each clip's own randomness comes from ``(seed, clip index)``: the same seed gives
byte-identical files with any number of workers.

Sentences (``sentences.txt``) are split train/val/test by id, and the voices in
``espeak.HELD_OUT_VARIANTS`` appear only in the test split.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import click
import numpy as np
import soundfile as sf
import soxr
from rich.console import Console

from clapedge.errors import ClapEdgeError, ConfigError
from clapedge.train import augment as fx
from clapedge.train import espeak
from clapedge.train.attributes import ATTRIBUTES
from clapedge.train.captions import make_captions

SAMPLE_RATE = 16000
FORMAT_VERSION = 1
SIZES = {"tiny": 60, "small": 400, "default": 4000}
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}
CAPTIONS_PER_CLIP = 4

# Level -> espeak-ng parameter interval (drawn uniformly inside it).
PITCH_LEVELS = {"low": (10, 22), "mid": (42, 54), "high": (74, 86)}  # -p, 0-99
PITCH_RANGE_LEVELS = {"low": (0, 12), "mid": (35, 55), "high": (88, 100)}  # SSML range
RATE_LEVELS = {"slow": (115, 135), "normal": (165, 185), "fast": (235, 265)}  # -s, wpm
LOUDNESS_LEVELS = {"quiet": (-39.5, -36.5), "normal": (-30.5, -27.5), "loud": (-21.5, -18.5)}
# espeak-ng's pitch range also lifts the median pitch (measured: about +2.5 semitones from
# range 50 to 100); -p moves it about 0.155 semitones a step. Lowering -p by this many steps
# per range step above 50 keeps the pitch level about where its label says.
PITCH_RANGE_COMPENSATION = 0.32

# P(cue level | arousal level) for each prosodic cue; rows low/mid/high arousal.
AROUSAL_CUE_PROBS = ((0.70, 0.25, 0.05), (0.20, 0.60, 0.20), (0.05, 0.25, 0.70))
VOICE_QUALITY_PROBS = {"modal": 0.5, "whispered": 0.25, "creaky": 0.25}
HELD_OUT_TEST_FRACTION = 0.5  # share of test clips spoken by a held-out voice

SENTENCES_FILE = Path(__file__).with_name("sentences.txt")


@dataclass(frozen=True)
class CorpusConfig:
    """What to generate. ``size`` is a name from ``SIZES``."""

    size: str = "tiny"
    seed: int = 0
    augment: bool = False
    workers: int = 2
    captions_per_clip: int = CAPTIONS_PER_CLIP

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"unknown corpus size {self.size!r}; choose one of "
                              f"{', '.join(SIZES)}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.captions_per_clip < 1:
            raise ConfigError(f"captions_per_clip must be >= 1, got {self.captions_per_clip}")

    @property
    def num_clips(self) -> int:
        return SIZES[self.size]


@dataclass
class ClipPlan:
    """Everything needed to render one clip, decided before any audio is made."""

    index: int
    split: str
    sentence_id: int
    text: str
    voice: str
    params: espeak.SynthParams
    level_dbfs: float
    labels: dict[str, str | None]
    captions: list[str]
    lead_s: float
    tail_s: float
    augment: dict | None = field(default=None)

    @property
    def clip_id(self) -> str:
        return f"clip_{self.index:05d}"


def load_sentences(path: Path = SENTENCES_FILE) -> list[str]:
    """The corpus sentences; a sentence's id is its index in this list."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def sentence_split(sentence_id: int) -> str:
    """The fixed split of a sentence: ids ending in 3 are val, in 7 test, the rest train."""
    return {3: "val", 7: "test"}.get(sentence_id % 10, "train")


def _split_counts(n: int) -> dict[str, int]:
    val = max(1, round(n * SPLIT_FRACTIONS["val"]))
    test = max(1, round(n * SPLIT_FRACTIONS["test"]))
    return {"train": n - val - test, "val": val, "test": test}


def _level(rng: random.Random, arousal: int, labels: tuple[str, ...]) -> str:
    return rng.choices(labels, weights=AROUSAL_CUE_PROBS[arousal])[0]


def _voice(rng: random.Random, sex: str, split: str) -> str:
    pool = espeak.MALE_VARIANTS if sex == "male" else espeak.FEMALE_VARIANTS
    held = [v for v in pool if v in espeak.HELD_OUT_VARIANTS]
    seen = [v for v in pool if v not in espeak.HELD_OUT_VARIANTS]
    if split == "test" and held and rng.random() < HELD_OUT_TEST_FRACTION:
        return rng.choice(held)
    return rng.choice(seen)


def _augment_plan(rng: random.Random) -> dict | None:
    if rng.random() >= 0.6:
        return None
    plan = {}
    if rng.random() < 0.5:
        plan["rt60_s"] = round(rng.uniform(0.15, 0.7), 3)
        plan["drr_db"] = round(rng.uniform(0.0, 8.0), 2)
    if rng.random() < 0.8 or not plan:
        plan["snr_db"] = round(rng.uniform(10.0, 30.0), 2)
        plan["noise"] = rng.choice(("white", "pink", "brown"))
    return plan


def plan_corpus(config: CorpusConfig, sentences: list[str] | None = None) -> list[ClipPlan]:
    """The deterministic plan of every clip for ``config``."""
    sentences = load_sentences() if sentences is None else sentences
    rng = random.Random(config.seed)
    pools = {s: [i for i in range(len(sentences)) if sentence_split(i) == s] for s in SPLITS}
    queues: dict[str, list[int]] = {s: [] for s in SPLITS}
    splits = [s for s, n in _split_counts(config.num_clips).items() for _ in range(n)]
    rng.shuffle(splits)
    plans = []
    for index, split in enumerate(splits):
        if not queues[split]:  # go through every sentence of a split before repeating one
            queues[split] = rng.sample(pools[split], len(pools[split]))
        sentence_id = queues[split].pop()
        arousal = rng.randrange(3)
        labels: dict[str, str | None] = {
            "sex": rng.choice(ATTRIBUTES["sex"]),
            "pitch": _level(rng, arousal, ATTRIBUTES["pitch"]),
            "pitch_range": _level(rng, arousal, ATTRIBUTES["pitch_range"]),
            "rate": _level(rng, arousal, ATTRIBUTES["rate"]),
            "loudness": _level(rng, arousal, ATTRIBUTES["loudness"]),
            "voice_quality": rng.choices(list(VOICE_QUALITY_PROBS),
                                         weights=list(VOICE_QUALITY_PROBS.values()))[0],
            "accent": rng.choice(ATTRIBUTES["accent"]),
            "arousal": ATTRIBUTES["arousal"][arousal],
        }
        voice = _voice(rng, labels["sex"], split)
        pitch_range = rng.randint(*PITCH_RANGE_LEVELS[labels["pitch_range"]])
        pitch = rng.randint(*PITCH_LEVELS[labels["pitch"]])
        pitch = int(np.clip(round(pitch - PITCH_RANGE_COMPENSATION * (pitch_range - 50)), 0, 99))
        params = espeak.SynthParams(
            text=sentences[sentence_id], accent=labels["accent"], base=voice,
            voice_quality=labels["voice_quality"], pitch=pitch, pitch_range=pitch_range,
            rate_wpm=rng.randint(*RATE_LEVELS[labels["rate"]]))
        level = round(rng.uniform(*LOUDNESS_LEVELS[labels["loudness"]]), 2)
        if labels["voice_quality"] == "whispered":  # a whisper has no pitch to label
            labels["pitch"] = labels["pitch_range"] = None
        captions = make_captions(labels, rng, config.captions_per_clip)
        lead, tail = round(rng.uniform(0.05, 0.25), 3), round(rng.uniform(0.05, 0.25), 3)
        aug = _augment_plan(rng) if config.augment and split == "train" else None
        plans.append(ClipPlan(index, split, sentence_id, sentences[sentence_id], voice, params,
                              level, labels, captions, lead, tail, aug))
    return plans


def render_clip(plan: ClipPlan, library_path: str, seed: int) -> np.ndarray:
    """The clip's 16 kHz int16 samples."""
    audio, sr = espeak.synthesize(plan.params, library_path)
    audio = soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    audio = fx.trim_silence(audio, SAMPLE_RATE)
    audio = np.concatenate([np.zeros(int(plan.lead_s * SAMPLE_RATE), np.float32), audio,
                            np.zeros(int(plan.tail_s * SAMPLE_RATE), np.float32)])
    if plan.augment:
        rng = np.random.default_rng([seed, plan.index])
        if "rt60_s" in plan.augment:
            ir = fx.room_impulse_response(SAMPLE_RATE, plan.augment["rt60_s"], rng,
                                          plan.augment["drr_db"])
            audio = fx.reverberate(audio, ir)
        if "snr_db" in plan.augment:
            audio = fx.add_noise(audio, SAMPLE_RATE, plan.augment["snr_db"], rng,
                                 plan.augment["noise"])
    audio = fx.set_level(audio, SAMPLE_RATE, plan.level_dbfs)
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def manifest_row(plan: ClipPlan, num_samples: int) -> dict:
    return {
        "id": plan.clip_id,
        "path": f"wavs/{plan.clip_id}.wav",
        "split": plan.split,
        "duration": round(num_samples / SAMPLE_RATE, 4),
        "sentence_id": plan.sentence_id,
        "text": plan.text,
        "voice": plan.voice,
        "held_out_voice": plan.voice in espeak.HELD_OUT_VARIANTS,
        "attributes": plan.labels,
        "captions": plan.captions,
        "synthesis": {
            "espeak_voice": espeak.voice_spec(plan.params.accent, plan.voice,
                                              plan.params.voice_quality),
            "pitch": plan.params.pitch,
            "pitch_range": plan.params.pitch_range,
            "rate_wpm": plan.params.rate_wpm,
            "level_dbfs": plan.level_dbfs,
        },
        "augment": plan.augment,
    }


# Worker state, set once per process by _init_worker.
_WORKER: dict = {}


def _init_worker(library_path: str, wav_dir: str, seed: int) -> None:
    _WORKER.update(library=library_path, wav_dir=wav_dir, seed=seed)


def _render_and_write(plan: ClipPlan) -> dict:
    samples = render_clip(plan, _WORKER["library"], _WORKER["seed"])
    sf.write(os.path.join(_WORKER["wav_dir"], f"{plan.clip_id}.wav"), samples, SAMPLE_RATE,
             subtype="PCM_16", format="WAV")
    return manifest_row(plan, len(samples))


def _versions() -> dict[str, str]:
    out = {"espeak-ng": espeak.espeak_version(), "numpy": np.__version__,
           "libsndfile": sf.__libsndfile_version__}
    for dist in ("clapedge", "soxr", "soundfile"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    out["python"] = platform.python_version()
    return out


def _summary(config: CorpusConfig, rows: list[dict], sentences: list[str]) -> dict:
    label_counts = {a: dict(sorted(Counter(str(r["attributes"][a]) for r in rows).items()))
                    for a in ATTRIBUTES}
    return {
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "size": config.size,
        "augment": config.augment,
        "sample_rate": SAMPLE_RATE,
        "num_clips": len(rows),
        "splits": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "hours": round(sum(r["duration"] for r in rows) / 3600, 4),
        "label_counts": label_counts,
        "sentences": {s: sum(sentence_split(i) == s for i in range(len(sentences)))
                      for s in SPLITS},
        "voices": {"male": list(espeak.MALE_VARIANTS), "female": list(espeak.FEMALE_VARIANTS),
                   "held_out": list(espeak.HELD_OUT_VARIANTS),
                   "accents": dict(espeak.ACCENT_VOICES),
                   "voice_qualities": {q: list(s) for q, s in
                                       espeak.VOICE_QUALITY_SETTINGS.items()}},
        "levels": {"pitch_p": PITCH_LEVELS, "pitch_range": PITCH_RANGE_LEVELS,
                   "rate_wpm": RATE_LEVELS, "loudness_dbfs": LOUDNESS_LEVELS,
                   "arousal_cue_probs": AROUSAL_CUE_PROBS},
        "versions": _versions(),
    }


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _render_all(plans: list[ClipPlan], config: CorpusConfig, library: str, wav_dir: Path,
                on_clip) -> list[dict]:
    init = (library, str(wav_dir), config.seed)
    if config.workers == 1:
        _init_worker(*init)
        rows = []
        for plan in plans:
            rows.append(_render_and_write(plan))
            on_clip()
        return rows
    ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads
    rows = []
    with ctx.Pool(config.workers, initializer=_init_worker, initargs=init) as pool:
        for row in pool.imap(_render_and_write, plans, chunksize=16):
            rows.append(row)
            on_clip()
    return rows


def write_corpus(out_dir: Path | str, config: CorpusConfig, *, force: bool = False,
                 progress: bool = False) -> dict:
    """Generate the corpus into ``out_dir`` atomically (a temporary sibling directory renamed
    into place); refuses an existing ``out_dir`` unless ``force``. Returns corpus.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ConfigError(f"{out_dir} already exists; pass --force (force=True) to replace it")
    espeak.espeak_executable()  # fail early, before any work, if espeak-ng is missing
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sentences = load_sentences()
    plans = plan_corpus(config, sentences)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        (tmp / "wavs").mkdir()
        with espeak.VariantLibrary() as library, _progress(progress, len(plans)) as advance:
            rows = _render_all(plans, config, str(library.path), tmp / "wavs", advance)
        with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        summary = _summary(config, rows, sentences)
        _dump(summary, tmp / "corpus.json")
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _replace(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash / "old")
    os.replace(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


class _progress:
    """A rich progress bar, or nothing; the context value advances it by one clip."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self._bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bar = Progress(TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self._bar.start()
        task = self._bar.add_task("clips", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def load_manifest(corpus_dir: Path | str, split: str | None = None) -> list[dict]:
    """The manifest rows of a corpus (optionally one split), with ``path`` made absolute."""
    corpus_dir = Path(corpus_dir)
    manifest = corpus_dir / "manifest.jsonl"
    if not manifest.is_file():
        raise ConfigError(f"{manifest} not found; generate a corpus with `clap-corpus DIR`")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    rows = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if split is None or row["split"] == split:
            row["path"] = str(corpus_dir / row["path"])
            rows.append(row)
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.Choice(list(SIZES)), default="default", show_default=True,
              help="tiny (tests, seconds), small, default (the training corpus)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--augment", is_flag=True, help="noise and room reverb on the train clips")
@click.option("--force", is_flag=True, help="replace an existing OUT_DIR")
@click.option("--workers", type=int, default=2, show_default=True)
def cli(out_dir: Path, size: str, seed: int, augment: bool, force: bool, workers: int) -> None:
    """Synthesise the styled-speech corpus into OUT_DIR with espeak-ng."""
    err = Console(stderr=True)
    try:
        config = CorpusConfig(size=size, seed=seed, augment=augment, workers=workers)
        start = time.perf_counter()
        summary = write_corpus(out_dir, config, force=force, progress=err.is_terminal)
    except ClapEdgeError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    err.print(f"wrote {summary['num_clips']} clips ({summary['hours'] * 60:.1f} min of speech; "
              f"{summary['splits']}) to {out_dir} in {time.perf_counter() - start:.1f} s",
              highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``clap-corpus``."""
    cli.main(args=argv, prog_name="clap-corpus")


if __name__ == "__main__":
    main()
