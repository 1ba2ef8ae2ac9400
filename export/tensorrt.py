"""TensorRT: the QDQ form its explicit quantization accepts, checked statically here, and
engine building where TensorRT and a GPU exist (imported lazily: the package works without
TensorRT and says what to install when a feature needs it).

Engines are tied to the TensorRT version and the GPU they were built on (NVIDIA/TensorRT #70,
#292): the manifest records both, and the runtime (runtime/engines.py) loads the plan
through its EP-context model only where they match, and otherwise falls back to the ONNX file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from clapedge.errors import MissingDependencyError

# Ops the TensorRT ONNX parser supports that these towers use (TensorRT >= 8.6; opset >= 17
# keeps LayerNormalization as one op, NVIDIA/TensorRT #2781).
TENSORRT_OPS = frozenset("""
Add Sub Mul Div Pow Sqrt Erf Exp Log Abs Neg Min Max Sigmoid Tanh Relu Gelu Softmax
MatMul Gemm Conv LayerNormalization InstanceNormalization GroupNormalization ReduceMean
ReduceSum ReduceL2 ReduceMax Reshape Transpose Slice Concat Squeeze Unsqueeze Gather Shape
Cast Range Expand Where Equal Less Greater Not And Or Floor Ceil CumSum Tile Constant
ConstantOfShape Identity QuantizeLinear DequantizeLinear TopK Pad Split Clip Sign
ScatterND NonZero Einsum LessOrEqual GreaterOrEqual Mod Trilu
""".split())


@dataclass
class TensorRTCheck:
    problems: list[str] = field(default_factory=list)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_tensorrt_qdq(model: onnx.ModelProto) -> TensorRTCheck:
    """Static checks: every op is one TensorRT parses; Q/DQ are int8 with zero point 0;
    weight DQ is per-channel on the output-channel axis (MatMul [K, N]: axis 1)."""
    check = TensorRTCheck()
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
            check.problems.append(f"{node.name}: op {node.domain or 'ai.onnx'}::{node.op_type} "
                                  f"is not parsed by TensorRT")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type == "QuantizeLinear":
            check.quantize_nodes += 1
        else:
            check.dequantize_nodes += 1
        if len(node.input) < 3 or node.input[2] not in inits:
            check.problems.append(f"{node.name}: needs a constant zero point")
            continue
        zp = numpy_helper.to_array(inits[node.input[2]])
        if zp.dtype != np.int8 or np.any(zp != 0):
            check.problems.append(f"{node.name}: zero point must be int8 0 (symmetric), got "
                                  f"{zp.dtype} {np.unique(zp)[:3]}")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            users = consumers.get(node.output[0], [])
            if scale.size > 1 and any(u.op_type == "MatMul" for u in users) and axis != 1:
                check.problems.append(f"{node.name}: per-channel weight scale on axis {axis}; "
                                      f"TensorRT expects the output-channel axis 1 for MatMul")
    return check


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "building TensorRT engines needs TensorRT and an NVIDIA GPU: pip install "
            "'clapedge[gpu]' (on Jetson use the TensorRT that JetPack ships)") from None
    return tensorrt


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: min/opt/max sample counts for the audio tower (batch 1)."""

    min_samples: int = 8000
    opt_samples: int = 32000
    max_samples: int = 160000


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, *, int8: bool,
                 timing_cache: Path | None = None) -> dict:
    """Builds a serialized engine; returns {trt_version, gpu} for the manifest."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    opt = builder.create_optimization_profile()
    for name in ("waveform", "attention_mask"):
        opt.set_shape(name, (1, profile.min_samples), (1, profile.opt_samples),
                      (1, profile.max_samples))
    config.add_optimization_profile(opt)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and
                                       timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    import torch  # export extra; only to name the GPU

    major, minor = torch.cuda.get_device_capability(0)
    return {"trt_version": trt.__version__, "gpu": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}{minor}"}


CONTEXT_SUFFIX = "_ctx.onnx"


def context_model(tower: onnx.ModelProto, plan_file: str, *, trt_version: str,
                  compute_capability: str | None = None) -> onnx.ModelProto:
    """The EP-context model of a plan: one ``com.microsoft`` ``EPContext`` node with the
    tower's graph inputs and outputs, ``ep_cache_context`` = the plan's file name relative to
    this model (``embed_mode`` 0), so ONNX Runtime's TensorRT EP deserialises the plan
    instead of building an engine (runtime/engines.py)."""
    from clapedge.export.onnx_export import IR_VERSION

    g = tower.graph
    inits = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in inits]
    attrs = {"main_context": 1, "embed_mode": 0, "ep_cache_context": plan_file,
             "ep_sdk_version": trt_version, "source": "TensorrtExecutionProvider"}
    if compute_capability:
        attrs["hardware_architecture"] = compute_capability
    node = helper.make_node("EPContext", [v.name for v in inputs], [v.name for v in g.output],
                            name="tensorrt_engine", domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], f"{g.name or 'tower'}_tensorrt_context", inputs,
                              list(g.output))
    opsets = [helper.make_opsetid("", next(o.version for o in tower.opset_import
                                           if o.domain in ("", "ai.onnx"))),
              helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="clapedge")
    model.ir_version = min(model.ir_version, IR_VERSION)
    model.metadata_props.extend(p for p in tower.metadata_props)
    return model


def build_engines(bundle: Path) -> None:
    """Builds the audio engine of a bundle in place (on the device that will run it)."""
    require_tensorrt()
    from clapedge.runtime import manifest as mf

    manifest = mf.Manifest.from_json((bundle / mf.MANIFEST_NAME).read_text())
    audio = manifest.towers.audio
    info = build_engine(bundle / audio.file, bundle / "audio.plan", Profile(),
                        int8=audio.precision == "int8", timing_cache=bundle / "timing.cache")
    sr = manifest.sample_rate
    p = Profile()
    ranges = {n: mf.ShapeRange((1, p.min_samples), (1, p.opt_samples), (1, p.max_samples))
              for n in ("waveform", "attention_mask")}
    ctx_file = "audio" + CONTEXT_SUFFIX
    ctx = context_model(onnx.load(str(bundle / audio.file), load_external_data=False),
                        "audio.plan", trt_version=info["trt_version"],
                        compute_capability=info.get("compute_capability"))
    tmp = bundle / f".{ctx_file}.tmp"
    onnx.save_model(ctx, str(tmp))
    os.replace(tmp, bundle / ctx_file)  # no half-written context model
    engine = mf.EngineSpec(file="audio.plan", sha256=mf.sha256_file(bundle / "audio.plan"),
                           tower="audio", trt_version=info["trt_version"], gpu=info["gpu"],
                           profiles=(ranges,), precision=audio.precision, context=ctx_file,
                           context_sha256=mf.sha256_file(bundle / ctx_file))
    manifest.engines = manifest.engines + (engine,)
    del sr
    mf.write_manifest(bundle / mf.MANIFEST_NAME, manifest.with_sizes(bundle))
