"""Determinism: the same input gives bit-identical embeddings across calls, with
``batch_size=1`` and whatever its batch neighbours, and in another process; batch shapes
agree to float rounding. The figures for the default INT8 bundle: python -m
clapedge.bench.determinism (docs/reliability.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _runtime_bundles import build_bundle  # noqa: E402

from clapedge.bench import determinism  # noqa: E402
from clapedge.runtime import Runtime  # noqa: E402

# what ONNX Runtime may change between batch shapes (summation order of a reduction)
BATCH_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root, _ = build_bundle(tmp_path_factory.mktemp("det") / "b", tagger_k=3)
    return root


@pytest.fixture(scope="module")
def rt(bundle):
    return Runtime(bundle)


@pytest.fixture(scope="module")
def signals(rt):
    return determinism.clips(rt.sample_rate)


def test_repeated_calls_are_bit_identical(rt, signals):
    ref_audio, ref_text = determinism.embed_all(rt, signals)
    tags = [rt.tag(x, sample_rate=rt.sample_rate) for x in signals]
    for _ in range(3):
        audio, text = determinism.embed_all(rt, signals)
        assert audio.tobytes() == ref_audio.tobytes()
        assert text.tobytes() == ref_text.tobytes()
        assert [rt.tag(x, sample_rate=rt.sample_rate) for x in signals] == tags


def test_neighbours_do_not_change_a_result(rt, signals):
    """A clip's padding depends on the clip alone and it shares a batch only with clips of
    its padded length: longer and shorter neighbours in the same call change nothing, and
    with ``batch_size=1`` nothing at all."""
    alone, _ = determinism.embed_all(rt, signals)
    src = [(x, rt.sample_rate) for x in signals]
    # batch_size=1: every model input runs alone, whatever the call holds (long clips'
    # windows too, which a default single call batches together)
    one = rt.embed_audio(src, batch_size=1)
    singles = np.stack([rt.embed_audio(x, sample_rate=rt.sample_rate, batch_size=1)[0]
                        for x in signals])
    assert one.tobytes() == singles.tobytes()
    assert np.abs(one.astype(np.float64) - alone).max() <= BATCH_TOLERANCE
    mixed = rt.embed_audio(src[::-1])[::-1]  # other order, default batch size
    diff = np.abs(mixed.astype(np.float64) - alone).max()
    assert diff <= BATCH_TOLERANCE
    # rows whose padded length no other clip shares ran as a batch of one: bit-identical
    lengths = [len(x) for x in signals]
    for i, n in enumerate(lengths):
        if lengths.count(n) == 1 and n <= 3 * rt.sample_rate:
            assert mixed[i].tobytes() == alone[i].tobytes(), i


def test_batch_shapes_agree_to_rounding_and_masking_holds(rt, signals):
    same = signals[len(determinism.LENGTHS):]
    alone = np.stack([rt.embed_audio(x, sample_rate=rt.sample_rate)[0] for x in same])
    for b in (2, 4, 8):
        got = rt.embed_audio([(x, rt.sample_rate) for x in same], batch_size=b)
        assert np.abs(got.astype(np.float64) - alone).max() <= BATCH_TOLERANCE
    # a clip zero-padded with mask 0 and batched with a longer one: the mask hides the
    # padding (the tiny tower pools over frames with real samples)
    a, b = determinism.tower_padding(rt, signals[1], signals[2])
    assert np.abs(a.astype(np.float64) - b).max() <= BATCH_TOLERANCE


def test_another_process_gives_the_same_bits(bundle, rt, signals, tmp_path):
    audio, text = determinism.embed_all(rt, signals)
    a1, t1 = determinism.in_subprocess(bundle, tmp_path / "p1")
    a2, t2 = determinism.in_subprocess(bundle, tmp_path / "p2", threads=1)
    assert a1.tobytes() == audio.tobytes() and t1.tobytes() == text.tobytes()
    assert a2.tobytes() == audio.tobytes() and t2.tobytes() == text.tobytes()


def test_compare_counts_bits():
    c = determinism.Compare("x").add(np.zeros((2, 3), np.float32),
                                     np.array([[0, 0, 0], [0, 0, 1e-7]], np.float32))
    assert (c.rows, c.identical) == (2, 1) and 0 < c.max_abs < 2e-7
    assert "1 / 2" in c.row()


def _dynamic_int8_text_tower(root, tmp_path):
    """Replace the tiny bundle's text tower by one with a MatMul, dynamically quantized as
    clap-export does (one activation scale per tensor, computed at run time)."""
    import dataclasses

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from clapedge.runtime.manifest import read_manifest, sha256_file, write_manifest
    from _runtime_bundles import DIM, WORDS

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((len(WORDS) + 2, 16)).astype(
                 np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((16, DIM)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["z"]),
             helper.make_node("LpNormalization", ["z"], ["embedding"], axis=1, p=2)]
    graph = helper.make_graph(
        nodes, "text", [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "t"])
                        for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", DIM])], inits)
    fp32 = tmp_path / "text32.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=8), fp32)
    quantize_dynamic(str(fp32), str(root / "text.onnx"), op_types_to_quantize=["MatMul"],
                     per_channel=True, weight_type=QuantType.QInt8)
    m = read_manifest(root)
    m.towers.text = dataclasses.replace(m.towers.text, precision="int8",
                                        sha256=sha256_file(root / "text.onnx"))
    write_manifest(root, m)


def test_int8_text_does_not_depend_on_its_batch_neighbours(tmp_path):
    root, _ = build_bundle(tmp_path / "b")
    _dynamic_int8_text_tower(root, tmp_path)
    rt = Runtime(root)
    texts = ["calm voice", "angry shout", "high whisper", "slow male"]  # 2 tokens each
    alone = np.stack([rt.embed_text(t)[0] for t in texts])
    assert rt.embed_text(texts).tobytes() == alone.tobytes()
    assert rt.embed_text(texts[::-1])[::-1].tobytes() == alone.tobytes()
    # the tower itself, batched, gives other numbers: what the runtime avoids
    ids, mask = rt.bundle.tokenizer().pad_batch(rt.bundle.tokenizer().encode(texts))
    batched = rt.bundle.tower("text").run({"input_ids": ids, "attention_mask": mask},
                                          ["embedding"])["embedding"]
    assert batched.tobytes() != alone.tobytes()
