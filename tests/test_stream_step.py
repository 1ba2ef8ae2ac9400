"""export/stream_step.py: the cached-attention encoder step, on tiny presets (random init)."""

from __future__ import annotations

import pytest
import torch

from clapedge.export.stream_step import StepEncoder, cached_windows, encoder_frames
from clapedge.models.clap import ClapModel
from clapedge.models.presets import PRESETS, build_preset

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def tiny(name: str) -> ClapModel:
    torch.manual_seed(0)
    return ClapModel.from_config(build_preset(name, tiny=True)).eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_step_with_nothing_cached_is_the_offline_encoder(name):
    # WavLM and wav2vec2, post-norm and stable-layer-norm, with and without heads.
    model = tiny(name)
    step = StepEncoder(model).eval()
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(1)) * 0.3
    with torch.no_grad():
        frames = encoder_frames(model, wave)
        ctx, pk, pv, ph = step.empty_cache()
        out = step(frames, ctx, pk, pv, ph)
        ref = model.encode_audio(wave)
    torch.testing.assert_close(out[0], ref.embedding, atol=2e-5, rtol=0)
    for i, h in enumerate(model.config.heads):
        want = model.heads(ref.pooled, ref.embedding)[h.name]
        torch.testing.assert_close(out[1 + i], want, atol=2e-5, rtol=0)
    new_key, new_value, new_hidden = out[-3:]
    assert new_key.shape == new_value.shape == (step.layers, 1, frames.shape[1], step.hidden)
    assert new_hidden.shape == (1, frames.shape[1], step.hidden)


@pytest.mark.parametrize("name", ["default", "ess-clap"])
def test_cached_windows_bookkeeping(name):
    model = tiny(name)
    step = StepEncoder(model).eval()
    wave = torch.randn(1, 48000, generator=torch.Generator().manual_seed(2)) * 0.3
    window, hop = 49, 12  # 1 s window, ~0.25 s hop, in frames
    with torch.no_grad():
        frames = encoder_frames(model, wave)

        def alone(f0):
            ctx, pk, pv, ph = step.empty_cache()
            return step(frames[:, f0:f0 + window], ctx, pk, pv, ph)[0]

        # lookahead covering the whole window: every window recomputed, the offline windows
        full = list(cached_windows(step, frames, window, hop, lookahead=window - hop))
        assert len(full) == (frames.shape[1] - window) // hop + 1
        for f0, out, computed in full:
            assert computed == window
            torch.testing.assert_close(out[0], alone(f0), atol=2e-5, rtol=0)
        # no lookahead: after the first window, only the hop's new frames are computed
        cheap = list(cached_windows(step, frames, window, hop, lookahead=0))
        assert [c for _, _, c in cheap] == [window] + [hop] * (len(cheap) - 1)
        torch.testing.assert_close(cheap[0][1][0], full[0][1][0])
        later = torch.cat([out[0] for _, out, _ in cheap[1:]])
        exact = torch.cat([out[0] for _, out, _ in full[1:]])
        torch.testing.assert_close(later.norm(dim=-1), torch.ones(len(later)), atol=1e-5, rtol=0)
        assert not torch.allclose(later, exact, atol=1e-4)  # an approximation, not the same
