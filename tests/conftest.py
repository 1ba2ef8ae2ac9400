"""Shared fixtures.

``tiny_corpus``: the tiny styled-speech corpus (``clap-corpus --size tiny --seed 0``), built
once per test session with espeak-ng; tests that use it are skipped where espeak-ng is not
installed (``make test`` installs it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The directory of a tiny corpus (60 clips; seed 0): wavs/, manifest.jsonl, corpus.json."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: apt-get install espeak-ng (or make system-deps)")
    from clapedge.train.corpus import CorpusConfig, write_corpus

    out = tmp_path_factory.mktemp("corpus") / "tiny"
    write_corpus(out, CorpusConfig(size="tiny", seed=0, workers=1))
    return out


TINY_WORDS = ("a the person is speaking in style voice calm low high pitched female male fast "
              "slow loud quiet whisper whispering speech with scottish accent happy neutral deep "
              "soft creaky modal mid normal expressive monotone woman man speaks").split()


def write_tiny_tokenizer(path: Path) -> Path:
    """A WordLevel tokenizer.json whose ids fit the tiny presets' 128-token vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, ",": 4, ".": 5, "-": 6}
    for word in TINY_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a saved tiny ClapModel directory (random init, seed 0) with a tiny tokenizer."""
    made: dict[str, Path] = {}

    def make(preset: str = "default") -> Path:
        if preset not in made:
            import torch

            from clapedge.models import ClapModel, build_preset

            root = tmp_path_factory.mktemp(f"model-{preset}")
            write_tiny_tokenizer(root / "tok")
            torch.manual_seed(0)
            model = ClapModel.from_config(build_preset(preset, tiny=True)).eval()
            model.attach_tokenizer(root / "tok", max_length=64)
            made[preset] = model.save_dir(root / "model")
        return made[preset]

    return make


@pytest.fixture(scope="session")
def tiny_demo(tiny_model_dir, tmp_path_factory):
    """``demo.sh`` run once on the tiny corpus with the tiny default model (about 40 s):
    (output directory, combined stdout/stderr, exit status). Used by the demo smoke test and
    by the quick-start test (its INT8 bundle, corpus and index)."""
    import os
    import subprocess
    import sys

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: apt-get install espeak-ng (or make system-deps)")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("demo") / "out"
    env = dict(os.environ, BIN=str(Path(sys.executable).parent), OUT=str(out),
               MODEL=str(tiny_model_dir("default")), SIZE="tiny", NO_COLOR="1")
    done = subprocess.run(["bash", str(root / "demo.sh")], env=env, cwd=root, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    return out, done.stdout, done.returncode


@pytest.fixture(scope="session")
def default_int8_bundle(tiny_corpus, tmp_path_factory) -> Path:
    """``models/default`` exported to INT8 (with its streaming split and tagger), calibrated
    on the tiny corpus at 1 and 2 s; about 40 s. The accuracy search is left out (it needs a
    labelled held-out split larger than the tiny corpus's to mean anything)."""
    from clapedge.export.pipeline import ExportOptions, export_bundle

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("default-int8") / "bundle"
    export_bundle(root / "models" / "default", out, ExportOptions(
        precision="int8", calib=tiny_corpus, calib_clips=2, calib_lengths=(1.0, 2.0),
        max_drop=None))
    return out
