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
