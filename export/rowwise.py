"""Per-row dynamic INT8 GEMMs for layers whose rows differ wildly in scale.

In the conv front end, frames of silence and of speech share one GEMM; a per-tensor
activation scale (static or dynamic) rounds the quiet frames to a few levels, and the
LayerNorm that follows each conv blows that rounding up to full-scale noise (measured: a
random-init WavLM front end loses 6% relative error per conv layer, compounding to 17% after
seven). Here every row (frame) gets its own scale at run time, while the GEMM itself is the
same u8 x s8 MatMulInteger (VNNI/AMX) as everywhere else:

    amax[m]  = max(|max_k X[m, k]|, |min_k X[m, k]|)       ReduceMax, ReduceMin: two reads
    Xq       = QuantizeLinear(X, amax / 127, zero point 128, axis 0)    one read, u8 out
    Y        = Cast(MatMulInteger(Xq, Wq, 128)) * (amax / 127)[:, None] * w_scale[None, :]

Weights are per-output-channel symmetric int8. No calibration is needed for these nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _weight_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0
    q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _as_matmul(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, str | None] | None:
    """(weight [K, N], bias initializer name or None) of a MatMul or a plain Gemm with a
    constant weight; None for anything else."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])
    if weight.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return weight, None
    if node.op_type != "Gemm":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    if attrs.get("transB", 0):
        weight = weight.T
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in inits:
        return None
    return np.ascontiguousarray(weight), bias


def rowwise_int8(model: onnx.ModelProto, node_names: list[str], *, per_tensor: bool = False,
                 weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[str]:
    """Rewrites the named weight MatMuls / Gemms in place; returns those rewritten.

    ``per_tensor``: one dynamic scale for the whole activation, through onnxruntime's fused
    DynamicQuantizeMatMul (com.microsoft): fewer passes over the activation, for GEMMs whose
    rows share a scale (the transformer after LayerNorm). Default: a scale per row.
    ``weights``: node -> (int8 [K, N], scale [N]) rounded elsewhere (``gptq.gptq_int8``);
    the rest round to nearest.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted = set(node_names)
    if not wanted:
        return []
    new_nodes: list[onnx.NodeProto] = []
    done = []
    shared = "rowwise_shared"
    graph.initializer.extend(t for t in [
        numpy_helper.from_array(np.array([0], np.int64), f"{shared}_zero"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{shared}_minus1"),
        numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), f"{shared}_inv127"),
        numpy_helper.from_array(np.array(1e-30, np.float32), f"{shared}_eps"),
        numpy_helper.from_array(np.array(128, np.uint8), f"{shared}_zp"),
        numpy_helper.from_array(np.array([1], np.int64), f"{shared}_axis1"),
    ] if t.name not in inits)
    for node in graph.node:
        found = _as_matmul(node, inits) if node.name in wanted else None
        if found is None:
            new_nodes.append(node)
            continue
        weight, bias = found
        p = f"{node.name}_rowwise"
        q, scale = (weights or {}).get(node.name) or _weight_int8(weight.astype(np.float32))
        k, n = weight.shape
        x, y = node.input[0], node.output[0]
        graph.initializer.extend([numpy_helper.from_array(q, f"{p}_wq"),
                                  numpy_helper.from_array(scale, f"{p}_wscale")])
        if per_tensor:
            graph.initializer.append(numpy_helper.from_array(np.zeros(n, np.int8), f"{p}_wzp"))
            new_nodes.append(helper.make_node(
                "DynamicQuantizeMatMul", [x, f"{p}_wq", f"{p}_wscale", f"{p}_wzp"] + ([bias] if bias else []),
                [y], name=f"{p}_dqmm", domain="com.microsoft"))
            done.append(node.name)
            continue
        graph.initializer.extend([
            numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}_shape2d"),
            numpy_helper.from_array(np.array([n], np.int64), f"{p}_n"),
        ])
        y2 = f"{p}_y" if bias else y
        new_nodes += [
            helper.make_node("Shape", [x], [f"{p}_xshape"], name=f"{p}_shape"),
            helper.make_node("Slice", [f"{p}_xshape", f"{shared}_zero", f"{shared}_minus1"],
                             [f"{p}_lead"], name=f"{p}_lead"),
            helper.make_node("Concat", [f"{p}_lead", f"{p}_n"], [f"{p}_yshape"], name=f"{p}_yshape", axis=0),
            helper.make_node("Reshape", [x, f"{p}_shape2d"], [f"{p}_x2"], name=f"{p}_x2"),
            helper.make_node("ReduceMax", [f"{p}_x2", f"{shared}_axis1"], [f"{p}_max"], name=f"{p}_max", keepdims=0),
            helper.make_node("ReduceMin", [f"{p}_x2", f"{shared}_axis1"], [f"{p}_min"], name=f"{p}_min", keepdims=0),
            helper.make_node("Abs", [f"{p}_max"], [f"{p}_amax1"], name=f"{p}_abs1"),
            helper.make_node("Abs", [f"{p}_min"], [f"{p}_amax2"], name=f"{p}_abs2"),
            helper.make_node("Max", [f"{p}_amax1", f"{p}_amax2", f"{shared}_eps"], [f"{p}_amax"], name=f"{p}_amax"),
            helper.make_node("Mul", [f"{p}_amax", f"{shared}_inv127"], [f"{p}_xscale"], name=f"{p}_xscale"),
            helper.make_node("Shape", [f"{p}_xscale"], [f"{p}_rows"], name=f"{p}_rows"),
            helper.make_node("Expand", [f"{shared}_zp", f"{p}_rows"], [f"{p}_zpv"], name=f"{p}_zpv"),
            helper.make_node("QuantizeLinear", [f"{p}_x2", f"{p}_xscale", f"{p}_zpv"], [f"{p}_xq"],
                             name=f"{p}_quantize", axis=0),
            helper.make_node("MatMulInteger", [f"{p}_xq", f"{p}_wq", f"{shared}_zp"], [f"{p}_acc"],
                             name=f"{p}_gemm"),
            helper.make_node("Cast", [f"{p}_acc"], [f"{p}_accf"], name=f"{p}_cast", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{p}_xscale", f"{shared}_axis1"], [f"{p}_xscale2"], name=f"{p}_unsq"),
            helper.make_node("Mul", [f"{p}_accf", f"{p}_xscale2"], [f"{p}_rowscaled"], name=f"{p}_rowmul"),
            helper.make_node("Mul", [f"{p}_rowscaled", f"{p}_wscale"], [f"{p}_y2"], name=f"{p}_colmul"),
            helper.make_node("Reshape", [f"{p}_y2", f"{p}_yshape"], [y2], name=f"{p}_yreshape"),
        ]
        if bias:
            new_nodes.append(helper.make_node("Add", [y2, bias], [y], name=f"{p}_bias"))
        done.append(node.name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if any(n.domain == "com.microsoft" for n in graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for nd in graph.node for i in nd.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return done
