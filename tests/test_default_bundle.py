"""End to end on the real default model: ``models/default`` exported to INT8 (the
``default_int8_bundle`` fixture) and run by the torch-free runtime, against the PyTorch model,
on the clips of the tiny corpus (generated fresh, never seen in training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clapedge.calib.readers import decode_items, read_source
from clapedge.models.clap import ClapModel
from clapedge.runtime import Runtime

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")]

ROOT = Path(__file__).resolve().parents[1]


def test_int8_tags_match_the_pytorch_models_argmax(default_int8_bundle, tiny_corpus):
    rt = Runtime(default_int8_bundle, threads=2)
    model = ClapModel.from_dir(ROOT / "models" / "default").eval()
    signals = [s for _, s in decode_items(read_source(tiny_corpus), rt.sample_rate)]
    assert len(signals) >= 40
    with torch.no_grad():
        ref = torch.cat([model.embed_audio(torch.from_numpy(s)[None]) for s in signals]).numpy()
    got = rt.embed_audio(signals, rt.sample_rate)
    cos = (ref * got).sum(axis=1)
    assert cos.min() > 0.98 and cos.mean() > 0.995, (cos.min(), cos.mean())
    for bank in ("sex", "arousal", "loudness", "pitch", "voice_quality"):
        labels = rt.labels(bank)
        want = [labels[i] for i in (ref @ rt.bundle.bank(bank).T).argmax(axis=1)]
        tagged = [rt.tag(s, bank, k=1, sample_rate=rt.sample_rate)[0].label for s in signals]
        agree = np.mean([a == b for a, b in zip(tagged, want)])
        assert agree >= 0.9, (bank, agree)
        assert len(set(tagged)) > 1  # the tags follow the audio, not one constant label
