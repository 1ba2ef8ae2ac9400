"""The styled-speech corpus: determinism, schema, hold-outs, and labels that the audio bears out."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from clapedge.errors import ConfigError, MissingDependencyError
from clapedge.train import attributes, corpus, espeak
from clapedge.train.augment import active_level_db
from clapedge.train.captions import make_captions

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def _rows(corpus_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus_dir / "manifest.jsonl").read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- independent measurements (numpy only, not the generator's own code) ---------------------

def rms_dbfs(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12))


def f0_track(x: np.ndarray, sr: int = 16000, fmin: float = 60, fmax: float = 400) -> np.ndarray:
    """F0 of the clearly periodic 40 ms frames, from the normalised autocorrelation peak."""
    fl, hop = int(0.04 * sr), int(0.01 * sr)
    n = 1 + (len(x) - fl) // hop
    frames = x[np.arange(fl)[None, :] + hop * np.arange(n)[:, None]].astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    energy = (frames ** 2).mean(axis=1)
    win = np.hanning(fl)
    frames = frames[energy > energy.max() * 10 ** -2.5] * win
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames, 2 * fl)) ** 2)[:, :fl]
    ac /= np.fft.irfft(np.abs(np.fft.rfft(win, 2 * fl)) ** 2)[:fl]  # unbias the window
    ac /= ac[:, :1]
    lo, hi = int(sr / fmax), int(sr / fmin)
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    peak = ac[np.arange(len(lag)), lag]
    return sr / lag[peak > 0.6]


def _means(groups: dict[str, list[float]], order: tuple[str, ...]) -> list[float]:
    return [float(np.mean(groups[label])) for label in order]


# --- the tiny corpus --------------------------------------------------------------------------

def test_tiny_corpus_is_byte_identical_for_a_seed(tiny_corpus, tmp_path):
    again = tmp_path / "again"
    corpus.write_corpus(again, corpus.CorpusConfig(size="tiny", seed=0, workers=2))
    first, second = _files(tiny_corpus), _files(again)
    assert len(first) == corpus.SIZES["tiny"] + 2
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_another_seed_gives_another_corpus():
    a = corpus.plan_corpus(corpus.CorpusConfig(size="tiny", seed=0))
    b = corpus.plan_corpus(corpus.CorpusConfig(size="tiny", seed=1))
    assert [p.params for p in a] != [p.params for p in b]


def test_manifest_schema(tiny_corpus):
    rows = _rows(tiny_corpus)
    summary = json.loads((tiny_corpus / "corpus.json").read_text())
    assert len(rows) == summary["num_clips"] == corpus.SIZES["tiny"]
    assert summary["seed"] == 0 and summary["size"] == "tiny"
    assert re.fullmatch(r"\d+\.\d+.*", summary["versions"]["espeak-ng"])
    assert summary["splits"] == {s: sum(r["split"] == s for r in rows) for s in corpus.SPLITS}
    assert all(summary["splits"][s] > 0 for s in corpus.SPLITS)
    keys = {"id", "path", "split", "duration", "sentence_id", "text", "voice", "held_out_voice",
            "attributes", "captions", "synthesis", "augment"}
    sentences = corpus.load_sentences()
    for row in rows:
        assert set(row) == keys
        assert not Path(row["path"]).is_absolute()
        info = sf.info(tiny_corpus / row["path"])
        assert (info.samplerate, info.channels, info.subtype, info.format) == \
            (16000, 1, "PCM_16", "WAV")
        assert row["duration"] == pytest.approx(info.frames / 16000, abs=1e-3)
        assert 0.5 < row["duration"] < 15
        assert row["text"] == sentences[row["sentence_id"]]
        assert set(row["attributes"]) == set(attributes.ATTRIBUTES)
        for name, label in row["attributes"].items():
            assert label is None or label in attributes.ATTRIBUTES[name]
        whispered = row["attributes"]["voice_quality"] == "whispered"
        assert (row["attributes"]["pitch"] is None) == whispered
        assert len(row["captions"]) == corpus.CAPTIONS_PER_CLIP
        assert len(set(row["captions"])) == len(row["captions"])
        assert all(isinstance(c, str) and c.endswith(".") for c in row["captions"])


def test_test_split_holds_out_sentences_and_voices(tiny_corpus):
    rows = _rows(tiny_corpus)
    by_split = defaultdict(set)
    voices = defaultdict(set)
    for row in rows:
        by_split[row["split"]].add(row["sentence_id"])
        voices[row["split"]].add(row["voice"])
        assert corpus.sentence_split(row["sentence_id"]) == row["split"]
        assert row["held_out_voice"] == (row["voice"] in espeak.HELD_OUT_VARIANTS)
    assert not by_split["test"] & (by_split["train"] | by_split["val"])
    assert not by_split["val"] & by_split["train"]
    assert not set(espeak.HELD_OUT_VARIANTS) & (voices["train"] | voices["val"])
    # The same holds for every clip of the full-size plan (no audio needed).
    plans = corpus.plan_corpus(corpus.CorpusConfig(size="default", seed=3))
    test_texts = {p.text for p in plans if p.split == "test"}
    assert not test_texts & {p.text for p in plans if p.split != "test"}
    held = [p for p in plans if p.voice in espeak.HELD_OUT_VARIANTS]
    assert held and all(p.split == "test" for p in held)


def test_labels_agree_with_the_audio(tiny_corpus):
    loud, rate, pitch, voiced = (defaultdict(list) for _ in range(4))
    for row in _rows(tiny_corpus):
        x, sr = sf.read(tiny_corpus / row["path"], dtype="float32")
        a = row["attributes"]
        loud[a["loudness"]].append(rms_dbfs(x))
        rate[a["rate"]].append(row["duration"] / len(row["text"].split()))
        f0 = f0_track(x, sr)
        voiced[a["voice_quality"]].append(len(f0) * 0.01 / row["duration"])
        if a["voice_quality"] == "modal":  # creak's subharmonics make a simple F0 ambiguous
            reference = 100.0 if a["sex"] == "male" else 200.0
            pitch[a["pitch"]].append(12 * np.log2(np.median(f0) / reference))
    quiet, normal, loud_ = _means(loud, attributes.ATTRIBUTES["loudness"])
    assert quiet + 6 < normal < loud_ - 6  # levels are 9 dB apart
    for label, (lo, hi) in corpus.LOUDNESS_LEVELS.items():  # whole-file RMS ~ active level
        assert lo - 2.5 < np.mean(loud[label]) < hi + 0.5
    slow, normal, fast = _means(rate, attributes.ATTRIBUTES["rate"])  # seconds per word
    assert slow > 1.15 * normal and normal > 1.15 * fast
    low, mid, high = _means(pitch, attributes.ATTRIBUTES["pitch"])  # semitones re sex norm
    assert low + 2 < mid < high - 2
    # Whispers are unvoiced; creaky voice is less periodic than modal voice.
    modal, whispered, creaky = _means(voiced, attributes.ATTRIBUTES["voice_quality"])
    assert whispered < 0.05 < creaky < modal - 0.05


def test_arousal_is_carried_by_the_prosodic_cues():
    plans = corpus.plan_corpus(corpus.CorpusConfig(size="default", seed=0))
    cues = ("rate", "loudness", "pitch", "pitch_range")
    score = defaultdict(list)
    for p in plans:
        levels = [attributes.ordinal_index(c, p.labels[c]) for c in cues]
        levels = [v for v in levels if v is not None]
        score[p.labels["arousal"]].append(np.mean(levels))
    low, mid, high = _means(score, attributes.ATTRIBUTES["arousal"])
    assert low + 0.4 < mid < high - 0.4
    counts = {label: len(v) for label, v in score.items()}
    assert min(counts.values()) > 0.25 * len(plans)


def test_augmentation_keeps_the_loudness_label():
    config = corpus.CorpusConfig(size="small", seed=5, augment=True)
    plans = [p for p in corpus.plan_corpus(config) if p.augment]
    assert all(p.split == "train" for p in plans)
    reverb = next(p for p in plans if "rt60_s" in p.augment and "snr_db" in p.augment)
    clean = corpus.ClipPlan(**{**reverb.__dict__, "augment": None})
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    with espeak.VariantLibrary() as lib:
        wet = corpus.render_clip(reverb, str(lib.path), config.seed).astype(np.float32) / 32767
        dry = corpus.render_clip(clean, str(lib.path), config.seed).astype(np.float32) / 32767
    assert len(wet) > len(dry)  # the reverberant tail
    assert active_level_db(wet, 16000) == pytest.approx(reverb.level_dbfs, abs=0.5)
    assert active_level_db(dry, 16000) == pytest.approx(reverb.level_dbfs, abs=0.5)


def test_captions_never_name_another_label():
    rng = random.Random(0)
    contradictions = {
        ("sex", "male"): r"\b(woman|female|feminine)\b",
        ("sex", "female"): r"\b(man|male|masculine)\b",
        ("rate", "slow"): r"\b(fast|rapid|rapidly|quick|quickly)\b",
        ("rate", "fast"): r"\b(slow|slowly|unhurried|leisurely)\b",
        ("voice_quality", "modal"): r"\b(whisper\w*|creaky|gravelly)\b",
        ("voice_quality", "whispered"): r"\b(creaky|gravelly|clear)\b",
        ("loudness", "quiet"): r"\b(loud|loudly|booming|forceful)\b",
        ("arousal", "low"): r"\b(energetic|excited|lively)\b",
    }
    for plan in corpus.plan_corpus(corpus.CorpusConfig(size="small", seed=1)):
        for caption in make_captions(plan.labels, rng, 6):
            for (attr, label), pattern in contradictions.items():
                if plan.labels[attr] == label:
                    assert not re.search(pattern, caption, re.I), (plan.labels, caption)


def test_prompt_banks_cover_every_label():
    for name, labels in attributes.ATTRIBUTES.items():
        bank = attributes.label_prompts(name)
        assert list(bank) == list(labels)
        prompts = [p for ps in bank.values() for p in ps]
        assert len(prompts) == len(set(prompts)) and all("{" not in p for p in prompts)
        assert all(re.fullmatch(r"[A-Z].*\.", p) and " a a" not in p for p in prompts)
    assert attributes.tag_prompt("rate", "fast") == "A person is speaking in a fast style."
    assert attributes.tag_prompt("arousal", "high") == \
        "A person is speaking in an energetic style."
    vec = attributes.tag_targets({"sex": "female", "pitch": None, "rate": "slow"})
    tags = attributes.all_tags()
    assert [tags[i] for i, v in enumerate(vec) if v] == [("sex", "female"), ("rate", "slow")]
    with pytest.raises(ConfigError, match="unknown attribute"):
        attributes.label_prompts("mood")


# --- the CLI and its errors -------------------------------------------------------------------

def test_cli_refuses_an_existing_directory_and_force_replaces_it(tiny_corpus, tmp_path):
    out = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, out)
    (out / "stale.txt").write_text("old")
    result = CliRunner().invoke(corpus.cli, [str(out), "--size", "tiny"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "already exists" in result.output and "--force" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(corpus.cli, [str(out), "--size", "tiny", "--force",
                                             "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert _files(out) == _files(tiny_corpus)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MissingDependencyError, match="apt-get install espeak-ng"):
        corpus.write_corpus(tmp_path / "c", corpus.CorpusConfig(size="tiny"))
    result = CliRunner().invoke(corpus.cli, [str(tmp_path / "c"), "--size", "tiny"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "apt-get install espeak-ng" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown corpus size"):
        corpus.CorpusConfig(size="huge")
    with pytest.raises(ConfigError, match="workers"):
        corpus.CorpusConfig(workers=0)
    with pytest.raises(ConfigError, match="not found"):
        corpus.load_manifest(Path("/nonexistent"))


def test_load_manifest_filters_a_split(tiny_corpus):
    rows = corpus.load_manifest(tiny_corpus, split="test")
    assert rows and all(r["split"] == "test" for r in rows)
    assert all(Path(r["path"]).is_file() for r in rows)


@needs_espeak
def test_every_voice_spec_is_short_enough_for_espeak():
    for accent in espeak.ACCENT_VOICES:
        for base in espeak.MALE_VARIANTS + espeak.FEMALE_VARIANTS:
            for quality in espeak.VOICE_QUALITY_SETTINGS:
                assert len(espeak.voice_spec(accent, base, quality)) <= espeak.MAX_VOICE_SPEC
