"""A cached-attention encoder step for streaming: a hop encodes only its new frames.

Status: measured, not shipped. The streaming split (``stream_split.py``) reuses front-end
frames exactly, but the encoder still re-runs over the whole window each hop (2 s window,
0.5 s hop: 75% of the encoder work redone), which keeps a hop at 0.66-0.68x of a full window.
This module runs the encoder the way streaming transformers with a memory do (Emformer-style
left-context caching): the window's older frames keep the per-layer keys/values and final
states they got when they were last computed, and a step computes, for its N frames only,

* the positional conv, from the ``context`` encoder-input frames before them plus their own
  (the right edge padded with zeros, as at the end of an offline window);
* every layer: queries, keys and values of the N frames; attention of their queries over the
  cached keys/values plus their own (WavLM: the gated relative-position bias for query
  positions P..P+N-1 against keys 0..P+N-1);
* pooling over the cached final states plus the new ones, the projection, the heads.

With nothing cached (P = 0) a step over a whole window is the offline encoder exactly; with a
cache it is an approximation: an older frame's states were computed without the right context
that has arrived since, while the offline window's bidirectional attention and its positional
conv (128 frames wide in WavLM/wav2vec2, wider than a 2 s window) let every frame see it.
``cached_windows`` re-computes the last ``lookahead`` frames with the new ones, trading cost
for fidelity; ``python -m clapedge.bench.stream_cache`` measures both on the default model
(docs/benchmarks.md): at the cost that would meet a 0.35x per-hop target the top-1 tags agree
with the offline windows on only 70-91% of windows per bank, so the runtime does not offer it;
a model trained with limited right context would make the cache exact.

Step inputs: ``frames`` [1, N, H] (encoder-input frames: the feature projection's output),
``context`` [1, C, H] (the C frames before them, zeros where the window has none),
``past_key`` / ``past_value`` [L, 1, P, H], ``past_hidden`` [1, P, H]; outputs: the audio
tower's (embedding, head logits...) plus ``new_key`` / ``new_value`` [L, 1, N, H] and
``new_hidden`` [1, N, H].
"""

from __future__ import annotations

import torch
from torch import nn


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
    """The audio tower after its front end, one streaming step at a time (see module doc)."""

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
        """Positional conv output of the N new frames, from C context frames + the new ones;
        beyond the new frames the conv pads with zeros, as at the end of an offline window.
        Context rows that are all zero (before the window) stay zero through a data2vec
        stack, as the offline padding does."""
        n = frames.shape[1]
        ext = torch.cat([context, frames], dim=1)
        pos = self.encoder.pos_conv_embed
        if hasattr(pos, "frame_mask"):  # MaskedConvStack (data2vec-audio)
            pos.frame_mask = ext.abs().sum(dim=-1) > 0
            try:
                out = pos(ext)
            finally:
                pos.frame_mask = None
        else:
            out = pos(ext)
        return out[:, out.shape[1] - n:]

    def _bias(self, attention: nn.Module, past: int | torch.Tensor, n: int | torch.Tensor,
              like: torch.Tensor) -> torch.Tensor:
        """WavLM's relative-position bias [heads, N, P+N] for queries P..P+N-1."""
        query = torch.arange(n, device=like.device)[:, None] + past
        key = torch.arange(past + n, device=like.device)[None, :]
        bucket = attention._relative_positions_bucket(key - query)
        return attention.rel_attn_embed(bucket).permute(2, 0, 1)

    def _attend(self, layer: nn.Module, x: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, bias: torch.Tensor | None):
        attn = layer.attention
        b, n, _ = x.shape
        q = attn.q_proj(x)
        k_new, v_new = attn.k_proj(x), attn.v_proj(x)
        k = torch.cat([past_k, k_new], dim=1)
        v = torch.cat([past_v, v_new], dim=1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        scores = torch.matmul(heads(q) * (self.head_dim ** -0.5), heads(k).transpose(2, 3))
        if bias is not None:  # WavLM: the bias gated per query from the layer's input
            g = attn.gru_rel_pos_linear(heads(x))  # [B, heads, N, 8]
            g = g.reshape(b, self.heads, n, 2, 4).sum(-1)
            gate_a, gate_b = torch.sigmoid(g).chunk(2, dim=-1)
            gate = gate_a * (gate_b * attn.gru_rel_pos_const - 1.0) + 2.0  # [B, heads, N, 1]
            scores = scores + gate * bias.unsqueeze(0)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, heads(v)).transpose(1, 2).reshape(b, n, self.hidden)
        return attn.out_proj(out), k_new, v_new

    def forward(self, frames: torch.Tensor, context: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, past_hidden: torch.Tensor):
        enc = self.encoder
        n = frames.shape[1]
        past = past_hidden.shape[1]
        h = frames + self._positional(frames, context)
        if not self.stable:
            h = enc.layer_norm(h)
        bias = None
        if self.wavlm:
            bias = self._bias(enc.layers[0].attention, past, n, h)
        keys, values = [], []
        for i, layer in enumerate(enc.layers):
            if self.stable:
                a, k, v = self._attend(layer, layer.layer_norm(h), past_key[i], past_value[i], bias)
                h = h + a
                h = h + layer.feed_forward(layer.final_layer_norm(h))
            else:
                a, k, v = self._attend(layer, h, past_key[i], past_value[i], bias)
                h = layer.layer_norm(h + a)
                h = layer.final_layer_norm(h + layer.feed_forward(h))
            keys.append(k)
            values.append(v)
        if self.stable:
            h = enc.layer_norm(h)
        window = torch.cat([past_hidden, h], dim=1)
        mask = torch.ones(window.shape[:2], dtype=torch.bool, device=window.device)
        pooled = self.model.audio_branch.pooling(window, mask)
        embedding = nn.functional.normalize(self.model.audio_projection(pooled), dim=-1)
        outs = [embedding]
        if self.head_names:
            logits = self.model.heads(pooled, embedding)
            outs += [logits[name] for name in self.head_names]
        return (*outs, torch.stack(keys), torch.stack(values), h)

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
