"""The cached-attention encoder step for streaming: a hop encodes only its new frames.

The streaming split (``stream_split.py``) reuses front-end frames; a bidirectional encoder
must still re-run over the whole window each hop (2 s window, 0.5 s hop: 75% of the encoder
work redone), which keeps a hop at 0.65-0.7x of a full window. This module runs the encoder
the way streaming transformers with a memory do: the window's older frames keep the per-layer
keys/values and final states they got when they were computed, and a step computes, for its
N frames only,

* the positional conv, from the ``context`` encoder-input frames before them plus their own;
* every layer: queries, keys and values of the N frames; attention of their queries over the
  cached keys/values plus their own (WavLM: the gated relative-position bias for query
  positions P..P+N-1 against keys 0..P+N-1);
* pooling over the cached final states plus the new ones, the projection, the heads.

**Causal models** (``audio.causal_context`` = L, ``models/causal.py``): the step is exact.
Each frame attends to at most L earlier frames and the positional conv reads only the past,
so a frame's states never change once computed: ``causal_windows`` gives exactly the windows
of the whole stream encoded at once (tests/test_causal.py). ``CausalStep`` is the exported
form (fixed-size caches, no zero-length axes) that ``clap-export`` writes as
``audio_step.onnx`` for causal models (``export_step``) and ``runtime/stream.py`` runs per hop.

**Bidirectional models** (the seeds): with a cache the step is an approximation, since an
older frame's states were computed without the right context that has arrived since, while
the offline window's bidirectional attention and its positional conv (128 frames wide in
WavLM/wav2vec2, wider than a 2 s window) let every frame see it. ``cached_windows``
re-computes the last ``lookahead`` frames with the new ones, trading cost for fidelity;
``python -m clapedge.bench.stream_cache`` measures both on a bidirectional model
(docs/benchmarks.md): at the cost that would meet a 0.35x per-hop target the top-1 tags agree
with the offline windows on only 70-91% of windows per bank, so the runtime does not offer it.

``StepEncoder`` inputs: ``frames`` [1, N, H] (encoder-input frames: the feature projection's
output), ``context`` [1, C, H] (the C frames before them, zeros where there are none),
``past_key`` / ``past_value`` [L, 1, P, H], ``past_hidden`` [1, Q, H]; outputs: the audio
tower's (embedding, head logits...) plus ``new_key`` / ``new_value`` [L, 1, N, H] and
``new_hidden`` [1, N, H].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from clapedge.models import causal


class StepUnsupported(ValueError):
    """The audio backbone has a part the cached step does not implement."""


def _pos_conv_reach(encoder: nn.Module) -> int:
    """Frames of left context the positional conv (stack) reads for one output frame."""
    pos = encoder.pos_conv_embed
    layers = getattr(pos, "layers", None)
    if layers is not None:  # data2vec-audio: a stack of same-padded convs
        return sum(int(layer.conv.kernel_size[0]) // 2 for layer in layers)
    return int(pos.conv.kernel_size[0]) // 2


class StepEncoder(nn.Module):
    """The audio tower after its front end, one streaming step at a time (see module doc).

    For a causal model (``audio.causal_context`` = L) the step is exact: ``context`` is the
    K-1 encoder-input frames before the new ones (K the positional-conv kernel), ``past_*``
    the last (at most) L frames' keys/values, and the new frames' states are what encoding
    the whole stream at once gives them. ``past_hidden`` holds the final states of the
    window's older frames (pooling only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        tower = model.audio_branch
        base = tower.base
        cfg = base.config
        self.model = model
        self.encoder = base.encoder
        self.stable = bool(getattr(cfg, "do_stable_layer_norm", False))
        self.wavlm = cfg.model_type == "wavlm"
        self.heads = cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.head_dim = self.hidden // self.heads
        self.causal = tower.causal_context
        if self.causal is not None:
            self.context = causal.positional_kernel(self.encoder) - 1
        else:
            self.context = _pos_conv_reach(self.encoder)
        self.head_names = [h.name for h in model.config.heads]
        for layer in self.encoder.layers:
            if getattr(layer, "adapter_layer", None) is not None:
                raise StepUnsupported("encoder adapter layers are not supported by the "
                                      "cached streaming step")

    @property
    def layers(self) -> int:
        return len(self.encoder.layers)

    def _positional(self, frames: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Positional conv output of the N new frames, from C context frames + the new ones.
        Bidirectional: beyond the new frames the conv pads with zeros, as at the end of an
        offline window (context rows that are all zero stay zero through a data2vec stack, as
        the offline padding does). Causal: exact, the conv reads only the past."""
        n = frames.shape[1]
        pos = self.encoder.pos_conv_embed
        if self.causal is not None:
            return causal.causal_positional(pos, frames, context)
        ext = torch.cat([context, frames], dim=1)
        if hasattr(pos, "frame_mask"):  # MaskedConvStack (data2vec-audio)
            pos.frame_mask = ext.abs().sum(dim=-1) > 0
            try:
                out = pos(ext)
            finally:
                pos.frame_mask = None
        else:
            out = pos(ext)
        return out[:, out.shape[1] - n:]

    def encode(self, frames: torch.Tensor, context: torch.Tensor, past_key: torch.Tensor,
               past_value: torch.Tensor, visible_from: torch.Tensor | None = None):
        """Final states [1, N, H] of the new ``frames`` and their per-layer keys/values
        [layers, 1, N, H], attending over ``past_*`` [layers, 1, P, H] then themselves.
        ``visible_from``: for the fixed-size caches of ``CausalStep``, the first cached
        position that exists (older ones are ignored)."""
        enc = self.encoder
        n = frames.shape[1]
        past = past_key.shape[2]
        h = frames + self._positional(frames, context)
        if not self.stable:
            h = enc.layer_norm(h)
        query = torch.arange(n, device=h.device) + past
        key = torch.arange(past + n, device=h.device)
        if self.causal is not None:
            visible = causal.allowed(query, key, self.causal)
        else:
            visible = torch.ones(n, past + n, dtype=torch.bool, device=h.device)
        if visible_from is not None:
            visible = visible & (key >= visible_from)[None, :]
        bias = causal.relative_bias(enc.layers[0].attention, query, key) if self.wavlm else None
        keys, values = [], []
        for i, layer in enumerate(enc.layers):
            x = layer.layer_norm(h) if self.stable else h
            a, k, v = causal.attend(layer.attention, x, past_key[i], past_value[i], visible,
                                    bias, self.heads)
            if self.stable:
                h = h + a
                h = h + layer.feed_forward(layer.final_layer_norm(h))
            else:
                h = layer.layer_norm(h + a)
                h = layer.final_layer_norm(h + layer.feed_forward(h))
            keys.append(k)
            values.append(v)
        if self.stable:
            h = enc.layer_norm(h)
        return h, torch.stack(keys), torch.stack(values)

    def outputs(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        """The tower's outputs from pooled final states: the embedding, then head logits."""
        embedding = nn.functional.normalize(self.model.audio_projection(pooled), dim=-1)
        outs = [embedding]
        if self.head_names:
            logits = self.model.heads(pooled, embedding)
            outs += [logits[name] for name in self.head_names]
        return outs

    def forward(self, frames: torch.Tensor, context: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, past_hidden: torch.Tensor):
        h, keys, values = self.encode(frames, context, past_key, past_value)
        window = torch.cat([past_hidden, h], dim=1)
        mask = torch.ones(window.shape[:2], dtype=torch.bool, device=window.device)
        pooled = self.model.audio_branch.pooling(window, mask)
        return (*self.outputs(pooled), keys, values, h)

    def empty_cache(self, dtype=torch.float32):
        """(context, past_key, past_value, past_hidden) of a stream with nothing cached."""
        return (torch.zeros(1, self.context, self.hidden, dtype=dtype),
                torch.zeros(self.layers, 1, 0, self.hidden, dtype=dtype),
                torch.zeros(self.layers, 1, 0, self.hidden, dtype=dtype),
                torch.zeros(1, 0, self.hidden, dtype=dtype))


def encoder_frames(model: nn.Module, wave: torch.Tensor) -> torch.Tensor:
    """Encoder-input frames [1, F, H] of a whole signal [1, T] (conv front end + feature
    projection): the frames a stream with an exact front-end split computes hop by hop."""
    tower = model.audio_branch
    features = tower._conv_features(wave, torch.tensor([wave.shape[1]]))
    projected = tower.base.feature_projection(features)
    return projected[0] if isinstance(projected, tuple) else projected


@torch.no_grad()
def cached_windows(step: StepEncoder, frames: torch.Tensor, window: int, hop: int,
                   lookahead: int = 0):
    """Yields (first frame, step outputs, frames computed) for the windows of ``window``
    frames every ``hop`` frames over ``frames`` [1, F, H]. The first window is computed whole;
    each later one computes its new ``hop`` frames plus the ``lookahead`` frames before them
    and takes the states of the older frames from the cache (those older than ``lookahead``
    when they were last computed). ``lookahead >= window - hop`` recomputes every frame: the
    offline windows exactly."""
    keys: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}
    finals: dict[int, torch.Tensor] = {}
    hidden = step.hidden
    for k, f0 in enumerate(range(0, frames.shape[1] - window + 1, hop)):
        a = f0 if k == 0 else max(f0, f0 + window - hop - lookahead)
        new = frames[:, a:f0 + window]
        ctx = frames[:, max(f0, a - step.context):a]
        ctx = torch.cat([ctx.new_zeros(1, step.context - ctx.shape[1], hidden), ctx], dim=1)
        if a > f0:
            past = range(f0, a)
            pk = torch.stack([keys[i] for i in past], dim=2)
            pv = torch.stack([values[i] for i in past], dim=2)
            ph = torch.stack([finals[i] for i in past], dim=1)
        else:
            pk = frames.new_zeros(step.layers, 1, 0, hidden)
            pv, ph = pk.clone(), frames.new_zeros(1, 0, hidden)
        out = step(new, ctx, pk, pv, ph)
        nk, nv, nh = out[-3:]
        for j in range(new.shape[1]):
            keys[a + j], values[a + j], finals[a + j] = nk[:, :, j], nv[:, :, j], nh[:, j]
        for i in [i for i in keys if i < f0 + hop]:  # bounded: at most one window cached
            del keys[i], values[i], finals[i]
        yield f0, out[:-3], new.shape[1]


@torch.no_grad()
def causal_windows(step: StepEncoder, frames: torch.Tensor, window: int, hop: int):
    """Yields (first frame, step outputs) for the windows of ``window`` frames every ``hop``
    frames over ``frames`` [1, F, H] of a causal model, each window computing only the frames
    it has not seen (the first: the whole window; later: the hop's new frames) against the
    caches a stream keeps: the last K-1 encoder-input frames, the last L keys/values per
    layer, the final states of the window's older frames. Exact: equal to encoding the whole
    stream at once and pooling each window's frames."""
    if step.causal is None:
        raise StepUnsupported("causal_windows needs a causal model (audio.causal_context)")
    hidden = step.hidden
    context, keys, values, finals = step.empty_cache(frames.dtype)
    done = 0  # frames computed so far; finals holds frames [done - finals.shape[1], done)
    for f0 in range(0, frames.shape[1] - window + 1, hop):
        new = frames[:, done:f0 + window]
        past_hidden = finals[:, finals.shape[1] - (done - f0):] if done > f0 else \
            frames.new_zeros(1, 0, hidden)
        out = step(new, context, keys, values, past_hidden)
        nk, nv, nh = out[-3:]
        keys = torch.cat([keys, nk], dim=2)[:, :, -step.causal:]
        values = torch.cat([values, nv], dim=2)[:, :, -step.causal:]
        context = torch.cat([context, new], dim=1)[:, -step.context:]
        finals = torch.cat([past_hidden, nh], dim=1)
        done = f0 + window
        yield f0, out[:-3]


class CausalStep(nn.Module):
    """The exported (ONNX) form of a causal model's streaming step, with fixed-size caches so
    the graph has no zero-length axis (the first window has nothing cached):

    inputs  ``frames`` [1, N, H] the new encoder-input frames; ``context`` [1, K-1, H] the
            frames before them (zeros before the stream's start, as the conv's own padding);
            ``past_key`` / ``past_value`` [layers, 1, L, H] the keys/values of the last L
            frames, newest last, of which the last ``past_valid`` [1] (int64) exist;
            ``past_sum`` [1, H] / ``past_count`` [1] the sum and number of the final states
            of the window's older frames (mean pooling over the window);
    outputs the tower's ``embedding`` (+ heads), then ``new_key`` / ``new_value``
            [layers, 1, N, H] and ``new_hidden`` [1, N, H] for the caller's caches.

    Only mean poolings (``masked_mean``, ``mean``: a stream window has no padding) can be
    split this way; other poolings raise StepUnsupported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.step = StepEncoder(model)
        if self.step.causal is None:
            raise StepUnsupported("the model is not causal (audio.causal_context)")
        pooling = model.config.audio.pooling
        if pooling not in ("masked_mean", "mean"):
            raise StepUnsupported(f"audio.pooling={pooling!r}: the streaming step pools with "
                                  "running sums (masked_mean or mean only)")
        self.left = int(self.step.causal)

    def forward(self, frames, context, past_key, past_value, past_valid, past_sum, past_count):
        h, keys, values = self.step.encode(frames, context, past_key, past_value,
                                           visible_from=self.left - past_valid)
        pooled = (past_sum + h.sum(dim=1)) / (past_count + frames.shape[1]).unsqueeze(-1)
        return (*self.step.outputs(pooled), keys, values, h)

    def example_inputs(self, frames: int = 8):
        s = self.step
        g = torch.Generator().manual_seed(0)
        return (torch.randn(1, frames, s.hidden, generator=g),
                torch.randn(1, s.context, s.hidden, generator=g),
                torch.randn(s.layers, 1, self.left, s.hidden, generator=g),
                torch.randn(s.layers, 1, self.left, s.hidden, generator=g),
                torch.tensor([self.left // 2], dtype=torch.int64),
                torch.randn(1, s.hidden, generator=g),
                torch.tensor([3.0]))


# --------------------------------------------------------------------------- export

STEP_FILE = "audio_step.onnx"
from clapedge.runtime.manifest import STEP_INPUTS, STEP_OUTPUTS as STEP_STATE_OUTPUTS  # noqa: E402
MIN_STEP_FRAMES = 2  # the exported graph's smallest step (dynamo specialises size-1 axes)


@dataclass
class StepExport:
    """An exported causal step (``audio_step.onnx``) and what the export measured."""

    path: Path
    causal_context: int
    context_frames: int
    layers: int
    hidden: int
    parity_max_abs_error: float   # ONNX fp32 step vs the PyTorch step
    window_cosine: float          # front end + step over one window vs the audio tower

    def record(self) -> dict:
        out = asdict(self)
        out["path"] = self.path.name
        return out


def _weight_matmuls(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def quantize_step(fp32: Path, out: Path) -> None:
    """Per-tensor dynamic INT8 of the step's weight GEMMs (DynamicQuantizeMatMul, the form of
    the audio tower's transformer GEMMs); attention's activation x activation MatMuls stay
    float, as in the audio tower."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from clapedge.export.onnx_export import IR_VERSION

    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"node_{i}"
    clean = out.with_suffix(".clean.onnx")
    onnx.save_model(model, str(clean))
    try:
        quantize_dynamic(str(clean), str(out), op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=_weight_matmuls(model), per_channel=False,
                         weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        clean.unlink(missing_ok=True)
    quantized = onnx.load(str(out))
    quantized.ir_version = min(quantized.ir_version, IR_VERSION)
    onnx.save_model(quantized, str(out))


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_step(model: nn.Module, work: Path, *, int8: bool, metadata: dict[str, str],
                frontend: Path, audio: Path, window_samples: int) -> StepExport:
    """Exports the causal step of ``model`` (``CausalStep``), checks it against the PyTorch
    step, quantizes it when the bundle is INT8, and checks it end to end the way a stream
    uses it: the split's front end over one window, then the step with nothing cached, must
    give the audio tower's embedding of that window (cosine >= 0.9999 fp32, >= 0.99 INT8).
    Raises StepUnsupported (the bundle then streams whole windows) when a check fails."""
    import numpy as np

    from clapedge.export.onnx_export import AxisSpec, export_module
    from clapedge.runtime import manifest as mf

    step = CausalStep(model).eval()
    heads = [mf.HEAD_PREFIX + h for h in step.step.head_names]
    outputs = [mf.EMBEDDING, *heads, *STEP_STATE_OUTPUTS]
    raw = work / "audio_step.fp32.onnx"
    export_module(step, step.example_inputs(), raw, input_names=STEP_INPUTS,
                  output_names=outputs,
                  dynamic={"frames": {1: AxisSpec("frames", MIN_STEP_FRAMES, 1 << 20)}},
                  metadata={**metadata, "clapedge.role": "audio_step",
                            "causal_context": str(step.left)},
                  what="causal streaming step")
    session = _session(raw)
    worst = 0.0
    for n in (MIN_STEP_FRAMES, 9, 31):
        args = step.example_inputs(n)
        with torch.no_grad():
            want = [t.numpy() for t in step(*args)]
        got = session.run(None, {k: v.numpy() for k, v in zip(STEP_INPUTS, args)})
        worst = max(worst, max(float(np.abs(g - w).max()) for g, w in zip(got, want)))
    if not worst < 1e-3:
        raise StepUnsupported(f"the exported step differs from PyTorch by {worst:.3g}")
    path = raw
    if int8:
        path = work / "audio_step.int8.onnx"
        quantize_step(raw, path)
    # end to end, the runtime's way: front end frames of one window, the step from scratch
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal((1, window_samples)) * 0.1).astype(np.float32)
    mask = np.ones_like(wave, dtype=np.int64)

    def run(p: Path, feeds: dict) -> list:
        s = _session(p)
        names = {i.name for i in s.get_inputs()}
        return s.run(None, {k: v for k, v in feeds.items() if k in names})

    frames = run(frontend, {mf.WAVEFORM: wave, mf.ATTENTION_MASK: mask})[0]
    if frames.shape[-1] != step.step.hidden:
        raise StepUnsupported(f"the streaming split's frames have {frames.shape[-1]} channels, "
                              f"the encoder takes {step.step.hidden}")
    s = step.step
    feeds = {"frames": frames.astype(np.float32),
             "context": np.zeros((1, s.context, s.hidden), np.float32),
             "past_key": np.zeros((s.layers, 1, step.left, s.hidden), np.float32),
             "past_value": np.zeros((s.layers, 1, step.left, s.hidden), np.float32),
             "past_valid": np.zeros(1, np.int64), "past_sum": np.zeros((1, s.hidden), np.float32),
             "past_count": np.zeros(1, np.float32)}
    got = run(path, feeds)[0][0]
    want = run(audio, {mf.WAVEFORM: wave, mf.ATTENTION_MASK: mask})[0][0]
    cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    if not cosine >= (0.99 if int8 else 0.9999):
        raise StepUnsupported(f"front end + step over one window gives cosine {cosine:.4f} "
                              f"to the audio tower (the split's frames are not the encoder's "
                              f"input?)")
    return StepExport(path, step.left, s.context, s.layers, s.hidden, worst, cosine)
