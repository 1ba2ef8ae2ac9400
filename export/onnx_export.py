"""Tracing a tower to ONNX: named dynamic axes, one self-describing file.

We use the dynamo exporter (``torch.onnx.export(..., dynamo=True)``): on these backbones the
TorchScript exporter produces graphs that disagree with PyTorch (WavLM's relative position
bias), while dynamo export is exact once training-only paths are off. Output names are never
reused for internal values (a duplicate name yields an invalid model), and the file is saved
as a single protobuf (< 2 GB) at an IR version the supported onnxruntime range loads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from clapedge.export.errors import ExportError

log = logging.getLogger("clapedge.export")

OPSET = 18
# onnxruntime 1.17 reads IR <= 9, 1.20+ IR 10; onnx >= 1.18 writes newer IR by default.
IR_VERSION = 9


@dataclass(frozen=True)
class AxisSpec:
    """A dynamic axis: input name -> {axis index: (name, min, max)}."""

    name: str
    minimum: int = 1
    maximum: int = 1 << 24


def export_module(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, *,
                  input_names: Sequence[str], output_names: Sequence[str],
                  dynamic: dict[str, dict[int, AxisSpec]], metadata: dict[str, str],
                  what: str) -> onnx.ModelProto:
    """Exports ``module(*args)`` to ``path`` and returns the loaded model."""
    module = module.eval()
    dims: dict[str, torch.export.Dim] = {}

    def dim(spec: AxisSpec) -> torch.export.Dim:
        if spec.name not in dims:
            dims[spec.name] = torch.export.Dim(spec.name, min=spec.minimum, max=spec.maximum)
        return dims[spec.name]

    dynamic_shapes = tuple({axis: dim(s) for axis, s in dynamic.get(n, {}).items()}
                           for n in input_names)
    buffer = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=list(input_names),
                output_names=[f"{_TMP_PREFIX}{i}" for i in range(len(output_names))],
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET, external_data=False, optimize=True, verbose=False)
    except Exception as e:  # the exporter raises many internal types; report them as one
        raise ExportError(f"exporting the {what} to ONNX failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    model = program.model_proto
    rename_outputs(model, list(output_names))
    model.ir_version = min(model.ir_version, IR_VERSION)
    set_metadata(model, metadata)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    log.info("exported the %s to %s (%d nodes)", what, path.name, len(model.graph.node))
    return model


_TMP_PREFIX = "clapedge_output_"


def _rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for node in g.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for v in list(g.output) + list(g.value_info):
        if v.name == old:
            v.name = new


def rename_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Gives the graph outputs their contract names. The exporter names internal values after
    Python variables (an ``embedding`` inside the model), so exporting straight to those names
    yields a graph that is not SSA; we export to placeholders and rename here, moving any
    internal value of the same name aside first."""
    internal = {x for node in model.graph.node for x in node.output}
    for name in names:
        if name in internal:
            _rename_value(model, name, f"{name}__internal")
    for i, name in enumerate(names):
        _rename_value(model, f"{_TMP_PREFIX}{i}", name)


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """``metadata_props`` make the file describe itself (sample rate, dim, pooling...)."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in sorted(metadata.items()):
        if key in existing:
            existing[key].value = str(value)
        else:
            model.metadata_props.add(key=key, value=str(value))
