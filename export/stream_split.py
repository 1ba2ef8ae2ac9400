"""The audio tower cut in two for streaming: a per-frame front end and a window-level encoder.

A stream with window W and hop H encodes W every H. In the wav2vec2 family the audio tower is
a conv front end, whose frame t is a function of the samples [S*t, S*t + R) only (stride
S = 320, receptive field R = 400 at 16 kHz), followed by window-level parts (positional conv,
transformer, pooling, projection, heads). Cut between the two, a stream computes front-end
frames only for its new samples and re-runs only the encoder over the window's cached frames
(``runtime/stream.py``).

The cut is made in the FINAL audio graph (after fusion and quantization): each half holds the
very nodes of ``audio.onnx``, so reused frames give the numbers of encoding the window from
scratch wherever the front end is frame-local.

Finding the cut, from the graph and measurements, never from node names:

1. separators: tensors that every value path from ``waveform`` to the outputs passes through
   (``Shape`` carries only the input length, which the encoder reads from ``attention_mask``,
   of the same shape, instead);
2. frame tensors: float separators of shape [batch, frames(samples), channels], measured at a
   probe length with the frame geometry (stride, receptive field) of the conv stack;
3. locality, measured: a frame tensor is local when it comes out the same (to float rounding)
   computed on an aligned sub-chunk of a signal as on the whole signal. The cut is the last
   frame tensor before the first non-local one (the positional conv, attention, pooling);
4. a front end normalised over time (GroupNorm in the first conv, waveform standardisation)
   has no local frame tensor at all: the cut is then the last frame tensor before the first
   time-mixing op (Conv, Softmax) and the split is marked inexact;
5. an op that only applies the padding mask right at the cut stays on the encoder side.

Then both halves are checked the way the runtime uses them (frames of a first window, then
frames of each hop only, the encoder over a later window) against the whole graph: ``exact``
means bit-identical embeddings and head logits here.
"""

from __future__ import annotations

import heapq
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from clapedge.export.errors import ExportError
from clapedge.runtime import manifest as mf

log = logging.getLogger("clapedge.export")

FRONTEND_FILE = "audio_frontend.onnx"
ENCODER_FILE = "audio_encoder.onnx"
SHAPE_OPS = ("Shape", "Size")
TIME_MIXING_OPS = ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "Softmax",
                   "Attention", "MultiHeadAttention", "LSTM", "GRU", "RNN")
LOCAL_RTOL = 1e-4  # a frame tensor is local when chunked frames agree to this (x its scale)
_FLOAT = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


class SplitError(ExportError):
    """The audio graph cannot be cut into a front end and an encoder."""


@dataclass(frozen=True)
class FrameGeometry:
    """Frame t of the front end sees samples [stride*t, stride*t + receptive_field)."""

    stride: int
    receptive_field: int

    @classmethod
    def from_convs(cls, kernels, strides) -> "FrameGeometry":
        rf, jump = 1, 1
        for k, s in zip(kernels, strides):
            rf += (int(k) - 1) * jump
            jump *= int(s)
        return cls(jump, rf)

    def frames(self, samples: int) -> int:
        if samples < self.receptive_field:
            return 0
        return (samples - self.receptive_field) // self.stride + 1

    def span(self, frames: int) -> int:
        """Samples that ``frames`` consecutive frames cover."""
        return self.receptive_field + self.stride * (frames - 1)


@dataclass
class SplitResult:
    frontend: Path
    encoder: Path
    boundary: str
    channels: int
    dtype: str
    exact: bool
    frames_local: bool
    max_abs_error: float
    geometry: FrameGeometry
    encoder_mask: bool
    frontend_mask: bool

    def record(self) -> dict:
        out = asdict(self)
        out["frontend"], out["encoder"] = self.frontend.name, self.encoder.name
        out["geometry"] = asdict(self.geometry)
        return out


# --------------------------------------------------------------------------- graph analysis

class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        for node in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):
                raise SplitError(f"node {node.name or node.op_type} has a subgraph; graphs with "
                                 f"control flow are not split")
        self.model = model
        self.nodes = list(g.node)
        self.inits = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        if mf.WAVEFORM not in self.inputs:
            raise SplitError(f"the audio graph has no {mf.WAVEFORM!r} input")
        self.producer = {out: i for i, n in enumerate(self.nodes) for out in n.output if out}
        self.order = self._topological()
        self.value_dep = self._depends(mf.WAVEFORM, through_shape=False)
        self.mask_dep = self._depends(mf.ATTENTION_MASK, through_shape=True)

    def _topological(self) -> list[int]:
        """Node indices in a topological order (Kahn; ties keep the file order)."""
        indeg, users = [0] * len(self.nodes), [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for name in set(node.input):
                j = self.producer.get(name)
                if j is not None:
                    indeg[i] += 1
                    users[j].append(i)
        ready = [i for i, d in enumerate(indeg) if d == 0]
        order = []
        heapq.heapify(ready)
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for j in users[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(ready, j)
        if len(order) != len(self.nodes):
            raise SplitError("the audio graph has a cycle")
        return order

    def _depends(self, source: str, through_shape: bool) -> set[str]:
        """Tensors whose values depend on graph input ``source`` (``Shape`` outputs only when
        ``through_shape``)."""
        dep = {source}
        for i in self.order:
            node = self.nodes[i]
            if not through_shape and node.op_type in SHAPE_OPS:
                continue
            if any(name in dep for name in node.input):
                dep.update(o for o in node.output if o)
        return dep

    def closure(self, targets: list[str], stops: set[str], waveform: bool = False
                ) -> set[int] | None:
        """Nodes needed to compute ``targets`` from ``stops``, graph inputs and constants.
        Unless ``waveform``, None when a value path from the waveform bypasses ``stops``
        (``Shape(waveform)`` is allowed: the encoder reads the length from the mask)."""
        seen: set[int] = set()
        stack = [self.producer[t] for t in targets if t in self.producer and t not in stops]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            node = self.nodes[i]
            for name in node.input:
                if not name or name in stops or name in self.inits:
                    continue
                if name == mf.WAVEFORM:
                    if not waveform and node.op_type not in SHAPE_OPS:
                        return None
                    continue
                j = self.producer.get(name)
                if j is not None and j not in seen:
                    stack.append(j)
        return seen

    def separators(self) -> list[str]:
        """Value-dependent tensors every waveform value path to the outputs passes through,
        in topological order."""
        out = []
        for i in self.order:
            for name in self.nodes[i].output:
                if name and name in self.value_dep and name not in self.outputs \
                        and self.closure(self.outputs, {name}) is not None:
                    out.append(name)
        return out

    def front_nodes(self, boundary: str) -> set[int]:
        return self.closure([boundary], set(), waveform=True) or set()


# --------------------------------------------------------------------------- measurements

def _session(model: onnx.ModelProto | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def _probe_signal(samples: int, sample_rate: int, seed: int = 0, batch: int = 1) -> np.ndarray:
    """Speech-like test input: tones, noise, a silent stretch (scales differ per frame)."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    rows = []
    for b in range(batch):
        x = 0.3 * np.sin(2 * np.pi * (140 + 60 * b) * t * (1 + 0.3 * np.sin(2 * np.pi * 0.7 * t)))
        x += 0.05 * rng.standard_normal(samples)
        x *= 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 1.3 * t))
        x[samples // 3: samples // 3 + samples // 10] = 0.0
        rows.append(x)
    return np.stack(rows).astype(np.float32)


def _feeds(graph: _Graph, wave: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {mf.WAVEFORM: wave}
    if mf.ATTENTION_MASK in graph.inputs:
        feeds[mf.ATTENTION_MASK] = np.ones(wave.shape, np.int64)
    return feeds


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        vi = onnx.ValueInfoProto()
        vi.name = name
        probe.graph.output.append(vi)
    return probe


def _frame_tensors(graph: _Graph, seps: list[str], geometry: FrameGeometry,
                   sample_rate: int) -> tuple[list[str], dict[str, bool], dict[str, float]]:
    """The float separators shaped [batch, frames, channels], and whether each is local."""
    long_frames, chunk_frames, offset = 64, 25, 13
    wave = _probe_signal(geometry.span(long_frames), sample_rate, batch=2)
    a = geometry.stride * offset
    chunk = np.ascontiguousarray(wave[:, a:a + geometry.span(chunk_frames)])
    session = _session(_with_outputs(graph.model, seps))
    names = [o.name for o in session.get_outputs()]
    full = dict(zip(names, session.run(None, _feeds(graph, wave))))
    part = dict(zip(names, session.run(None, _feeds(graph, chunk))))
    frames, local, error = [], {}, {}
    for name in seps:
        x, y = full[name], part[name]
        if x.dtype not in (np.float32, np.float16) or x.shape[:2] != (2, long_frames) \
                or x.ndim != 3 or y.shape != (2, chunk_frames, x.shape[2]):
            continue
        frames.append(name)
        ref = x[:, offset:offset + chunk_frames].astype(np.float64)
        err = float(np.abs(ref - y.astype(np.float64)).max())
        scale = float(np.abs(ref).max()) or 1.0
        local[name], error[name] = err <= LOCAL_RTOL * scale, err
    return frames, local, error


def choose_boundary(graph: _Graph, frames: list[str], local: dict[str, bool]) -> tuple[str, bool]:
    """(boundary tensor, whether its frames are local); see the module docstring."""
    if not frames:
        raise SplitError("no tensor of shape [batch, frames, channels] separates the front end "
                         "from the rest (wrong frame geometry, or not a conv front end?)")
    first_bad = next((k for k, name in enumerate(frames) if not local[name]), len(frames))
    if first_bad > 0:
        k, is_local = first_bad - 1, True
    else:
        k, is_local = len(frames) - 1, False
        for j in range(len(frames) - 1):
            between = graph.closure([frames[j + 1]], {frames[j]}) or set()
            if any(graph.nodes[i].op_type in TIME_MIXING_OPS for i in between):
                k = j
                break
    # Ops that only apply the padding mask (their other inputs come from attention_mask)
    # belong to the encoder: it then also handles padded batches.
    while k > 0:
        between = [i for i in graph.closure([frames[k]], {frames[k - 1]}) or ()
                   if graph.nodes[i].op_type not in SHAPE_OPS
                   and any(n in graph.value_dep for n in graph.nodes[i].input)]
        masking = all(any(n in graph.mask_dep and n not in graph.value_dep
                          for n in graph.nodes[i].input) for i in between)
        if not between or not masking:
            break
        k -= 1
    return frames[k], is_local


# --------------------------------------------------------------------------- extraction

def _free_name(model: onnx.ModelProto, name: str) -> str | None:
    """Renames a tensor called ``name`` (the cut's new name) out of the way; returns the
    name it got."""
    g = model.graph
    taken = ({o for n in g.node for o in n.output} | {t.name for t in g.initializer}
             | {i.name for i in g.input})
    if name not in taken:
        return None
    new = next(f"{name}_{k}" for k in range(1, 1 << 20) if f"{name}_{k}" not in taken)
    for node in g.node:
        for field in (node.input, node.output):
            for k, x in enumerate(field):
                if x == name:
                    field[k] = new
    for t in list(g.initializer) + list(g.value_info) + list(g.input) + list(g.output):
        if t.name == name:
            t.name = new
    return new


def _tensor_info(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _subgraph(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs, outputs,
              role: str, graph_name: str) -> onnx.ModelProto:
    used = {name for node in nodes for name in node.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    sparse = [t for t in model.graph.sparse_initializer if t.values.name in used]
    # The exporter's symbolic shapes come along: ONNX Runtime fuses some patterns (Add +
    # LayerNorm) only where it can prove two shapes equal, and without them a half would
    # run other kernels than the whole graph (other rounding).
    made = {name for node in nodes for name in node.output} - {o.name for o in outputs}
    info = [v for v in model.graph.value_info if v.name in made]
    graph = helper.make_graph(nodes, graph_name, inputs, outputs, inits,
                              sparse_initializer=sparse, value_info=info)
    out = helper.make_model(graph, opset_imports=list(model.opset_import),
                            producer_name="clapedge")
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update({"clapedge.role": role, "clapedge.stream_split": "1"})
    helper.set_model_props(out, meta)
    return out


def split_audio_graph(audio: Path, out_dir: Path, geometry: FrameGeometry,
                      sample_rate: int) -> SplitResult:
    """Cuts ``audio`` (the final audio tower) into ``out_dir/audio_frontend.onnx`` and
    ``out_dir/audio_encoder.onnx`` and checks them against it (module docstring)."""
    model = onnx.load(str(audio))
    moved = _free_name(model, mf.FRAMES)
    graph = _Graph(model)
    seps = graph.separators()
    try:
        frames, local, _ = _frame_tensors(graph, seps, geometry, sample_rate)
    except Exception as e:  # onnxruntime's own error types
        if isinstance(e, SplitError):
            raise
        raise SplitError(f"{audio}: the audio graph fails on probe input of the frame "
                         f"geometry {geometry}: {e}") from None
    boundary, frames_local = choose_boundary(graph, frames, local)
    front = graph.front_nodes(boundary)
    back = graph.closure(graph.outputs, {boundary})
    if not front or back is None:
        raise SplitError(f"tensor {boundary!r} does not separate the graph")
    shared = [i for i in front & back
              if any(o in graph.value_dep for o in graph.nodes[i].output)]
    if shared:  # (shape and mask arithmetic may run on both sides)
        raise SplitError(f"{len(shared)} nodes computing from the waveform are needed on "
                         f"both sides of {boundary!r}")

    frames_name = mf.FRAMES
    session = _session(_with_outputs(model, [boundary]))
    sample = session.run([boundary], _feeds(graph, _probe_signal(geometry.span(4), sample_rate)))[0]
    channels = int(sample.shape[2])
    elem = onnx.TensorProto.FLOAT if sample.dtype == np.float32 else onnx.TensorProto.FLOAT16
    dtype = _FLOAT[elem]

    def renamed(node: onnx.NodeProto, old: str, new: str, outputs: bool) -> onnx.NodeProto:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        field = copy.output if outputs else copy.input
        for k, name in enumerate(field):
            if name == old:
                field[k] = new
        return copy

    declared = {i.name: i for i in model.graph.input}
    front_nodes = [renamed(graph.nodes[i], boundary, frames_name, True)
                   for i in sorted(front)]
    front_uses = {n for node in front_nodes for n in node.input}
    front_mask = mf.ATTENTION_MASK in front_uses
    known = next((v for v in model.graph.value_info if v.name == boundary), None)
    if known is not None and len(known.type.tensor_type.shape.dim) == 3:
        frame_shape = [d.dim_param or d.dim_value or None
                       for d in known.type.tensor_type.shape.dim]
    else:
        frame_shape = ["batch", "frames", channels]
    front_inputs = [declared[mf.WAVEFORM]] + ([declared[mf.ATTENTION_MASK]] if front_mask else [])
    frontend = _subgraph(model, front_nodes, front_inputs,
                         [_tensor_info(frames_name, elem, frame_shape)], "audio_frontend",
                         "audio_frontend")

    back_nodes = []
    for i in sorted(back):
        node = renamed(graph.nodes[i], boundary, frames_name, False)
        if node.op_type in SHAPE_OPS and mf.WAVEFORM in node.input:
            if mf.ATTENTION_MASK not in graph.inputs:
                raise SplitError("the encoder needs the input length but the graph has no "
                                 f"{mf.ATTENTION_MASK!r} input to read it from")
            node = renamed(node, mf.WAVEFORM, mf.ATTENTION_MASK, False)
        back_nodes.append(node)
    back_uses = {n for node in back_nodes for n in node.input}
    back_mask = mf.ATTENTION_MASK in back_uses
    back_inputs = [_tensor_info(frames_name, elem, frame_shape)] + (
        [declared[mf.ATTENTION_MASK]] if back_mask else [])
    encoder = _subgraph(model, back_nodes, back_inputs, list(model.graph.output),
                        "audio_encoder", "audio_encoder")

    out_dir.mkdir(parents=True, exist_ok=True)
    front_path, back_path = out_dir / FRONTEND_FILE, out_dir / ENCODER_FILE
    onnx.save_model(frontend, str(front_path))
    onnx.save_model(encoder, str(back_path))
    exact, error = verify_split(audio, front_path, back_path, geometry, sample_rate,
                                front_mask, back_mask)
    result = SplitResult(front_path, back_path,
                         mf.FRAMES if moved is not None and boundary == moved else boundary,
                         channels, dtype,
                         exact and frames_local, frames_local, error, geometry, back_mask,
                         front_mask)
    log.info("stream split at %s (%d channels): frames %s, reuse %s (max abs error %.3g)",
             boundary, channels, "local" if frames_local else "NOT local",
             "bit-identical" if result.exact else "inexact", error)
    return result


def verify_split(audio: Path, frontend: Path, encoder: Path, geometry: FrameGeometry,
                 sample_rate: int, front_mask: bool, back_mask: bool,
                 window_frames: int | None = None, hop_frames: int | None = None
                 ) -> tuple[bool, float]:
    """Streams a test signal the runtime's way (the frames of the first window at once,
    then only each hop's new frames; the encoder over the window's cached frames) and
    compares every window with the whole audio graph. Returns (bit-identical, max abs
    error over all outputs)."""
    window_frames = window_frames or max(4, geometry.frames(2 * sample_rate))
    hop_frames = hop_frames or max(1, window_frames // 4)
    hops = 3
    total = geometry.span(window_frames + hops * hop_frames) + geometry.stride
    wave = _probe_signal(total, sample_rate, seed=7)[0]
    full, front, back = _session(audio), _session(frontend), _session(encoder)
    out_names = [o.name for o in full.get_outputs()]

    def run_front(chunk: np.ndarray) -> np.ndarray:
        feeds = {mf.WAVEFORM: chunk[None]}
        if front_mask:
            feeds[mf.ATTENTION_MASK] = np.ones((1, len(chunk)), np.int64)
        return front.run([mf.FRAMES], feeds)[0][0]

    cache = run_front(wave[:geometry.span(window_frames)])
    exact, worst = True, 0.0
    window = geometry.span(window_frames)
    for h in range(hops + 1):
        start = h * hop_frames * geometry.stride
        if h:
            a = (window_frames + (h - 1) * hop_frames) * geometry.stride
            new = run_front(wave[a:a + geometry.span(hop_frames)])
            cache = np.concatenate([cache, new])[hop_frames:]
        samples = wave[start:start + window]
        feeds = {mf.FRAMES: cache[None]}
        if back_mask:
            feeds[mf.ATTENTION_MASK] = np.ones((1, len(samples)), np.int64)
        got = back.run(out_names, feeds)
        ref = full.run(out_names, {mf.WAVEFORM: samples[None],
                                   mf.ATTENTION_MASK: np.ones((1, len(samples)), np.int64)}
                       if mf.ATTENTION_MASK in {i.name for i in full.get_inputs()}
                       else {mf.WAVEFORM: samples[None]})
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise SplitError(f"the split encoder returns {g.shape}, the audio tower "
                                 f"{r.shape}")
            exact = exact and r.tobytes() == g.tobytes()
            worst = max(worst, float(np.abs(r.astype(np.float64) - g).max()))
    return exact, worst


# --------------------------------------------------------------------------- bundles

def step_spec(folder: Path, step, precision: str, audio: mf.TowerSpec) -> mf.TowerSpec:
    """Copies a causal model's exported step (``stream_step.StepExport``) into the bundle
    ``folder`` as ``audio_step.onnx`` and describes it."""
    from clapedge.export.stream_step import STEP_FILE

    shutil.copyfile(step.path, folder / STEP_FILE)
    h, n, kv = step.hidden, "frames", (step.layers, 1, step.causal_context, step.hidden)
    inputs = (mf.TensorSpec(mf.FRAMES, "float32", (1, n, h)),
              mf.TensorSpec("context", "float32", (1, step.context_frames, h)),
              mf.TensorSpec("past_key", "float32", kv), mf.TensorSpec("past_value", "float32", kv),
              mf.TensorSpec("past_valid", "int64", (1,)),
              mf.TensorSpec("past_sum", "float32", (1, h)),
              mf.TensorSpec("past_count", "float32", (1,)))
    new_kv = (step.layers, 1, n, h)
    outputs = tuple(audio.outputs) + (mf.TensorSpec("new_key", "float32", new_kv),
                                      mf.TensorSpec("new_value", "float32", new_kv),
                                      mf.TensorSpec("new_hidden", "float32", (1, n, h)))
    return mf.TowerSpec(STEP_FILE, mf.sha256_file(folder / STEP_FILE), precision, inputs,
                        outputs, heads=dict(audio.heads))


def stream_spec(folder: Path, result: SplitResult, precision: str,
                audio: mf.TowerSpec, step=None) -> mf.StreamSpec:
    """Copies the two halves (and a causal model's step) into the bundle ``folder`` and
    describes them."""
    for path in (result.frontend, result.encoder):
        if path.parent.resolve() != folder.resolve():
            shutil.copyfile(path, folder / path.name)
    frames = mf.TensorSpec(mf.FRAMES, result.dtype, ("batch", "frames", result.channels))
    mask = mf.TensorSpec(mf.ATTENTION_MASK, "int64", ("batch", "samples"))
    wave = mf.TensorSpec(mf.WAVEFORM, "float32", ("batch", "samples"))
    frontend = mf.TowerSpec(FRONTEND_FILE, mf.sha256_file(folder / FRONTEND_FILE), precision,
                            (wave, mask) if result.frontend_mask else (wave,), (frames,))
    encoder = mf.TowerSpec(ENCODER_FILE, mf.sha256_file(folder / ENCODER_FILE), precision,
                           (frames, mask) if result.encoder_mask else (frames,),
                           audio.outputs, heads=dict(audio.heads))
    return mf.StreamSpec(frontend=frontend, encoder=encoder,
                         frame_stride=result.geometry.stride,
                         receptive_field=result.geometry.receptive_field,
                         exact=result.exact, boundary=result.boundary,
                         max_abs_error=result.max_abs_error,
                         step=None if step is None else step_spec(folder, step, precision, audio),
                         causal_context=None if step is None else step.causal_context,
                         step_context=None if step is None else step.context_frames)


def record_in_bundle(folder: Path, result: SplitResult, step=None) -> mf.Manifest:
    """Copies the halves (and a causal model's step) into the bundle ``folder`` and records
    them in its manifest (rewritten atomically, with file sizes)."""
    manifest = mf.read_manifest(folder)
    manifest.stream = stream_spec(folder, result, manifest.towers.audio.precision,
                                  manifest.towers.audio, step)
    manifest = manifest.with_sizes(folder)
    mf.write_manifest(folder, manifest)
    return manifest


def add_to_bundle(folder: Path, geometry: FrameGeometry, work: Path | None = None
                  ) -> SplitResult:
    """Splits the bundle's audio tower and records the halves in its manifest (rewritten
    atomically; the audio tower's checksum is verified first)."""
    manifest = mf.read_manifest(folder)
    audio = folder / manifest.towers.audio.file
    if mf.sha256_file(audio) != manifest.towers.audio.sha256:
        raise ExportError(f"{audio}: checksum mismatch; the bundle is corrupt or was modified")
    if manifest.towers.audio.external_data:
        raise SplitError(f"{audio}: towers with external data are not split")
    if manifest.stream is not None:
        raise ExportError(f"{folder}: the bundle already has a streaming split")
    written = [folder / FRONTEND_FILE, folder / ENCODER_FILE]
    committed = False
    try:
        with tempfile.TemporaryDirectory(prefix=".stream-split-", dir=work or folder) as tmp:
            result = split_audio_graph(audio, Path(tmp), geometry, manifest.sample_rate)
            record_in_bundle(folder, result)
        committed = True
    finally:
        if not committed:  # the old manifest stands: remove the files it does not name
            for path in written:
                path.unlink(missing_ok=True)
    return result


def try_split(audio: Path, work: Path, model, sample_rate: int) -> SplitResult | None:
    """The exporter's hook: the split of the final audio tower, or None (logged) when the
    graph cannot be cut; the bundle then streams full windows."""
    tower = model.audio_branch
    geometry = FrameGeometry.from_convs(tower.kernels, tower.strides)
    try:
        return split_audio_graph(audio, work / "stream", geometry, sample_rate)
    except SplitError as e:
        log.warning("no streaming split (streams will encode full windows): %s", e)
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m clapedge.export.stream_split BUNDLE``: add the split to an existing bundle."""
    import argparse

    from clapedge.errors import ClapEdgeError

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--stride", type=int, default=320, help="frame stride in samples")
    p.add_argument("--receptive-field", type=int, default=400, help="samples per frame")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = add_to_bundle(args.bundle, FrameGeometry(args.stride, args.receptive_field))
    except (ClapEdgeError, OSError) as e:
        print(f"error: {e}")
        return 1
    print(result.record())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
