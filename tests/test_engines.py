"""Prebuilt TensorRT engines: the EP-context model, the manifest record, and the runtime's
decision to use a plan or fall back (runtime/engines.py). No GPU here: the load of a real
plan is not exercised; everything around it is."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from clapedge.errors import BundleError, ConfigError
from clapedge.export.tensorrt import context_model
from clapedge.runtime import engines
from clapedge.runtime import providers as prov
from clapedge.runtime.bundle import Bundle
from clapedge.runtime.manifest import (EngineSpec, Manifest, ShapeRange, read_manifest,
                                       sha256_file, write_manifest)

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import build_bundle, tone  # noqa: E402

TRT, GPU = "10.3.0", "NVIDIA H100 80GB HBM3"


def _profile(lo: int = 8000, hi: int = 160000):
    r = ShapeRange((1, lo), (1, 32000), (1, hi))
    return ({"waveform": r, "attention_mask": r},)


@pytest.fixture()
def engine_bundle(tmp_path):
    """A tiny bundle with an audio engine record: a stand-in plan file (no GPU to build a
    real one) and the real EP-context model the exporter writes beside a plan."""
    root, model = build_bundle(tmp_path / "b")
    (root / "audio.plan").write_bytes(b"not a real TensorRT engine")
    ctx = context_model(onnx.load(str(root / "audio.onnx")), "audio.plan", trt_version=TRT,
                        compute_capability="90")
    onnx.save_model(ctx, str(root / "audio_ctx.onnx"))
    m = read_manifest(root)
    m.engines = (EngineSpec(file="audio.plan", sha256=sha256_file(root / "audio.plan"),
                            tower="audio", trt_version=TRT, gpu=GPU, profiles=_profile(),
                            precision="fp32", context="audio_ctx.onnx",
                            context_sha256=sha256_file(root / "audio_ctx.onnx")),)
    write_manifest(root, m.with_sizes(root))
    return root


def test_context_model_wraps_the_plan_with_the_towers_io(engine_bundle):
    tower = onnx.load(str(engine_bundle / "audio.onnx"))
    ctx = onnx.load(str(engine_bundle / "audio_ctx.onnx"))
    (node,) = ctx.graph.node
    assert (node.op_type, node.domain) == ("EPContext", "com.microsoft")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["ep_cache_context"] == b"audio.plan" and attrs["embed_mode"] == 0
    assert attrs["main_context"] == 1 and attrs["hardware_architecture"] == b"90"
    assert [v.name for v in ctx.graph.input] == [v.name for v in tower.graph.input]
    assert [v.name for v in ctx.graph.output] == [v.name for v in tower.graph.output]
    assert list(node.input) == [v.name for v in tower.graph.input]
    assert {p.key for p in ctx.metadata_props} == {p.key for p in tower.metadata_props}
    assert ctx.graph.initializer == [] and len(ctx.SerializeToString()) < 4096


def test_manifest_records_the_context_and_checks_it(engine_bundle):
    m = read_manifest(engine_bundle)
    (e,) = m.engines
    assert e.context == "audio_ctx.onnx"
    assert e.context_size == (engine_bundle / "audio_ctx.onnx").stat().st_size
    assert ("audio_ctx.onnx", e.context_sha256) in m.files()
    again = Manifest.from_json(m.to_json())
    assert again.engines == m.engines
    with pytest.raises(ConfigError, match="context"):
        dataclasses.replace(e, context_sha256=None)
    with pytest.raises(ConfigError, match="context"):
        dataclasses.replace(e, context="../outside.onnx")
    data = json.loads(m.to_json())
    data["engines"][0]["contxt"] = "audio_ctx.onnx"  # a typo is an error...
    with pytest.raises(BundleError, match="unknown keys"):
        Manifest.from_dict(data)
    data["format_version"] = "1.9"  # ...unless a newer minor may have added the key
    assert Manifest.from_dict(data).engines[0].context == "audio_ctx.onnx"


@pytest.mark.parametrize("trt,gpu,profile,why", [
    (None, GPU, _profile(), "TensorRT version here is unknown"),
    ("8.6.1", GPU, _profile(), "built with TensorRT 10.3.0, this process has 8.6.1"),
    (TRT, None, _profile(), "cannot name the GPU"),
    (TRT, "Orin", _profile(), "built on NVIDIA H100 80GB HBM3, this machine has Orin"),
    (TRT, GPU, _profile(16000, 160000), "covers 16000..160000 samples"),
    (TRT, GPU, _profile(8000, 40000), "covers 8000..40000 samples, the bundle's clip policy feeds 8000..48000"),
    (TRT, GPU, _profile(), None),
])
def test_plan_problem(engine_bundle, trt, gpu, profile, why):
    m = read_manifest(engine_bundle)
    engine = dataclasses.replace(m.engines[0], profiles=profile)
    got = engines.plan_problem(engine, m, trt_version=trt, gpu=gpu)
    assert got is None if why is None else why in got


def _pretend_tensorrt(monkeypatch, trt=TRT, gpu=GPU):
    monkeypatch.setattr(prov, "available_providers",
                        lambda: [prov.TENSORRT, prov.CUDA, prov.CPU])
    monkeypatch.setattr(engines, "tensorrt_version", lambda: trt)
    monkeypatch.setattr(engines, "gpu_name", lambda: gpu)


def test_runtime_falls_back_when_the_plan_does_not_fit(engine_bundle, monkeypatch, caplog):
    _pretend_tensorrt(monkeypatch, gpu="Orin")
    plain = Bundle.load(engine_bundle, providers="cpu", threads=1).tower("audio")
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        b = Bundle.load(engine_bundle, threads=1)
    audio = b.tower("audio")
    assert audio.path.name == "audio.onnx"
    assert "not using the prebuilt engine audio.plan: built on NVIDIA H100 80GB HBM3, " \
           "this machine has Orin" in caplog.text
    x = tone(1.0)[None]
    feeds = {"waveform": x, "attention_mask": np.ones(x.shape, np.int64)}
    np.testing.assert_array_equal(audio.run(feeds, ["embedding"])["embedding"],
                                  plain.run(feeds, ["embedding"])["embedding"])


def test_runtime_falls_back_when_the_ep_refuses_the_plan(engine_bundle, monkeypatch, caplog):
    # Everything matches, so the runtime hands the context model to ONNX Runtime; this
    # onnxruntime has no TensorRT EP, so the EPContext node cannot run and the session
    # fails: the runtime must say so and run audio.onnx.
    _pretend_tensorrt(monkeypatch)
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        b = Bundle.load(engine_bundle, threads=1)
    assert b.tower("audio").path.name == "audio.onnx"
    assert "not using the prebuilt engine audio.plan: the TensorRT EP refused it" in caplog.text


def test_a_tampered_plan_is_a_checksum_error_not_a_fallback(engine_bundle, monkeypatch):
    _pretend_tensorrt(monkeypatch)
    (engine_bundle / "audio.plan").write_bytes(b"not a real TensorRT engine!")
    with pytest.raises(BundleError, match="audio.plan"):
        Bundle.load(engine_bundle, threads=1)


def test_engines_are_ignored_without_the_tensorrt_ep(engine_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        b = Bundle.load(engine_bundle, providers="cpu", threads=1)
    assert b.tower("audio").path.name == "audio.onnx"
    assert "prebuilt engine" not in caplog.text
