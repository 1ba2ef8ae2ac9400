"""``tagger.onnx``: the audio tower + similarity to a baked label bank + TopK in one graph, so
one engine call returns the tags (no round trip through Python between encoder and head)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from clapedge.runtime.manifest import EMBEDDING, INDICES, SCORES


def build_tagger(audio: onnx.ModelProto, bank: np.ndarray, k: int) -> onnx.ModelProto:
    """A copy of ``audio`` whose graph also outputs ``scores`` [batch, k] (cosine to the bank
    rows, descending; ONNX TopK puts the lower index first on ties) and ``indices``."""
    if bank.ndim != 2 or not 0 < k <= bank.shape[0]:
        raise ValueError(f"bank {bank.shape} and k={k}: need a 2-D bank with at least k rows")
    model = onnx.ModelProto()
    model.CopyFrom(audio)
    graph = model.graph
    if not any(o.name == EMBEDDING for o in graph.output):
        raise ValueError("the audio graph has no 'embedding' output")
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(bank.T, dtype=np.float32), "tagger_bank_t"),
        numpy_helper.from_array(np.array([k], dtype=np.int64), "tagger_k"),
    ])
    graph.node.extend([
        helper.make_node("MatMul", [EMBEDDING, "tagger_bank_t"], ["tagger_all_scores"],
                         name="tagger_similarity"),
        helper.make_node("TopK", ["tagger_all_scores", "tagger_k"], [SCORES, INDICES],
                         name="tagger_topk", axis=-1, largest=1, sorted=1),
    ])
    graph.output.extend([
        helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["batch", k]),
        helper.make_tensor_value_info(INDICES, TensorProto.INT64, ["batch", k]),
    ])
    onnx.checker.check_model(model)
    return model
