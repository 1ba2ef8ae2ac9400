"""clap-export: parity, INT8 structure and quality, tagger, bundle atomicity, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from clapedge.export.cli import main as export_cli
from clapedge.export.errors import ExportError, ParityError
from clapedge.export.pipeline import ExportOptions, export_bundle
from clapedge.export.quantize import QuantConfig, plan_quantization
from clapedge.export.rewrite import gather_frames
from clapedge.export.tensorrt import check_tensorrt_qdq
from clapedge.models import ClapModel
from clapedge.runtime import Runtime


def _op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def fp32_bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "fp32"
    report = export_bundle(tiny_model_dir("gemo-clap"), out, ExportOptions(precision="fp32"))
    return out, report


@pytest.fixture(scope="module")
def int8_bundle(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "int8"
    report = export_bundle(tiny_model_dir("default"), out, ExportOptions(
        precision="int8", calib=tiny_corpus, calib_clips=2, calib_lengths=(1.0, 3.0), min_k=16,
        max_drop=None))
    return out, report


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_fp32_bundle_matches_pytorch(fp32_bundle, tiny_model_dir):
    out, report = fp32_bundle
    assert report.parity["audio"]["min_cosine"] >= 0.9999
    assert report.parity["text"]["min_cosine"] >= 0.9999
    model = ClapModel.from_dir(tiny_model_dir("gemo-clap"))
    rt = Runtime(out)
    wave = _clip(1.3, 0)
    with torch.no_grad():
        ref = model.embed_audio(torch.from_numpy(wave)[None]).numpy()[0]
    got = rt.embed_audio((wave, 16000))[0]
    assert float(ref @ got) > 0.9999
    # The gender head of GEmo-CLAP is an extra output named in the manifest.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["towers"]["audio"]["heads"] == {"gender": ["female", "male"]}
    assert "head_gender" in {o.name for o in onnx.load(str(out / "audio.onnx")).graph.output}


def test_onnx_files_describe_themselves(fp32_bundle):
    out, _ = fp32_bundle
    meta = {p.key: p.value for p in onnx.load(str(out / "audio.onnx")).metadata_props}
    assert meta["sample_rate"] == "16000" and meta["normalized"] == "l2"
    assert meta["pooling"] in ("masked_mean", "mean", "first", "attention")


def test_conv_front_end_is_gemm(fp32_bundle):
    ops = _op_counts(fp32_bundle[0] / "audio.onnx")
    # Only the grouped positional conv stays a Conv: the 7 strided convs became MatMuls.
    assert ops.get("Conv", 0) == 1


def test_int8_structure_and_quality(int8_bundle):
    out, report = int8_bundle
    ops = _op_counts(out / "audio.onnx")
    q = report.quantization["audio"]
    # CPU default: the conv front end GEMMs (K >= min_k) are per-frame dynamic u8 x s8
    # MatMulInteger, the other weight GEMMs per-tensor dynamic (DynamicQuantizeMatMul), all
    # with GPTQ-rounded weights; no static QDQ, so no calibrated activation range can
    # collapse on longer or quieter audio.
    # (the six conv GEMMs and the per-frame feature projection after them)
    assert q["rowwise_dynamic_nodes"] == 7 and q["static_qdq_nodes"] == 0
    assert q["per_tensor_dynamic_nodes"] > 6
    assert ops.get("MatMulInteger", 0) == 7
    assert ops.get("DynamicQuantizeMatMul", 0) == q["per_tensor_dynamic_nodes"]
    assert ops.get("DequantizeLinear", 0) == 0
    assert "GPTQ" in q["weights"] and q["gemm"] == "dynamic"
    assert any("activation x activation" in k for k in q["kept_float"])  # attention stays float
    # Index arithmetic and softmax stay float: none of them reads a quantized tensor.
    model = onnx.load(str(out / "audio.onnx"))
    int_outputs = {n.output[0] for n in model.graph.node if n.op_type in ("QuantizeLinear", "MatMulInteger")}
    for node in model.graph.node:
        if node.op_type in ("Softmax", "Log", "Gather", "Range", "Floor", "Less"):
            assert not set(node.input) & int_outputs, node.name
    # A random tiny tower maps every input near one direction, so its centred cosine is a
    # harsh measure; real accuracy is checked on the trained default model (test_default_e2e).
    for length, cos in report.quality["audio_centred_cosine"].items():
        assert cos > 0.6, (length, cos)
    assert report.quality["text_cosine"] > 0.99
    text_ops = _op_counts(out / "text.onnx")
    assert text_ops.get("DynamicQuantizeMatMul", 0) + text_ops.get("MatMulInteger", 0) > 0


def test_int8_bundle_runs_and_tagger_agrees(int8_bundle, monkeypatch):
    out, _ = int8_bundle
    monkeypatch.setenv("CLAPEDGE_NATIVE_FRONTEND", "0")  # audio.onnx, the tagger's own graph
    rt = Runtime(out)
    manifest = json.loads((out / "manifest.json").read_text())
    bank = manifest["towers"]["tagger"]["bank"]
    k = manifest["towers"]["tagger"]["k"]
    wave = _clip(2.0, 1)
    emb = rt.embed_audio((wave, 16000))[0]
    matrix = np.load(out / manifest["banks"][bank]["file"])
    expected = np.argsort(-(matrix @ emb), kind="stable")[:k]
    import onnxruntime as ort

    tagger = ort.InferenceSession(str(out / "tagger.onnx"), providers=["CPUExecutionProvider"])
    scores, indices = tagger.run(["scores", "indices"], {
        "waveform": wave[None], "attention_mask": np.ones((1, len(wave)), np.int64)})
    assert indices[0].tolist() == expected.tolist()
    np.testing.assert_allclose(scores[0], (matrix @ emb)[expected], atol=1e-4)
    assert json.loads((out / "export_report.json").read_text())["precision"] == "int8"


def test_int8_bundle_carries_and_runs_the_native_front_end(int8_bundle, monkeypatch, caplog):
    """INT8 + split: the exporter writes the native front end after checking it against fp32
    and audio.onnx; the runtime runs it + audio_encoder.onnx on AVX-512 VNNI / AMX CPUs and
    says so, falls back to audio.onnx when told to, and refuses a tampered file."""
    import logging

    from clapedge.errors import BundleError
    from clapedge.kernels import frontend, simd
    from clapedge.runtime.manifest import read_manifest

    out, report = int8_bundle
    m = read_manifest(out)
    assert m.format_version == "1.5" and m.native_frontend is not None
    assert m.native_frontend.size == (out / m.native_frontend.file).stat().st_size
    q = report.quality["native_frontend"]
    for length, cos in q["centred_cosine"].items():
        assert cos >= q["audio_onnx_centred_cosine"][length] - 0.002
    assert m.native_frontend.quality == q
    wave = _clip(2.0, 3)
    monkeypatch.setenv("CLAPEDGE_NATIVE_FRONTEND", "0")
    graph = Runtime(out).embed_audio((wave, 16000))[0]
    monkeypatch.delenv("CLAPEDGE_NATIVE_FRONTEND")
    with caplog.at_level(logging.INFO, logger="clapedge.runtime"):
        rt = Runtime(out)
    native = rt.embed_audio((wave, 16000))[0]
    assert float(native @ graph) > 0.999
    if simd.simd_level() in frontend.FAST_LEVELS:
        assert "native front end" in rt.bundle.tower("audio").providers[0]
        assert rt.bundle.native_problem() is None
        # tag() then skips tagger.onnx (whose front end is the ONNX one) for the kernel
        bank = m.towers.tagger.bank
        tags = rt.tag((wave, 16000), bank, k=2)
        scores = np.load(out / m.banks[bank].file) @ native
        assert [t.index for t in tags] == np.argsort(-scores, kind="stable")[:2].tolist()
    else:
        assert "SIMD level" in rt.bundle.native_problem()
    # clap-bench reports the tower it ran
    from clapedge.runtime.benchmark import run_benchmark

    report = run_benchmark(out, threads=2, clip_s=1.0, runs=2, warmup=1, batch_size=2,
                           stream_s=3.0)
    assert report.threads == 2 and report.providers == rt.bundle.tower("audio").providers
    # the native file is checksummed like every bundle file
    tampered = out.parent / "tampered"
    import shutil
    shutil.copytree(out, tampered)
    path = tampered / m.native_frontend.file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    if simd.simd_level() in frontend.FAST_LEVELS:
        with pytest.raises(BundleError, match="checksum"):
            Runtime(tampered)


def test_native_front_end_is_refused_when_worse_or_unsupported(int8_bundle, tiny_model_dir,
                                                              monkeypatch):
    """The exporter writes the native front end only when the kernel covers the tower and
    it is as close to fp32 as audio.onnx (within TOLERANCE); otherwise a typed reason."""
    import torch

    from clapedge.export import native_frontend as nfe
    from clapedge.models import ClapModel

    out, _ = int8_bundle
    model = ClapModel.from_dir(tiny_model_dir("default")).eval()
    front = nfe.build(model, out / "audio_frontend.onnx")
    signals = [_clip(1.5, 7), _clip(1.2, 8)]
    args = (out / "audio_frontend.onnx", out / "audio_encoder.onnx", out / "audio.onnx",
            out / "audio.onnx", signals, (1.0,), 16000)
    record = nfe.check(front, *args)
    assert record["frames_max_rel_error"] < 0.1
    monkeypatch.setattr(nfe, "TOLERANCE", -1.0)  # demand more than cosine can give
    with pytest.raises(ExportError, match="not used"):
        nfe.check(front, *args)
    layer = model.audio_branch.base.feature_extractor.conv_layers[1]
    layer.activation = torch.nn.GELU(approximate="tanh")
    with pytest.raises(nfe.NativeUnsupported, match="layer 1: activation is not exact GELU"):
        nfe.build(model)


def test_bundles_carry_the_streaming_split(int8_bundle, fp32_bundle):
    """The LayerNorm front end (default preset, INT8) splits exactly and a stream over it
    gives the offline windows bit for bit; the GroupNorm one (gemo-clap) is split but marked
    inexact, so streams encode full windows (tests/test_stream_split.py has the rest)."""
    from clapedge.runtime.audio import frame_windows
    from clapedge.runtime.manifest import read_manifest

    out, report = int8_bundle
    m = read_manifest(out)
    assert m.stream.exact and m.stream.max_abs_error == 0.0 and report.stream["frames_local"]
    assert (m.stream.frame_stride, m.stream.receptive_field) == (320, 400)
    assert m.stream.frontend.precision == "int8" and m.stream.frontend.size > 0
    rt = Runtime(out, threads=2)
    x = np.concatenate([_clip(1.7, 5), np.zeros(3000, np.float32), _clip(2.0, 6)])
    s = rt.create_stream(window_s=2.0, hop_s=0.5, banks=[])
    for start in range(0, len(x), 3001):
        s.accept_waveform(16000, x[start:start + 3001])
        while rt.is_ready(s):
            rt.decode(s)
    s.input_finished()
    while rt.is_ready(s):
        rt.decode(s)
    events, spans = s.results(), frame_windows(len(x), 32000, 8000)
    assert s.frames.reused > 0 and len(events) == len(spans)
    for event, (a, b) in zip(events, spans):
        assert event.embedding.tobytes() == rt.embed_audio((x[a:b], 16000))[0].tobytes()
    m = read_manifest(fp32_bundle[0])
    assert m.stream is not None and not m.stream.exact
    assert "head_gender" in {o.name for o in m.stream.encoder.outputs}
    assert Runtime(fp32_bundle[0]).create_stream().plan is None


def test_plan_on_a_generated_graph():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((128, 64), np.float32), "w")
    small = numpy_helper.from_array(np.ones((8, 64), np.float32), "small")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="weight_mm"),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "ht"], ["scores"], name="attention_mm"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax"),
        helper.make_node("Reshape", ["x8", "shape"], ["x8r"], name="reshape"),
        helper.make_node("MatMul", ["x8r", "small"], ["y"], name="small_mm"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128]),
                     helper.make_tensor_value_info("x8", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [4, 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [w, small, numpy_helper.from_array(np.array([4, 8], np.int64), "shape")])
    plan = plan_quantization(helper.make_model(graph), QuantConfig(gemm="static"))
    assert plan.quantize == ["weight_mm"]
    assert "activation x activation" in plan.float_reasons["attention_mm"]
    assert "K < 64" in plan.float_reasons["small_mm"]
    assert "reshape" not in plan.quantize  # feeds a float GEMM only
    plan16 = plan_quantization(helper.make_model(graph), QuantConfig(min_k=8, gemm="static"))
    assert plan16.quantize == ["weight_mm", "reshape", "small_mm"]


@settings(max_examples=25, deadline=None)
@given(kernel=st.integers(1, 10), stride=st.integers(1, 6), length=st.integers(12, 80),
       channels=st.integers(1, 5))
def test_gather_frames_equals_conv(kernel, stride, length, channels):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(channels, 3, kernel, stride=stride, bias=False)
    x = torch.randn(2, channels, length)
    if length < kernel:
        return
    weight = conv.weight.detach().permute(2, 1, 0).reshape(-1, 3)
    got = gather_frames(x.transpose(1, 2), kernel, stride) @ weight
    np.testing.assert_allclose(got.transpose(1, 2).detach().numpy(), conv(x).detach().numpy(),
                               atol=1e-5)


def test_tensorrt_form_checked_statically(tiny_model_dir, tiny_corpus, tmp_path, int8_bundle):
    cpu = check_tensorrt_qdq(onnx.load(str(int8_bundle[0] / "audio.onnx")))
    assert not cpu.ok and any("MatMulInteger" in p for p in cpu.problems)  # CPU form
    out = tmp_path / "trt"
    export_bundle(tiny_model_dir("default"), out, ExportOptions(
        precision="int8", calib=tiny_corpus, calib_clips=1, calib_lengths=(1.0,), min_k=16,
        target="tensorrt", max_drop=None, banks="none", front_end="static"))
    trt = check_tensorrt_qdq(onnx.load(str(out / "audio.onnx")))
    assert trt.quantize_nodes > 0
    assert [p for p in trt.problems if "zero point" in p or "axis" in p] == []


@pytest.mark.skipif(os.environ.get("CLAPEDGE_TEST_GPU") is None,
                    reason="TensorRT engine build needs TensorRT and an NVIDIA GPU (none here)")
def test_tensorrt_engine_build(int8_bundle):
    from clapedge.export.tensorrt import build_engines

    build_engines(int8_bundle[0])
    assert (int8_bundle[0] / "audio.plan").is_file()


def test_no_tagger_no_stream_split_gives_one_copy_of_the_audio_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "lean"
    r = CliRunner().invoke(export_cli, [str(tiny_model_dir("default")), "-o", str(out),
                                        "--no-tagger", "--no-stream-split"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.onnx")) == ["audio.onnx", "text.onnx"]
    rt = Runtime(out, threads=1)
    assert rt.manifest.towers.tagger is None and rt.manifest.stream is None
    tags = rt.tag(np.sin(np.arange(16000) / 9.0).astype(np.float32) * 0.3, k=2, sample_rate=16000)
    assert len(tags) == 2 and tags[0].score >= tags[1].score


def test_cli_can_leave_out_the_native_front_end(tiny_model_dir, tmp_path, monkeypatch):
    import clapedge.export.pipeline as pipeline
    from clapedge.errors import ClapEdgeError

    seen = []

    def capture(model_dir, out, options, progress=None):
        seen.append(options)
        raise ClapEdgeError("stop here")

    monkeypatch.setattr(pipeline, "export_bundle", capture)
    for flags, expected in (([], True), (["--no-native-frontend"], False)):
        r = CliRunner().invoke(export_cli, [str(tiny_model_dir("default")), "-o",
                                            str(tmp_path / "x"), *flags])
        assert r.exit_code == 1 and "stop here" in r.output
        assert seen[-1].native_frontend is expected


def test_refuses_existing_output_and_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(export_cli, [str(tiny_model_dir("default")), "-o", str(out)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_inputs_give_clear_errors(tiny_model_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(export_cli, [str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not a model directory" in r.output
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    src = tiny_model_dir("default")
    for f in src.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    r = runner.invoke(export_cli, [str(corrupt), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "model.safetensors" in r.output
    r = runner.invoke(export_cli, [str(src), "-o", str(tmp_path / "o"), "--int8"])
    assert r.exit_code == 1 and "--calib" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.wav").write_bytes(b"RIFF1234WAVEjunk")
    r = runner.invoke(export_cli, [str(src), "-o", str(tmp_path / "o"), "--int8", "--calib", str(empty)])
    assert r.exit_code == 1 and "could be read" in r.output
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.partial")]


def test_parity_failure_is_typed_and_atomic(tiny_model_dir, tmp_path, monkeypatch):
    import clapedge.export.pipeline as pipeline

    def broken(reference, candidate, cases, *, what, min_cosine=0.9999):
        raise ParityError(f"the exported {what} disagrees with PyTorch: 1x1.0s embedding",
                          {"1x1.0s embedding": {"cosine": 0.5, "max_abs_error": 1.0}})

    monkeypatch.setattr(pipeline, "check_parity", broken)
    with pytest.raises(ParityError, match="disagrees") as info:
        export_bundle(tiny_model_dir("default"), tmp_path / "o", ExportOptions(precision="fp32"))
    assert info.value.differences["1x1.0s embedding"]["cosine"] == 0.5
    assert list(tmp_path.iterdir()) == []


def test_force_replaces(fp32_bundle, tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(fp32_bundle[0], out)
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(tiny_model_dir("gemo-clap"), out, ExportOptions(precision="fp32"))
    export_bundle(tiny_model_dir("gemo-clap"), out, ExportOptions(precision="fp16", force=True,
                                                                   banks="none"))
    assert json.loads((out / "manifest.json").read_text())["towers"]["audio"]["precision"] == "fp16"
    assert Runtime(out).embed_audio((_clip(1.0, 3), 16000)).shape[0] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # nothing left aside


def _export_with_stubbed_metrics(metrics, tiny_model_dir, tiny_corpus, out, monkeypatch):
    """An INT8 export of the tiny default model whose accuracy search sees ``metrics(name)``
    (an untrained tiny model's real task metrics are noise)."""
    import clapedge.export.pipeline as pipeline

    monkeypatch.setattr(pipeline._Exporter, "task_metrics",
                        lambda self, model, audio, text, banks, work, name: metrics(name))
    return export_bundle(tiny_model_dir("default"), out, ExportOptions(
        precision="int8", calib=tiny_corpus, calib_clips=1, calib_lengths=(1.0,), min_k=16,
        max_drop=0.005, banks="none"))


def test_accuracy_search_keeps_sensitive_nodes_float(tiny_model_dir, tiny_corpus, tmp_path,
                                                     monkeypatch):
    """The search doubles the float set until the budget holds, and reports what it kept."""
    def fake_metrics(name):
        kept = 0 if name == "fp32" else int(name.split("-")[1])
        return {"uar/sex": 0.9 if name == "fp32" or kept >= 2 else 0.8}

    report = _export_with_stubbed_metrics(fake_metrics, tiny_model_dir, tiny_corpus,
                                          tmp_path / "b", monkeypatch)
    search = report.quantization["accuracy_search"]
    # First the same audio with the float text tower (no better here: the text stays INT8),
    # then the audio nodes.
    assert [(a["audio_nodes_kept_float"], a["text_float"]) for a in search["attempts"]] == [
        (0, False), (0, True), (1, False), (2, False)]
    assert len(search["kept_float"]) == 2
    text = report.quantization["text"]
    assert text["mode"].endswith("after SmoothQuant") and text["calibration_prompts"] > 10
    assert text["smooth_alpha"] in (None, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert report.quantization["audio"]["kept_float"]["kept float by the accuracy search"] == 2
    model = onnx.load(str(tmp_path / "b" / "audio.onnx"))
    weights = {t.name for t in model.graph.initializer}
    kept = [n for n in model.graph.node if n.name in search["kept_float"]]
    assert len(kept) == 2
    for node in kept:  # the GEMM runs on its float weight, not a dequantized int8 one
        assert node.input[1] in weights


def test_accuracy_search_finds_a_text_tower_loss_first(tiny_model_dir, tiny_corpus, tmp_path,
                                                       monkeypatch):
    """A loss that only the float text tower removes (retrieval reads both towers) ends the
    search at once with the text tower float and every audio node INT8."""
    def fake_metrics(name):
        text_float = name == "fp32" or name.endswith("-1")
        return {"t2a/P@10": 0.5 if text_float else 0.49}

    report = _export_with_stubbed_metrics(fake_metrics, tiny_model_dir, tiny_corpus,
                                          tmp_path / "b", monkeypatch)
    search = report.quantization["accuracy_search"]
    assert [(a["audio_nodes_kept_float"], a["text_float"]) for a in search["attempts"]] == [
        (0, False), (0, True)]
    assert search["kept_float"] == []
    assert report.quantization["text"]["mode"] == "kept fp32 by the accuracy search"
    assert report.quality["task_drop"]["t2a/P@10"] == 0.0


def test_clap_eval_scores_a_bundle_against_its_stored_banks(int8_bundle, tiny_corpus, monkeypatch):
    # tag() classifies against the banks the exporter encoded with the fp32 PyTorch text
    # tower; clap-eval must score that, not banks re-encoded by an INT8 text tower.
    from clapedge.calib import evaluate as ev
    from clapedge.train.attributes import ATTRIBUTES, label_prompts

    embedder = ev.open_embedder(int8_bundle[0])
    rt = embedder.runtime
    prompts = label_prompts("sex")
    np.testing.assert_array_equal(ev.stored_bank(embedder, "sex", prompts), rt.bundle.bank("sex"))
    changed = {label: list(p) + ["Really."] for label, p in prompts.items()}
    assert ev.stored_bank(embedder, "sex", changed) is None  # other prompts: not that bank
    assert ev.stored_bank(embedder, "no-such-bank", prompts) is None

    def text_banks_are_not_used(*args):
        raise AssertionError("a stored bank was re-encoded with the text tower")

    monkeypatch.setattr(ev, "label_bank", text_banks_are_not_used)
    report = ev.evaluate(embedder, tiny_corpus, split="test")
    assert set(report.classification) <= set(ATTRIBUTES) and report.classification
