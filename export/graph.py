"""Graph clean-up before quantization: onnxruntime's transformer fusions where they apply.

The exporter already folds constants and removes dead code (onnxscript optimizer). On top,
onnxruntime's transformer optimizer fuses GELU (erf form, with its bias), LayerNorm and
SkipLayerNorm for every tower; multi-head attention is fused only for the text towers
(BERT-type). It does not fuse WavLM/HuBERT/wav2vec2 attention: WavLM adds a gated relative
position bias per head, and the ORT fusion only matches BERT/GPT attention subgraphs; the
attention there stays as MatMul/Softmax/MatMul (documented in docs/export.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from clapedge.export.onnx_export import IR_VERSION

log = logging.getLogger("clapedge.export")


_CHATTY = ("onnxruntime.transformers", "symbolic_shape_infer", "fusion_base", "fusion_utils",
           "fusion_skiplayernorm", "fusion_layernorm", "fusion_gelu", "fusion_biasgelu",
           "onnx_model", "onnx_model_bert", "fusion_attention", "fusion_options")


def fuse(src: Path, dst: Path, *, num_heads: int, hidden_size: int, attention: bool) -> dict:
    """Applies the fusions; returns the fused-operator statistics for the report."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_attention = attention
    # Silence the optimizer's own chatter ("symbolic shape inference failed") which is
    # expected on audio graphs (ReduceL2, Range on dynamic lengths) and harmless here.
    quiet = [logging.getLogger(n) for n in _CHATTY]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        optimized = optimizer.optimize_model(
            str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
            optimization_options=options, opt_level=0, use_gpu=False)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    model = optimized.model
    domains = {n.domain for n in model.graph.node if n.domain}
    imported = {o.domain for o in model.opset_import}
    for domain in sorted(domains - imported):
        model.opset_import.add(domain=domain, version=1)
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.save_model(model, str(dst))
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    log.info("fusions in %s: %s", dst.name, stats)
    return stats
