"""models/causal.py: causal audio encoders, and the exact streaming step over them
(export/stream_step.py: causal_windows), on tiny presets (random init)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from clapedge.errors import ConfigError
from clapedge.export.stream_step import (StepEncoder, StepUnsupported, causal_windows,
                                         encoder_frames)
from clapedge.models.clap import ClapModel
from clapedge.models.causal import allowed
from clapedge.models.config import ClapConfig
from clapedge.models.presets import PRESETS, build_preset

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import stream_all  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

SUPPORTED = [n for n in PRESETS if build_preset(n, tiny=True).audio.backbone != "data2vec-audio"]


def causal_config(name: str, left: int = 20) -> ClapConfig:
    cfg = build_preset(name, tiny=True)
    return dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, causal_context=left))


def causal_model(name: str, left: int = 20) -> ClapModel:
    torch.manual_seed(0)
    return ClapModel.from_config(causal_config(name, left)).eval()


def wave(seconds: float, seed: int) -> torch.Tensor:
    return torch.randn(1, int(16000 * seconds), generator=torch.Generator().manual_seed(seed)) * 0.3


@pytest.mark.parametrize("name", SUPPORTED)
def test_a_frame_never_sees_the_future(name):
    model = causal_model(name)
    tower = model.audio_branch
    with torch.no_grad():
        frames = encoder_frames(model, wave(2, 1))
        mask = torch.ones(frames.shape[:2], dtype=torch.bool)
        states = tower._encode(frames, mask)
        changed = frames.clone()
        changed[:, 40:] += 1.0
        again = tower._encode(changed, mask)
    assert torch.equal(states[:, :40], again[:, :40])
    assert (states[:, 40:] - again[:, 40:]).abs().max() > 1e-2


def test_the_mask_is_self_plus_left_context():
    q = torch.arange(3, 6)   # queries at positions 3..5 over keys 0..5, 2 frames back
    got = allowed(q, torch.arange(6), 2).int().tolist()
    assert got == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize("name", SUPPORTED)
def test_streaming_windows_equal_the_whole_stream_pooled_per_window(name):
    model = causal_model(name)
    tower = model.audio_branch
    step = StepEncoder(model).eval()
    assert step.causal == 20 and step.context == causal_positional_kernel(model) - 1
    window, hop = 49, 12
    with torch.no_grad():
        frames = encoder_frames(model, wave(3, 3))
        mask = torch.ones(frames.shape[:2], dtype=torch.bool)
        states = tower._encode(frames, mask)
        outs = list(causal_windows(step, frames, window, hop))
        assert [f0 for f0, _ in outs] == list(range(0, frames.shape[1] - window + 1, hop))
        for f0, out in outs:
            pooled = tower.pooling(states[:, f0:f0 + window], mask[:, :window])
            want = torch.nn.functional.normalize(model.audio_projection(pooled), dim=-1)
            torch.testing.assert_close(out[0], want, atol=1e-5, rtol=0)
            for i, head in enumerate(model.config.heads):
                torch.testing.assert_close(out[1 + i], model.heads(pooled, want)[head.name],
                                           atol=1e-5, rtol=0)
    assert len(outs) >= 6


def causal_positional_kernel(model: ClapModel) -> int:
    return int(model.audio_branch.base.encoder.pos_conv_embed.conv.kernel_size[0])


def test_a_bidirectional_model_has_no_exact_stream():
    torch.manual_seed(0)
    model = ClapModel.from_config(build_preset("default", tiny=True)).eval()
    step = StepEncoder(model)
    with pytest.raises(StepUnsupported, match="causal"):
        next(causal_windows(step, torch.zeros(1, 60, step.hidden), 49, 12))


def test_config_round_trip_and_validation(tmp_path):
    model = causal_model("default", left=7)
    model.save_dir(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["audio"]["causal_context"] == 7
    loaded = ClapModel.from_dir(tmp_path / "m").eval()
    assert loaded.audio_branch.causal_context == 7
    x = wave(1, 4)
    torch.testing.assert_close(loaded.encode_audio(x).embedding, model.encode_audio(x).embedding)
    # a bidirectional config does not mention the field (older readers still read it)
    plain = build_preset("default", tiny=True).to_dict()
    assert "causal_context" not in plain["audio"]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="causal_context"):
            causal_config("default", left=bad)


def test_causal_training_step_runs_in_bf16_and_learns_nothing_from_the_future():
    model = causal_model("default")
    model.train()
    x = wave(1, 5).repeat(2, 1)
    lengths = torch.tensor([16000, 12000])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.embed_audio(x, torch.arange(16000)[None] < lengths[:, None], normalize=False)
    loss = emb.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.audio_branch.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- bundles

RATE = 16000


@pytest.fixture(scope="module")
def causal_bundles(tmp_path_factory, tiny_corpus):
    """A tiny causal model (30 frames of left context) exported fp32 and INT8."""
    from conftest import write_tiny_tokenizer

    from clapedge.export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("causal")
    write_tiny_tokenizer(root / "tok")
    model = causal_model("default", left=30)
    model.attach_tokenizer(root / "tok", max_length=64)
    model_dir = model.save_dir(root / "model")
    out = {}
    for precision in ("fp32", "int8"):
        out[precision] = root / precision
        export_bundle(model_dir, out[precision], ExportOptions(
            precision=precision, calib=tiny_corpus if precision == "int8" else None,
            calib_clips=2, calib_lengths=(1.0, 2.0), max_drop=None))
    return model_dir, out


def signal(seconds: float, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.2 * np.sin(2 * np.pi * 180 * t * (1 + 0.2 * np.sin(t))) +
            0.05 * rng.standard_normal(len(t))).astype(np.float32)


def stream(rt, x, **kw):
    return stream_all(rt, x, chunks=(3001,), banks=(), **kw)


def whole_stream_reference(model_dir, x, starts):
    """Window embeddings of the causal model over the whole stream, pooled per window."""
    model = ClapModel.from_dir(model_dir).eval()
    with torch.no_grad():
        frames = encoder_frames(model, torch.from_numpy(x)[None])
        states = model.audio_branch._encode(frames, torch.ones(frames.shape[:2], dtype=torch.bool))
        out = []
        for a in starts:
            pooled = states[:, a // 320:a // 320 + 99].mean(dim=1)
            out.append(torch.nn.functional.normalize(model.audio_projection(pooled), dim=-1)[0])
    return torch.stack(out).numpy()


def test_a_causal_bundle_ships_its_step(causal_bundles):
    from clapedge.runtime.manifest import FORMAT_VERSION, read_manifest

    _, bundles = causal_bundles
    for precision, root in bundles.items():
        m = read_manifest(root)
        assert m.format_version == FORMAT_VERSION == "1.5"
        assert m.stream is not None and m.stream.exact and m.stream.step is not None
        assert (m.stream.causal_context, m.stream.step_context) == (30, 15)
        assert m.stream.step.precision == precision
        assert dict(m.files())["audio_step.onnx"] == m.stream.step.sha256
        report = json.loads((root / "export_report.json").read_text())["stream"]["step"]
        assert report["window_cosine"] >= (0.99 if precision == "int8" else 0.9999)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_step_stream_equals_the_whole_stream_encoded_at_once(causal_bundles, precision):
    import numpy as np

    from clapedge.runtime import Runtime

    model_dir, bundles = causal_bundles
    rt = Runtime(bundles[precision], threads=1)
    x = signal(6.3)
    s, events = stream(rt, x)
    assert s.plan is not None and s.plan.step and "causal step" in s.plan_reason
    regular = [e for e in events if e.end_s - e.start_s == 2.0 and
               round(e.start_s * RATE) % 8000 == 0]
    assert len(regular) == 9  # 0, 0.5, ..., 4.0 s; the end-aligned last window is extra
    starts = [int(round(e.start_s * RATE)) for e in regular]
    ref = whole_stream_reference(model_dir, x, starts)
    got = np.stack([e.embedding for e in regular])
    atol = 1e-5 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
    # every frame of the stream went through the step once: the first window's 99, then
    # each hop's 25 new ones (and the end-aligned last window, on the frame grid here, its
    # 15 new ones)
    assert s.step.encoded == (len(x) - 400) // 320 + 1 == 99 + 25 * 8 + 15
    # bounded: fixed-size caches, the final states of one window
    assert s.step.keys.shape == (2, 1, 30, 32) and len(s.step.finals) == 99
    # the first window has nothing before it: the offline window's embedding
    first = rt.embed_audio(x[:2 * RATE], RATE)[0]
    np.testing.assert_allclose(events[0].embedding, first, atol=atol, rtol=0)


def test_reuse_frames_keeps_the_offline_windows(causal_bundles):
    from clapedge.runtime import Runtime

    _, bundles = causal_bundles
    rt = Runtime(bundles["fp32"], threads=1)
    x = signal(4.0, seed=1)
    s, events = stream(rt, x, reuse="frames")
    assert not s.plan.step and s.step is None
    for e in events:
        a, b = int(round(e.start_s * RATE)), int(round(e.end_s * RATE))
        assert e.embedding.tobytes() == rt.embed_audio(x[a:b], RATE)[0].tobytes()


def test_a_tampered_or_inconsistent_step_is_refused(causal_bundles, tmp_path):
    import shutil

    from clapedge.errors import BundleError
    from clapedge.runtime import Runtime
    from clapedge.runtime.manifest import Manifest

    _, bundles = causal_bundles
    root = tmp_path / "b"
    shutil.copytree(bundles["fp32"], root)
    data = json.loads((root / "manifest.json").read_text())
    bad = json.loads(json.dumps(data))
    bad["stream"]["step"]["outputs"] = bad["stream"]["step"]["outputs"][:-1]
    with pytest.raises(BundleError, match="stream.step.outputs"):
        Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    del bad["stream"]["causal_context"]
    with pytest.raises(BundleError, match="causal_context"):
        Manifest.from_dict(bad)
    with open(root / "audio_step.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="audio_step.onnx"):
        stream(Runtime(root, threads=1), signal(3.0))


def test_set_causal_context_switches_config_and_module_together():
    torch.manual_seed(0)
    model = ClapModel.from_config(build_preset("default", tiny=True)).eval()
    x = wave(2, 6)
    before = model.encode_audio(x).embedding
    model.set_causal_context(10)
    assert model.config.audio.causal_context == model.audio_branch.causal_context == 10
    assert not torch.allclose(model.encode_audio(x).embedding, before, atol=1e-4)
    model.set_causal_context(None)
    torch.testing.assert_close(model.encode_audio(x).embedding, before)
    with pytest.raises(ConfigError, match="causal_context"):
        model.set_causal_context(0)
    assert model.audio_branch.causal_context is None  # refused: nothing changed


def test_the_step_runs_on_one_thread(causal_bundles):
    from clapedge.runtime import Runtime

    _, bundles = causal_bundles
    rt = Runtime(bundles["int8"], threads=2)
    assert rt.bundle.threads_for("audio_step") == 1
    assert rt.bundle.threads_for("audio") == 2
