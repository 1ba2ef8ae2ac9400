"""The INT8 forms of export/quantize.py at the numpy level: GPTQ weight rounding, the
per-row and per-tensor dynamic GEMM rewrites (MatMul and Gemm), and the static plan."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from clapedge.export.gptq import collect_hessians, gptq_int8, gptq_weights
from clapedge.export.quantize import QuantConfig, plan_quantization
from clapedge.export.rewrite import folded_group_norm_gemm, gather_frames, masked_group_norm_last
from clapedge.export.rowwise import _weight_int8, rowwise_int8
from clapedge.errors import ConfigError


def _correlated(rows: int, k: int, seed: int) -> np.ndarray:
    """Activations like a network's: a few strong shared directions plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, k))
    return (rng.standard_normal((rows, 8)) @ basis * 2 + 0.3 * rng.standard_normal((rows, k))).astype(np.float32)


def test_gptq_reduces_output_error_on_held_out_inputs():
    k, n = 96, 48
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    calib, held = _correlated(2000, k, 1), _correlated(500, k, 1)[::-1].copy()
    nearest, scale = _weight_int8(weight)
    q = gptq_int8(weight, calib.T @ calib / len(calib), scale)
    assert q.dtype == np.int8 and q.shape == (k, n) and np.abs(q.astype(int)).max() <= 127
    ref = held @ weight
    err_nearest = np.linalg.norm(held @ (nearest * scale) - ref)
    err_gptq = np.linalg.norm(held @ (q * scale) - ref)
    assert err_gptq < 0.7 * err_nearest, (err_gptq, err_nearest)
    assert (q == gptq_int8(weight, calib.T @ calib / len(calib), scale)).all()  # deterministic


def test_gptq_with_dead_inputs_and_singular_hessian():
    weight = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    hessian = np.zeros((16, 16), np.float32)
    hessian[:4, :4] = np.eye(4)  # inputs 4.. never active
    _, scale = _weight_int8(weight)
    q = gptq_int8(weight, hessian, scale)
    assert (q[4:] == 0).all()  # unused inputs: any value is exact; zero is the choice
    nearest = np.clip(np.round(weight[:4] / scale), -127, 127)
    assert np.abs(q[:4] - nearest).max() <= 1


def _gemm_model(op: str, k: int = 64, n: int = 32) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    if op == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="g")]
        inits = [numpy_helper.from_array(weight, "w")]
    else:  # Gemm with transB, as torch exports nn.Linear
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g", transB=1)]
        inits = [numpy_helper.from_array(weight.T.copy(), "w"), numpy_helper.from_array(bias, "b")]
        weight = weight  # y = x @ weight + bias
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])  # as exported
    model.ir_version = 9
    return model, weight, (bias if op == "Gemm" else np.zeros(n, np.float32))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_dynamic_gemm_rewrite_matches_float(op, per_tensor):
    model, weight, bias = _gemm_model(op)
    x = np.random.default_rng(4).standard_normal((20, 64)).astype(np.float32)
    x[:10] *= 1e-3  # quiet rows: per-row scales keep them, one tensor scale does not
    assert rowwise_int8(model, ["g"], per_tensor=per_tensor) == ["g"]
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert ("DynamicQuantizeMatMul" in ops) if per_tensor else ("MatMulInteger" in ops)
    got = _run(model, x)
    ref = x @ weight + bias
    loud = np.linalg.norm(got[10:] - ref[10:]) / np.linalg.norm(ref[10:])
    quiet = np.linalg.norm((got - bias)[:10] - (ref - bias)[:10]) / np.linalg.norm((ref - bias)[:10])
    assert loud < 0.02
    if per_tensor:
        assert quiet > 0.05  # the documented weakness of one scale per tensor
    else:
        assert quiet < 0.02


def test_dynamic_gemm_rewrite_uses_given_weights():
    model, weight, _ = _gemm_model("MatMul")
    q, scale = _weight_int8(weight)
    q = np.zeros_like(q)
    rowwise_int8(model, ["g"], weights={"g": (q, scale)})
    x = np.ones((2, 64), np.float32)
    assert np.abs(_run(model, x)).max() == 0.0


def test_gptq_weights_from_a_model(tmp_path):
    model, weight, _ = _gemm_model("Gemm")
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    feeds = [{"x": _correlated(300, 64, s)} for s in range(3)]
    hess = collect_hessians(path, {"g": "x"}, feeds)
    x = np.concatenate([f["x"] for f in feeds])
    np.testing.assert_allclose(hess["g"], x.T.astype(np.float64) @ x / len(x), rtol=1e-4, atol=1e-4)
    out = gptq_weights(path, ["g"], feeds)
    q, scale = out["g"]
    assert q.shape == weight.shape and scale.shape == (weight.shape[1],)
    np.testing.assert_allclose(scale, _weight_int8(weight)[1])


def test_plan_forms():
    model, _, _ = _gemm_model("MatMul")
    assert plan_quantization(model, QuantConfig()).per_tensor == ["g"]
    assert plan_quantization(model, QuantConfig(gemm="rowwise")).rowwise == ["g"]
    assert plan_quantization(model, QuantConfig(gemm="static")).quantize == ["g"]
    with pytest.raises(ConfigError, match="tensorrt"):
        QuantConfig(target="tensorrt")  # rowwise default is not TensorRT's form
    with pytest.raises(ConfigError, match="rounding"):
        QuantConfig(rounding="stochastic")


@pytest.mark.parametrize("groups,channels,bias", [(32, 32, False), (4, 16, True)])
def test_folded_group_norm_equals_group_norm_of_the_conv(groups, channels, bias):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, channels, affine=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    wave = torch.randn(2, 3000, 1) * 0.3 + 0.05
    frames = gather_frames(wave, 10, 5)
    weight = torch.randn(10, channels)
    b = torch.randn(channels) if bias else None
    mask = torch.ones(2, frames.shape[1], dtype=torch.bool)
    mask[1, 400:] = False  # padded clip: statistics over its valid frames only
    y = frames @ weight + (b if b is not None else 0)
    ref = masked_group_norm_last(y, mask, norm)
    got = folded_group_norm_gemm(frames, mask, weight, b, norm)
    torch.testing.assert_close(got[0], ref[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, :400], ref[1, :400], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_smoothing_is_exact_in_float_and_helps_per_tensor_int8(op):
    # Activations with two outlier channels (like the GELU outputs of a BERT tower): one
    # per-tensor scale then rounds the other channels coarsely; SmoothQuant moves part of
    # their range into the weight rows.
    from clapedge.export.quantize import _gemm_input_amax, smooth_gemm_inputs

    model, weight, _ = _gemm_model(op)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 64)).astype(np.float32)
    x[:, [3, 40]] *= 30.0
    calib, held = x[:120], x[120:]
    ref = _run(model, held)
    amax = _gemm_input_amax(model, ["x"], [{"x": calib}])
    np.testing.assert_allclose(amax["x"], np.abs(calib).max(axis=0), rtol=1e-6)

    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    assert smooth_gemm_inputs(smoothed, ["g"], amax, alpha=0.7) == 1
    assert [n.op_type for n in smoothed.graph.node][0] == "Mul"
    np.testing.assert_allclose(_run(smoothed, held), ref, rtol=1e-4, atol=1e-4)  # exact math

    def int8_error(m):
        q = onnx.ModelProto()
        q.CopyFrom(m)
        rowwise_int8(q, ["g"], per_tensor=True)
        return np.linalg.norm(_run(q, held) - ref) / np.linalg.norm(ref)

    assert int8_error(smoothed) < 0.5 * int8_error(model), (int8_error(smoothed), int8_error(model))


def test_quantize_text_smoothing_needs_prompts(tmp_path):
    from clapedge.export.errors import ExportError
    from clapedge.export.quantize import quantize_text

    model, _, _ = _gemm_model("MatMul")
    onnx.save_model(model, str(tmp_path / "t.onnx"))
    with pytest.raises(ExportError, match="calibration prompts"):
        quantize_text(tmp_path / "t.onnx", tmp_path / "o.onnx", [], form="smooth")
    with pytest.raises(ExportError, match="use smooth, dynamic or rowwise"):
        quantize_text(tmp_path / "t.onnx", tmp_path / "o.onnx", [], form="static")
