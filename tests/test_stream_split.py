"""export/stream_split.py: the audio tower cut into a per-frame front end and an encoder,
on tiny generated graphs and on bundles exported from tiny models; streams that reuse the
frames give the offline windows bit for bit where the front end is frame-local."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import (FRAME, RATE, audio_graph, build_bundle, stream_all,  # noqa: E402
                              tiny_model, tone)

from clapedge.errors import BundleError  # noqa: E402
from clapedge.export.errors import ExportError  # noqa: E402
from clapedge.export.stream_split import (ENCODER_FILE, FRONTEND_FILE, FrameGeometry,  # noqa: E402
                                          SplitError, add_to_bundle, split_audio_graph)
from clapedge.runtime import Runtime  # noqa: E402
from clapedge.runtime.audio import frame_windows  # noqa: E402
from clapedge.runtime import manifest as mf  # noqa: E402
from clapedge.runtime.manifest import read_manifest  # noqa: E402

TINY = FrameGeometry(FRAME, FRAME)


def assert_offline(rt, x, events, window, hop, banks=("emotion", "sex")):
    spans = frame_windows(len(x), window, hop)
    assert [(e.start_s, e.end_s) for e in events] == [(a / RATE, b / RATE) for a, b in spans]
    for event, (a, b) in zip(events, spans):
        assert event.embedding.tobytes() == rt.embed_audio(x[a:b], RATE)[0].tobytes()
        assert event.tags == rt.tag_all(x[a:b], list(banks), k=2, sample_rate=RATE)


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("split") / "b")
    result = add_to_bundle(root, TINY)
    return root, result


def test_geometry_of_the_wav2vec2_conv_stack():
    g = FrameGeometry.from_convs([10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2])
    assert (g.stride, g.receptive_field) == (320, 400)
    assert g.frames(32000) == 99 and g.frames(399) == 0 and g.span(99) == 31760


def test_tiny_bundle_split_is_exact_and_recorded(split_bundle):
    root, result = split_bundle
    assert result.boundary == "h"  # the Tanh frames; the mask multiply stays in the encoder
    assert result.exact and result.frames_local and result.max_abs_error == 0.0
    assert not result.frontend_mask and result.encoder_mask
    m = read_manifest(root)
    assert m.format_version == mf.FORMAT_VERSION and m.stream.exact
    assert (m.stream.frame_stride, m.stream.receptive_field) == (FRAME, FRAME)
    assert dict(m.files())[FRONTEND_FILE] == m.stream.frontend.sha256
    assert m.stream.encoder.heads == m.towers.audio.heads
    ops = [n.op_type for n in onnx.load(str(root / FRONTEND_FILE)).graph.node]
    assert "ReduceSum" not in ops and "Tanh" in ops  # pooling is on the encoder side
    assert not list(root.glob(".stream-split-*"))


@pytest.mark.parametrize("window_s, hop_s, seconds", [(2.0, 0.5, 5.3), (1.0, 0.25, 3.1),
                                                      (2.0, 2.0, 6.0), (2.0, 0.5, 1.2)])
def test_reusing_stream_gives_the_offline_windows_bit_for_bit(split_bundle, window_s, hop_s,
                                                              seconds, caplog):
    root, _ = split_bundle
    rt = Runtime(root, threads=1)
    x = tone(seconds, seed=3)
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        s, events = stream_all(rt, x, window_s, hop_s)
    assert "reusing front-end frames" in caplog.text
    assert_offline(rt, x, events, int(window_s * RATE), int(hop_s * RATE))
    # Every frame of the windows that start on a frame is computed once, whichever
    # windows share it (the end-aligned last window too, when it starts on a frame).
    window, per_window = int(window_s * RATE), int(window_s * RATE) // FRAME
    needed = set()
    for e in events:
        a, b = round(e.start_s * RATE), round(e.end_s * RATE)
        if b - a == window and a % FRAME == 0:
            needed |= set(range(a // FRAME, a // FRAME + per_window))
    assert s.frames.computed == len(needed)
    if needed:
        assert s.frames.reused > 0 or hop_s == window_s
        assert len(s.frames.rows) == per_window  # the cache holds one window


def test_unaligned_hop_and_old_bundles_encode_full_windows(split_bundle, tmp_path, caplog):
    root, _ = split_bundle
    rt = Runtime(root, threads=1)
    x = tone(3.3, seed=5)
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        s, events = stream_all(rt, x, 1.0, 0.333)
    assert "not a multiple of the frame stride" in caplog.text and s.frames is None
    assert_offline(rt, x, events, RATE, int(0.333 * RATE))
    old, _ = build_bundle(tmp_path / "old")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        s = Runtime(old, threads=1).create_stream()
    assert s.plan is None and "no streaming split" in caplog.text
    assert Runtime(root, threads=1).create_stream(reuse="off").plan is None


def test_tampered_split_file_is_refused(tmp_path):
    root, _ = build_bundle(tmp_path / "b")
    add_to_bundle(root, TINY)
    data = bytearray((root / ENCODER_FILE).read_bytes())
    data[-20] ^= 0xFF
    (root / ENCODER_FILE).write_bytes(bytes(data))
    rt = Runtime(root, threads=1)
    with pytest.raises(BundleError, match="audio_encoder.onnx"):
        rt.create_stream()
    with pytest.raises(ExportError, match="already has a streaming split"):
        add_to_bundle(root, TINY)


def _time_normalised_graph() -> onnx.ModelProto:
    """The tiny tower with its input normalised over time (as waveform standardisation or
    a GroupNorm in the first conv do): every frame depends on the whole input."""
    m = audio_graph(tiny_model(0))
    nodes = list(m.graph.node)
    first = next(i for i, n in enumerate(nodes) if n.op_type == "Reshape"
                 and n.input[0] == "waveform")
    nodes[first] = helper.make_node("Reshape", ["wave_c", "fshape"], ["frames"])
    nodes[first:first] = [
        helper.make_node("ReduceMean", ["waveform"], ["wave_m"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["waveform", "wave_m"], ["wave_c"])]
    graph = helper.make_graph(nodes, "norm", m.graph.input, m.graph.output,
                              m.graph.initializer)
    return helper.make_model(graph, opset_imports=m.opset_import, ir_version=8)


def test_front_end_normalised_over_time_is_split_but_marked_inexact(tmp_path, caplog):
    root, _ = build_bundle(tmp_path / "b")
    onnx.save_model(_time_normalised_graph(), root / "audio.onnx")
    manifest = json.loads((root / "manifest.json").read_text())
    from clapedge.runtime.manifest import sha256_file, write_manifest, Manifest
    manifest["towers"]["audio"]["sha256"] = sha256_file(root / "audio.onnx")
    manifest["towers"]["audio"].pop("size", None)
    write_manifest(root, Manifest.from_dict(manifest))
    result = add_to_bundle(root, TINY)
    assert not result.frames_local and not result.exact and result.boundary == "h"
    rt = Runtime(root, threads=1)
    x = tone(4.0, seed=9) + np.linspace(-0.4, 0.4, 4 * RATE, dtype=np.float32)  # drifting DC
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        s, events = stream_all(rt, x)
    assert s.plan is None and "not frame-local" in caplog.text
    assert_offline(rt, x, events, 2 * RATE, RATE // 2)  # full windows: still exact
    s, approx = stream_all(rt, x, reuse="approx")
    assert s.plan is not None and s.frames.reused > 0
    spans = frame_windows(len(x), 2 * RATE, RATE // 2)
    cos = [float(e.embedding @ rt.embed_audio(x[a:b], RATE)[0])
           for e, (a, b) in zip(approx, spans)]
    assert min(cos) > 0.5 and any(c < 1 - 1e-6 for c in cos)  # close, not identical


def test_without_a_mask_only_the_raw_frames_separate(tmp_path):
    # Without a mask input the tiny tower counts real frames from the frames themselves,
    # so the only tensor every path goes through is the reshaped waveform: a trivial cut,
    # still exact. A wrong frame geometry finds no frame tensor at all.
    path = tmp_path / "audio.onnx"
    onnx.save_model(audio_graph(tiny_model(0), mask=False), path)
    result = split_audio_graph(path, tmp_path / "out", TINY, RATE)
    assert result.boundary == "frames" and result.exact and not result.encoder_mask
    assert [n.op_type for n in onnx.load(str(result.frontend)).graph.node] == ["Reshape"]
    with pytest.raises(SplitError, match="no tensor of shape"):
        split_audio_graph(path, tmp_path / "out2", FrameGeometry(2 * FRAME, 2 * FRAME), RATE)
    with pytest.raises(SplitError, match="fails on probe input"):
        split_audio_graph(path, tmp_path / "out3", FrameGeometry(320, 400), RATE)


def _default_int8() -> Path | None:
    """An INT8 bundle of models/default with a streaming split, if one is here."""
    root = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("CLAPEDGE_DEFAULT_INT8"), "build/bench-stream/default-int8",
                      "build/default-int8", "build/demo/default-int8"):
        path = root / candidate if candidate else None
        if path is not None and (path / "manifest.json").is_file() \
                and read_manifest(path).stream is not None:
            return path
    return None


@pytest.mark.slow
def test_default_model_int8_bundle_streams_bit_identical(request):
    # a bundle made by the benchmarks (CLAPEDGE_DEFAULT_INT8 names another), else one
    # exported here from models/default
    bundle = _default_int8() or request.getfixturevalue("default_int8_bundle")
    assert read_manifest(bundle).stream.exact
    rt = Runtime(bundle, threads=2)
    rng = np.random.default_rng(0)
    x = np.concatenate([tone(2.3, freq=180, seed=1), np.zeros(RATE // 3, np.float32),
                        tone(3.1, freq=240, seed=2)])
    banks = ("sex", "arousal")
    # reuse="frames": front-end reuse without a causal model's step, whose windows see the
    # stream before them (tests/test_causal.py); the offline windows bit for bit
    s, events = stream_all(rt, x, chunks=tuple(int(n) for n in rng.integers(50, 7000, 16)),
                           banks=banks, reuse="frames")
    assert s.plan is not None and not s.plan.step and s.frames.reused > 0
    assert_offline(rt, x, events, 2 * RATE, RATE // 2, banks)


def test_stream_spec_is_validated(split_bundle):
    from clapedge.runtime.manifest import Manifest

    root, _ = split_bundle
    data = json.loads((root / "manifest.json").read_text())
    bad = json.loads(json.dumps(data))
    bad["stream"]["encoder"]["outputs"] = bad["stream"]["encoder"]["outputs"][:1]
    with pytest.raises(BundleError, match="stream.encoder.outputs"):
        Manifest.from_dict(bad, source="x/manifest.json")
    bad = json.loads(json.dumps(data))
    bad["stream"]["frontend"]["outputs"][0]["shape"] = ["batch", "frames", 99]
    with pytest.raises(BundleError, match="channels"):
        Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["stream"]["frame_stride"] = 0
    with pytest.raises(BundleError, match="frame_stride"):
        Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["stream"]["exactly"] = True  # a typo in a 1.2 manifest is an error
    with pytest.raises(BundleError, match=r"stream: unknown keys \['exactly'\]"):
        Manifest.from_dict(bad)
    bad["format_version"] = "1.99"  # a newer minor's keys are ignored
    assert Manifest.from_dict(bad).stream.exact
