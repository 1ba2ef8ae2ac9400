"""The native INT8 front end of an INT8 bundle (``kernels/frontend.py``), built from the
PyTorch audio tower and checked before it is written.

The runtime runs an INT8 audio tower as the native front end + ``audio_encoder.onnx`` (the
encoder half of the streaming split) on CPUs with AMX or AVX-512 VNNI, instead of
``audio.onnx`` whose front end is a dozen ONNX passes per conv layer. The two halves meet at
the split's boundary, the output of the feature projection; the native file holds the conv
stack (first conv float, the others per-output-channel int8, rounded like
``export/rowwise.py``) and the projection (LayerNorm + int8 Linear).

Checked here, on the held-out clips the exporter measures INT8 quality with: the native
front end's frames against the split's ONNX front end, and the embedding of native front end
+ encoder against fp32 (centred cosine per deployment length). The file is written only if
that embedding is as close to fp32 as ``audio.onnx``'s, within ``TOLERANCE``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clapedge.export.errors import ExportError
from clapedge.kernels.frontend import NativeFrontEnd
from clapedge.runtime import manifest as mf

log = logging.getLogger("clapedge.export")

FILE = "audio_frontend.native.npz"
TOLERANCE = 0.002  # centred cosine to fp32 may be this much below audio.onnx's


class NativeUnsupported(ExportError):
    """The audio tower's front end is not one the native kernel computes."""


def _int8_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (int8 [K, N], scale [N]): symmetric per output channel, the rounding
    of ``rowwise._weight_int8``."""
    from clapedge.export.rowwise import _weight_int8

    return _weight_int8(weight.astype(np.float32))


def _is_exact_gelu(act: nn.Module) -> bool:
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    with torch.no_grad():
        try:
            y = act(x)
        except Exception:  # noqa: BLE001 - any module that is not an activation
            return False
    return bool(torch.allclose(y, torch.nn.functional.gelu(x), atol=1e-9, rtol=0))


def _f32(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().float().numpy().copy()


def graph_weights(frontend_onnx: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (int8 [K, N], scale [N]) weights of the per-row dynamic GEMMs of an ONNX front
    end, in graph order (``export/rowwise.py``'s MatMulInteger over a ``*_wq`` initializer
    with its ``*_wscale``): the conv layers after the first, then the projection. Taking
    them from the graph gives the native front end the exporter's own rounding (GPTQ)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(frontend_onnx)).graph
    inits = {t.name: t for t in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in inits:
            continue
        scale_name = node.input[1][: -len("_wq")] + "_wscale" if node.input[1].endswith("_wq") else None
        if scale_name not in inits:
            continue
        out.append((numpy_helper.to_array(inits[node.input[1]]),
                    numpy_helper.to_array(inits[scale_name]).astype(np.float32)))
    return out


def build(model, frontend_onnx: Path | None = None) -> NativeFrontEnd:
    """The native front end of ``model``'s audio tower (a ClapModel); NativeUnsupported
    (with the reason) for a front end it does not cover. With ``frontend_onnx`` (the INT8
    split front end), its int8 weights are used where every GEMM matches by shape in order;
    otherwise the weights are rounded to nearest here."""
    tower = model.audio_branch
    base = getattr(tower, "base", None)
    convs = getattr(getattr(base, "feature_extractor", None), "conv_layers", None)
    projection = getattr(base, "feature_projection", None)
    if convs is None or projection is None:
        raise NativeUnsupported("the audio tower has no wav2vec2-style conv front end")
    layers = []
    for i, layer in enumerate(convs):
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, nn.Conv1d) or conv.groups != 1 or conv.dilation[0] != 1 \
                or conv.padding[0] != 0:
            raise NativeUnsupported(f"conv layer {i} is not a plain strided Conv1d")
        if not _is_exact_gelu(layer.activation):
            raise NativeUnsupported(f"conv layer {i}: activation is not exact GELU")
        w = conv.weight.detach().double()  # [cout, cin, k]
        cout, cin, k = w.shape
        rec = {"kernel": k, "stride": conv.stride[0], "cin": cin, "cout": cout,
               "bias": _f32(conv.bias)}
        if i == 0:
            if cin != 1:
                raise NativeUnsupported("the first conv must read one channel")
            rec["weight"] = w[:, 0, :].T.numpy().astype(np.float32)  # [k, cout]
        else:
            q, scale = _int8_columns(w.permute(2, 1, 0).reshape(k * cin, cout).numpy())
            rec["weight"], rec["weight_scale"] = q, scale
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, nn.GroupNorm):
            if i != 0 or norm.num_groups != norm.num_channels:
                raise NativeUnsupported(f"conv layer {i}: GroupNorm other than one group per "
                                        f"channel in the first layer")
            rec["norm"], rec["norm_eps"] = "group", float(norm.eps)
        elif isinstance(norm, nn.LayerNorm):
            rec["norm"], rec["norm_eps"] = "layer", float(norm.eps)
        elif norm is None:
            rec["norm"] = "none"
        else:
            raise NativeUnsupported(f"conv layer {i}: unsupported norm {type(norm).__name__}")
        if norm is not None and getattr(norm, "weight", None) is not None:
            rec["norm_weight"], rec["norm_bias"] = _f32(norm.weight), _f32(norm.bias)
        layers.append(rec)
    linear = getattr(projection, "projection", None)
    if not isinstance(linear, nn.Linear):
        raise NativeUnsupported("the feature projection has no Linear layer")
    ln = getattr(projection, "layer_norm", None)
    if ln is not None and not isinstance(ln, nn.LayerNorm):
        raise NativeUnsupported("the feature projection's norm is not a LayerNorm")
    q, scale = _int8_columns(linear.weight.detach().double().T.numpy())
    proj = {"din": linear.in_features, "dout": linear.out_features, "weight": q,
            "weight_scale": scale, "bias": _f32(linear.bias), "layer_norm": ln is not None}
    if ln is not None:
        proj.update(ln_weight=_f32(ln.weight), ln_bias=_f32(ln.bias), ln_eps=float(ln.eps))
    if frontend_onnx is not None:
        found = graph_weights(frontend_onnx)
        targets = layers[1:] + [proj]
        if len(found) == len(targets) and all(
                q.shape == t["weight"].shape for (q, _), t in zip(found, targets)):
            for (q, scale), t in zip(found, targets):
                t["weight"], t["weight_scale"] = q, scale
        else:
            log.info("native front end: the ONNX front end's int8 GEMMs do not match the conv "
                     "stack by shape; rounding the weights to nearest")
    try:
        return NativeFrontEnd(layers, proj, normalize_waveform=bool(tower.normalize_waveform))
    except ValueError as e:  # the kernel's own shape checks (KernelInputError)
        raise NativeUnsupported(str(e)) from None


def check(front: NativeFrontEnd, split_frontend: Path, split_encoder: Path, audio32: Path,
          audio8: Path, signals: list[np.ndarray], lengths_s: tuple[float, ...],
          sample_rate: int) -> dict:
    """Measures the native path against fp32 and ``audio.onnx`` (INT8) on ``signals`` at
    each deployment length; raises ExportError when it is worse than ``audio.onnx`` by more
    than ``TOLERANCE`` or its frames do not match the split's."""
    import onnxruntime as ort

    from clapedge.calib.sampling import length_buckets
    from clapedge.export.parity import centred_cosine

    def session(path: Path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    s32, s8, sf, se = (session(p) for p in (audio32, audio8, split_frontend, split_encoder))

    def run(s, feeds: dict) -> np.ndarray:
        names = {i.name for i in s.get_inputs()}
        return s.run([mf.FRAMES if s is sf else mf.EMBEDDING],
                     {k: v for k, v in feeds.items() if k in names})[0]

    record: dict = {"centred_cosine": {}, "audio_onnx_centred_cosine": {},
                    "frames_max_rel_error": 0.0}
    for length in lengths_s:
        clips = length_buckets(signals, [length], sample_rate, min(8, len(signals)))
        ref, graph, native = [], [], []
        for c in clips:
            mask = np.ones((1, len(c)), np.int64)
            feeds = {mf.WAVEFORM: c[None].astype(np.float32), mf.ATTENTION_MASK: mask}
            ref.append(run(s32, feeds))
            graph.append(run(s8, feeds))
            frames = front(c[None].astype(np.float32))
            onnx_frames = run(sf, feeds)
            if frames.shape != onnx_frames.shape:
                raise ExportError(f"native front end gives frames {frames.shape}, the split's "
                                  f"front end {onnx_frames.shape}")
            rel = float(np.abs(frames - onnx_frames).max() / max(np.abs(onnx_frames).max(), 1e-12))
            record["frames_max_rel_error"] = max(record["frames_max_rel_error"], rel)
            native.append(run(se, {mf.FRAMES: frames, mf.ATTENTION_MASK: mask}))
        ref, graph, native = (np.concatenate(x) for x in (ref, graph, native))
        key = f"{length:g}s"
        ours = float(centred_cosine(ref, native, ref.mean(0)).min())
        theirs = float(centred_cosine(ref, graph, ref.mean(0)).min())
        record["centred_cosine"][key] = round(ours, 5)
        record["audio_onnx_centred_cosine"][key] = round(theirs, 5)
        if ours < theirs - TOLERANCE:
            raise ExportError(f"native front end: centred cosine to fp32 {ours:.4f} at {key}, "
                              f"audio.onnx {theirs:.4f}; not used")
    return record


def write(front: NativeFrontEnd, folder: Path, record: dict) -> mf.NativeFrontEndSpec:
    path = folder / FILE
    front.save(path)
    return mf.NativeFrontEndSpec(file=FILE, sha256=mf.sha256_file(path),
                                 size=path.stat().st_size, quality=record)
