"""INT8 quantization: which nodes, which form, and how ranges are calibrated.

What is quantized is found from graph patterns, never from hand-written node names. Weight
MatMul/Gemm (second input an initializer) with a reduction dim K >= ``min_k`` become int8
GEMMs with per-output-channel symmetric int8 weights, in one of three forms:

* ``rowwise`` (the conv front end on CPU): dynamic uint8 activations with a scale per row
  (frame), computed at run time, into onnxruntime's u8 x s8 MatMulInteger (the VNNI/AMX
  path of MLAS); see rowwise.py. Frames of silence and of speech share these GEMMs, and the
  LayerNorm that follows blows a shared scale's rounding of quiet frames up to full-scale
  noise (measured with every GEMM per-tensor: centred cosine -0.16 to 0.21);
* ``dynamic`` (the other GEMMs on CPU: transformer, projections): one dynamic scale per
  activation tensor, through the fused DynamicQuantizeMatMul. No activation ranges to
  calibrate, so nothing collapses when clips are longer or quieter than the calibration
  audio (static ranges from 2-3 s clips collapse at 10 s: see docs/export.md);
* ``static``: QDQ with activation ranges calibrated on real audio (minmax / entropy /
  percentile) — the form TensorRT's explicit quantization takes, and the only one for
  ``--target tensorrt``. Data-movement ops (Reshape, Slice, Concat, Transpose, Squeeze,
  Unsqueeze) whose output reaches only static-quantized MatMuls then move uint8.

Weights are rounded by GPTQ-style error compensation on calibration activations (gptq.py)
for the dynamic forms: on the WavLM-base-plus-shaped preset, round-to-nearest weights alone
cost as much accuracy as everything else together.

Everything else stays float and is reported with a reason: activation x activation MatMuls
(attention scores and probabilities), index/shape arithmetic (relative position buckets:
Log/Gather/Range), Softmax, LayerNorm, residual adds, small-K GEMMs (the first conv of the
front end, K = 10) and the grouped positional conv.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from clapedge.export.errors import ExportError
from clapedge.export.onnx_export import IR_VERSION

log = logging.getLogger("clapedge.export")

CalibMethod = Literal["minmax", "entropy", "percentile"]
Target = Literal["cpu", "tensorrt"]
MOVEMENT_OPS = ("Reshape", "Slice", "Concat", "Transpose", "Squeeze", "Unsqueeze")
WEIGHT_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one tower."""

    method: CalibMethod = "percentile"
    percentile: float = 99.999
    target: Target = "cpu"
    min_k: int = 64
    quantize_conv: bool = False
    # Conv front end GEMMs: "rowwise" (dynamic per-frame INT8, see rowwise.py), "static"
    # (per-tensor QDQ like the rest) or "float".
    front_end: Literal["rowwise", "static", "float"] = "rowwise"
    # The other weight GEMMs (transformer, projections): "dynamic" (one scale per tensor,
    # fused DynamicQuantizeMatMul), "rowwise" (a scale per row) or "static" (calibrated QDQ;
    # the only form for --target tensorrt). Measured on the WavLM-base-plus-shaped preset
    # (GPTQ weights, rowwise front end): per-tensor centred cosine >= 0.993 at 1-10 s and
    # 9-12% less CPU time than per-row (>= 0.996).
    gemm: Literal["rowwise", "dynamic", "static"] = "dynamic"
    # Weight rounding of the rowwise/dynamic GEMMs: "gptq" (error-compensated on calibration
    # activations, gptq.py) or "nearest".
    rounding: Literal["gptq", "nearest"] = "gptq"
    keep_float: tuple[str, ...] = ()  # node names kept float by the accuracy search

    def __post_init__(self) -> None:
        from clapedge.errors import ConfigError

        if self.method not in ("minmax", "entropy", "percentile"):
            raise ConfigError(f"calibration method {self.method!r}: use minmax, entropy or "
                              f"percentile")
        if self.target not in ("cpu", "tensorrt"):
            raise ConfigError(f"target {self.target!r}: use cpu or tensorrt")
        if self.front_end not in ("rowwise", "static", "float"):
            raise ConfigError(f"front_end {self.front_end!r}: use rowwise, static or float")
        if self.gemm not in ("rowwise", "dynamic", "static"):
            raise ConfigError(f"gemm {self.gemm!r}: use rowwise, dynamic or static")
        if self.rounding not in ("gptq", "nearest"):
            raise ConfigError(f"rounding {self.rounding!r}: use gptq or nearest")
        if self.target == "tensorrt" and (self.gemm != "static" or self.front_end == "rowwise"):
            raise ConfigError("--target tensorrt takes explicit Q/DQ only: --gemm static and "
                              "--front-end static or float")
        if not 90.0 <= self.percentile < 100.0:
            raise ConfigError(f"percentile {self.percentile}: must be in [90, 100)")


@dataclass
class QuantPlan:
    """The nodes to quantize and, for every candidate left float, why."""

    quantize: list[str] = field(default_factory=list)  # static QDQ
    rowwise: list[str] = field(default_factory=list)  # dynamic, a scale per row
    per_tensor: list[str] = field(default_factory=list)  # dynamic, one scale per tensor
    float_reasons: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        reasons: dict[str, int] = defaultdict(int)
        for reason in self.float_reasons.values():
            reasons[reason] += 1
        return {"static_qdq_nodes": len(self.quantize), "rowwise_dynamic_nodes": len(self.rowwise),
                "per_tensor_dynamic_nodes": len(self.per_tensor), "kept_float": dict(reasons)}

    @property
    def dynamic(self) -> list[str]:
        return self.rowwise + self.per_tensor


FRONT_END_WEIGHT = ".gemm_front_end."  # initializer names of export/rewrite.py's GEMM convs


def is_front_end(node: onnx.NodeProto) -> bool:
    return len(node.input) > 1 and FRONT_END_WEIGHT in node.input[1]


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _weight_k(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int | None:
    """K of a weight GEMM (None if the second input is not a constant weight)."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    dims = list(inits[node.input[1]].dims)
    if len(dims) != 2:
        return None
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return dims[1] if trans_b else dims[0]


def plan_quantization(model: onnx.ModelProto, config: QuantConfig) -> QuantPlan:
    inits = _initializers(model)
    plan = QuantPlan()
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producers[name] = node
    quantized: set[str] = set()
    # The feature projection (the first weight GEMM after the conv front end) is still a
    # per-frame map: it takes the front end's form, so frames stay a local function of the
    # samples (the streaming split cuts after it; a per-tensor scale would make every frame
    # depend on the whole clip).
    order = [n for n in model.graph.node if n.op_type in WEIGHT_OPS and _weight_k(n, inits)]
    last_front = max((i for i, n in enumerate(order) if is_front_end(n)), default=None)
    frame_local = {order[last_front + 1].name} if last_front is not None and \
        last_front + 1 < len(order) else set()
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS:
            k = _weight_k(node, inits)
            if k is None:
                plan.float_reasons[node.name] = ("activation x activation MatMul (attention): "
                                                 "its range depends on the sequence length")
            elif k < config.min_k:
                plan.float_reasons[node.name] = f"GEMM with K < {config.min_k}: int8 does not pay off"
            elif node.name in config.keep_float:
                plan.float_reasons[node.name] = "kept float by the accuracy search"
            elif (is_front_end(node) or node.name in frame_local) and config.front_end == "float":
                plan.float_reasons[node.name] = "conv front end kept float (--front-end float)"
            elif is_front_end(node) or node.name in frame_local:
                if config.front_end == "rowwise":
                    plan.rowwise.append(node.name)
                else:
                    quantized.add(node.name)
            elif config.gemm == "rowwise":
                plan.rowwise.append(node.name)
            elif config.gemm == "dynamic":
                plan.per_tensor.append(node.name)
            else:
                quantized.add(node.name)
        elif node.op_type == "Conv":
            if config.quantize_conv and node.name not in config.keep_float:
                quantized.add(node.name)
            else:
                plan.float_reasons[node.name] = "convolution kept float (grouped positional conv)"
    # Data movement feeding only quantized GEMMs runs in the quantized domain.
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type not in MOVEMENT_OPS or node.name in quantized:
                continue
            if node.name in config.keep_float or not node.input or node.input[0] in inits:
                continue
            users = [u for out in node.output for u in consumers[out]]
            if users and all(u.name in quantized for u in users):
                quantized.add(node.name)
                changed = True
    plan.quantize = [n.name for n in model.graph.node if n.name in quantized]
    return plan


@dataclass
class Calibration:
    """Activation ranges collected once and reused by every quantization attempt."""

    ranges: object  # onnxruntime.quantization.calibrate.TensorsData
    method: str
    clips: int


def calibrate(model_path: Path, feeds: list[dict[str, np.ndarray]], config: QuantConfig,
              workdir: Path) -> Calibration:
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from clapedge.calib.ort_reader import make_reader

    if not feeds:
        raise ExportError("no calibration data")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    extra = {"percentile": config.percentile} if config.method == "percentile" else {}
    if config.method != "minmax":
        extra["symmetric"] = config.target == "tensorrt"
    calibrator = create_calibrator(
        model_path, list(WEIGHT_OPS) + list(MOVEMENT_OPS) + ["Conv"],
        augmented_model_path=str(workdir / "augmented.onnx"), calibrate_method=method,
        use_external_data_format=False, extra_options=extra)
    # One clip per call: the augmented model outputs every candidate tensor, and the
    # calibrator holds all outputs of a call in memory (a 10 s clip of a Base model is about
    # 2 GB of them; six such clips in one call were OOM-killed at 17 GB). Histograms and
    # min/max accumulate across calls, and each call sees arrays of one shape.
    for feed in feeds:
        calibrator.collect_data(make_reader([feed]))
    ranges = calibrator.compute_data()
    del calibrator
    return Calibration(ranges=ranges, method=config.method, clips=len(feeds))


def quantize_static(model_path: Path, out_path: Path, calibration: Calibration | None,
                    plan: QuantPlan, config: QuantConfig,
                    weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Writes the INT8 model: the plan's dynamic GEMMs rewritten (rowwise.py, with
    ``weights`` from gptq.py where given), then its static nodes as QDQ (per-channel
    symmetric weights, calibrated activations)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.load(str(model_path))
    if plan.dynamic:
        from clapedge.export.rowwise import rowwise_int8

        rowwise_int8(model, plan.rowwise, weights=weights)
        rowwise_int8(model, plan.per_tensor, per_tensor=True, weights=weights)
    if not plan.quantize:
        # QDQQuantizer reads an empty node list as "every node": nothing static to do.
        model.ir_version = min(model.ir_version, IR_VERSION)
        onnx.save_model(model, str(out_path))
        return
    if calibration is None:
        raise ExportError("static QDQ nodes need calibrated activation ranges")
    tensorrt = config.target == "tensorrt"
    activation = QuantType.QInt8 if tensorrt else QuantType.QUInt8
    extra = {"WeightSymmetric": True, "ActivationSymmetric": tensorrt,
             "QDQKeepRemovableActivations": False, "DedicatedQDQPair": tensorrt}
    op_types = list(WEIGHT_OPS) + list(MOVEMENT_OPS) + (["Conv"] if config.quantize_conv else [])
    quantizer = QDQQuantizer(model, True, False, QuantType.QInt8, activation, calibration.ranges,
                             plan.quantize, [], op_types, extra)
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    out = quantizer.model.model
    out.ir_version = min(out.ir_version, IR_VERSION)
    onnx.save_model(out, str(out_path))


def quantize_dynamic_matmul(model_path: Path, out_path: Path) -> None:
    """Per-channel dynamic INT8 of weight MatMuls (the text tower: static QDQ collapses
    MiniLM embeddings as LayerNorm and MatMul errors compound; dynamic keeps cosine > 0.99)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Stale value_info left by the fusion pass contradicts ONNX shape inference; drop it.
    model = onnx.load(str(model_path))
    del model.graph.value_info[:]
    clean = out_path.with_suffix(".clean.onnx")
    onnx.save_model(model, str(clean))
    quantize_dynamic(str(clean), str(out_path), op_types_to_quantize=["MatMul"],
                     per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    clean.unlink()
    model = onnx.load(str(out_path))
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.save_model(model, str(out_path))


def int8_embedding_tables(model: onnx.ModelProto, min_rows: int = 1000) -> list[str]:
    """Stores large embedding tables (a Gather from a 2-D initializer with >= ``min_rows``
    rows: the word embeddings, 30522 x 384 in MiniLM, half the text tower's file) as int8
    with a scale per row; the Gather then picks int8 rows and their scales and multiplies.
    Returns the tables rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = _initializers(model)
    done, nodes = [], []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or table.dims[0] < min_rows or axis != 0 \
                or table.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(table).astype(np.float32)
        scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        p = f"{node.name}_int8"
        graph.initializer.extend([numpy_helper.from_array(q, f"{p}_table"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{p}_scale")])
        ids, out = node.input[1], node.output[0]
        nodes += [helper.make_node("Gather", [f"{p}_table", ids], [f"{p}_rows"], name=f"{p}_rows"),
                  helper.make_node("Gather", [f"{p}_scale", ids], [f"{p}_scales"], name=f"{p}_scales"),
                  helper.make_node("Cast", [f"{p}_rows"], [f"{p}_rowsf"], name=f"{p}_cast",
                                   to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{p}_rowsf", f"{p}_scales"], [out], name=f"{p}_mul")]
        done.append(node.input[0])
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return done


SMOOTH_ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _gemm_input_amax(model: onnx.ModelProto, inputs: list[str],
                     feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each tensor in ``inputs`` (last axis) over ``feeds``, each
    fed alone."""
    from clapedge.export.gptq import activations

    amax: dict[str, np.ndarray] = {}
    for values in activations(model, inputs, feeds):
        for name, value in values.items():
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            amax[name] = m if name not in amax else np.maximum(amax[name], m)
    return amax


def smooth_gemm_inputs(model: onnx.ModelProto, gemms: list[str],
                       amax: dict[str, np.ndarray], alpha: float) -> int:
    """SmoothQuant (Xiao et al. 2023), exact in float: for each tensor x read by the GEMMs
    ``gemms``, channel j is divided by s_j = amax_j^alpha / wmax_j^(1 - alpha) (a Mul the
    GEMMs read instead of x; other readers of x are untouched) and row j of every such
    GEMM's weight multiplied by s_j. Channels with outliers (the GELU outputs of a BERT
    tower: max/median channel 12-24x) move part of their range into the weights, so one
    per-tensor activation scale fits the rest. Returns the Muls inserted."""
    from onnx import helper, numpy_helper

    from clapedge.export.rowwise import _as_matmul

    graph = model.graph
    inits = _initializers(model)
    by_input: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    wanted = set(gemms)
    for node in graph.node:
        if node.name in wanted and node.input[0] in amax and _as_matmul(node, inits):
            by_input[node.input[0]].append(node)
    muls: dict[str, onnx.NodeProto] = {}
    for x, readers in by_input.items():
        weights = [_as_matmul(n, inits)[0] for n in readers]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = (np.maximum(amax[x], 1e-5) ** alpha
                 / np.maximum(wmax, 1e-5) ** (1.0 - alpha)).astype(np.float32)
        name = f"{x}_smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32),
                                                         f"{x}_smooth_inv"))
        muls[x] = helper.make_node("Mul", [x, f"{x}_smooth_inv"], [name], name=f"{x}_smooth")
        for node in readers:
            init = inits[node.input[1]]
            w = numpy_helper.to_array(init).astype(np.float32)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            w = w * (scale[None, :] if trans_b else scale[:, None])
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            node.input[0] = name
    # each Mul right before the first GEMM that reads it (the graph stays topological)
    pending = {mul.output[0]: mul for mul in muls.values()}
    nodes = []
    for node in graph.node:
        if node.input and node.input[0] in pending:
            nodes.append(pending.pop(node.input[0]))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(by_input)


def quantize_text(model_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]],
                  *, min_k: int = 64, rounding: str = "gptq", seed: int = 0,
                  form: str = "smooth") -> dict:
    """The text tower: dynamic INT8 GEMMs and int8 embedding tables. ``form``: "smooth"
    (one scale per tensor, fused DynamicQuantizeMatMul, after SmoothQuant on ``feeds``
    with the alpha that keeps the calibration prompts closest to fp32), "dynamic" (per
    tensor, no smoothing) or "rowwise" (a scale per token). Per-channel weights rounded to
    nearest or by GPTQ on the (smoothed) token activations of ``feeds``, whichever keeps the
    calibration prompts closer to fp32. Returns a summary for the export report.

    Measured on all-MiniLM-L6-v2 (64 held-out captions + probes, min cosine to fp32, one
    prompt on one thread): per-tensor 0.991 at 2.1x fp32 speed (outlier GELU channels set
    the scale); per-token 0.996 but no faster than fp32 (19 more ops per GEMM cost more than
    they save at a dozen tokens); SmoothQuant alpha 0.7 + per-tensor 0.997 at per-tensor
    speed, 0.9985 with GPTQ weights (GPTQ alone, unsmoothed, gained nothing)."""
    import copy
    import tempfile

    import onnxruntime as ort

    from clapedge.export.gptq import gptq_weights
    from clapedge.export.parity import cosine_rows
    from clapedge.export.rowwise import rowwise_int8

    if form not in ("smooth", "dynamic", "rowwise"):
        raise ExportError(f"text quantization form {form!r}: use smooth, dynamic or rowwise")
    if form == "smooth" and not feeds:
        raise ExportError("SmoothQuant needs calibration prompts (feeds)")
    model = onnx.load(str(model_path))
    del model.graph.value_info[:]  # stale after the fusion pass
    plan = plan_quantization(model, QuantConfig(gemm="rowwise" if form == "rowwise"
                                                else "dynamic", min_k=min_k))
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def embed(m: onnx.ModelProto) -> np.ndarray:
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        name = s.get_outputs()[0].name
        return np.concatenate([s.run([name], f)[0] for f in feeds])

    def quantized(m: onnx.ModelProto, weights=None) -> onnx.ModelProto:
        q = copy.deepcopy(m)
        rowwise_int8(q, plan.rowwise, weights=weights)
        rowwise_int8(q, plan.per_tensor, per_tensor=True, weights=weights)
        return q

    # fp32 reference embeddings of the prompts: only for the searches below
    ref = embed(model) if feeds and (form == "smooth" or rounding == "gptq") else None
    alpha = None
    if form == "smooth":
        inputs = sorted({n.input[0] for n in model.graph.node if n.name in plan.per_tensor})
        amax = _gemm_input_amax(model, inputs, feeds)
        best = None
        for a in (None,) + SMOOTH_ALPHAS:
            trial = copy.deepcopy(model)
            if a is not None:
                smooth_gemm_inputs(trial, plan.per_tensor, amax, a)
            score = float(cosine_rows(ref, embed(quantized(trial))).min())
            log.info("text SmoothQuant alpha %s: min cosine %.4f on %d prompts", a, score,
                     len(feeds))
            if best is None or score > best[0]:
                best = (score, a)
        alpha = best[1]
        if alpha is not None:
            smooth_gemm_inputs(model, plan.per_tensor, amax, alpha)
    weights = None
    if rounding == "gptq" and feeds:
        # GPTQ on the (smoothed) model's own activations; kept only where it is closer to
        # fp32 on the calibration prompts than rounding to nearest
        with tempfile.TemporaryDirectory(prefix="clapedge-text-") as tmp:
            path = Path(tmp) / "text.onnx"
            onnx.save_model(model, str(path))
            weights = gptq_weights(path, plan.dynamic, feeds, seed=seed)
        gptq_score = float(cosine_rows(ref, embed(quantized(model, weights))).min())
        nearest_score = float(cosine_rows(ref, embed(quantized(model))).min())
        log.info("text weights: GPTQ min cosine %.4f, nearest %.4f", gptq_score, nearest_score)
        if gptq_score < nearest_score:
            weights = None
    model = quantized(model, weights)
    tables = int8_embedding_tables(model)
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.save_model(model, str(out_path))
    mode = {"smooth": "per-tensor dynamic (DynamicQuantizeMatMul) after SmoothQuant",
            "dynamic": "per-tensor dynamic (DynamicQuantizeMatMul)",
            "rowwise": "per-row (token) dynamic"}[form]
    out = {"mode": mode, "gemms": len(plan.dynamic),
           "weights": "int8 per-channel symmetric, " + ("GPTQ-rounded" if weights else "rounded to nearest"),
           "embedding_tables_int8": len(tables)}
    if form == "smooth":
        out["smooth_alpha"] = alpha
        out["calibration_prompts"] = len(feeds)
    return out


def convert_fp16(model_path: Path, out_path: Path) -> None:
    """fp16 weights and compute, fp32 inputs/outputs (LayerNorm-heavy graphs keep accuracy)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(model_path))
    _unshare_small_initializers(model)
    model = convert_float_to_float16(model, keep_io_types=True,
                                     op_block_list=["LayerNormalization", "SkipLayerNormalization",
                                                    "ReduceL2", "Softmax", "Log", "Range"])
    _unique_node_names(model)
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.save_model(model, str(out_path))


def _unique_node_names(model: onnx.ModelProto) -> None:
    """The fp16 converter names its casts after the initializer they cast, so a weight shared
    by two blocked nodes yields two nodes of one name (an invalid model)."""
    seen: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0


def _unshare_small_initializers(model: onnx.ModelProto, max_elements: int = 1 << 16) -> None:
    """Gives each consumer of a small shared initializer its own copy: the exporter
    deduplicates equal constants (LayerNorm weights of several layers), and the fp16
    converter names the fp32 cast it inserts for a blocked op after the initializer, so a
    shared one would be defined twice."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    seen: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            tensor = inits.get(name)
            if tensor is None or int(np.prod(tensor.dims)) > max_elements:
                continue
            seen[name] += 1
            if seen[name] > 1:
                copy = numpy_helper.from_array(numpy_helper.to_array(tensor), f"{name}__{seen[name]}")
                model.graph.initializer.append(copy)
                node.input[i] = copy.name
