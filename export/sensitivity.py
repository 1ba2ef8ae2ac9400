"""Which quantized nodes hurt most: the relative error each quantized GEMM's output has in
the INT8 graph against the same tensor in the fp32 graph, on real inputs. Ranking by this
local error finds the nodes to keep in float without one full evaluation per node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from clapedge.export.quantize import QuantPlan


def _with_outputs(path: Path, names: list[str], out: Path) -> list[str]:
    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    added = [n for n in names if n in produced and n not in existing]
    for name in added:
        model.graph.output.add().name = name
    onnx.save_model(model, str(out))
    return added


def rank_nodes(fp32: Path, int8: Path, plan: QuantPlan, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    import onnxruntime as ort

    model = onnx.load(str(fp32), load_external_data=False)
    quantized = set(plan.quantize) | set(plan.dynamic)
    gemms = {n.name: n.output[0] for n in model.graph.node
             if n.name in quantized and n.op_type in ("MatMul", "Gemm")}
    tensors = list(gemms.values())
    a_path, b_path = fp32.with_suffix(".probe.onnx"), int8.with_suffix(".probe.onnx")
    names = [t for t in _with_outputs(fp32, tensors, a_path) if t in set(_with_outputs(int8, tensors, b_path))]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(str(a_path), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(b_path), so, providers=["CPUExecutionProvider"])
    errors = dict.fromkeys(names, 0.0)
    for feed in feeds:
        ra = dict(zip([o.name for o in a.get_outputs()], a.run(None, feed)))
        rb = dict(zip([o.name for o in b.get_outputs()], b.run(None, feed)))
        for t in names:
            ref = ra[t].astype(np.float64)
            errors[t] += float(np.linalg.norm(rb[t] - ref) / max(np.linalg.norm(ref), 1e-12))
    by_tensor = {t: n for n, t in gemms.items()}
    return [by_tensor[t] for t in sorted(names, key=lambda t: -errors[t])]
