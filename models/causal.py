"""Causal audio encoders: the transformer a stream can run one hop at a time, exactly.

A model whose config sets ``audio.causal_context = L`` (frames) changes two things in the
encoder of its wav2vec2 / HuBERT / WavLM backbone, and nothing else (same parameters, same
state-dict keys, so a bidirectional checkpoint can be fine-tuned into a causal one):

* attention: a frame attends to itself and at most ``L`` earlier frames (a sliding window;
  WavLM's gated relative-position bias is kept, it only ever sees offsets -L..0);
* positional conv: the output at frame t reads input frames t-K+1..t (K the kernel) instead
  of t-K/2..t+K/2-1: the same weights, shifted into the past (and run unpadded, so a step
  computes only its own frames' outputs).

Every frame's state then depends only on the frames at or before it, and each layer needs
only the last ``L`` keys/values of the frames before it. A stream keeps those (one cache per
layer), the last K-1 encoder-input frames for the positional conv, and the final states of
the window's frames for pooling, and computes only a hop's new frames
(``export/stream_step.py``): the same numbers as encoding all frames at once, at about
hop/window of the encoder's work. The price is modelling: no frame sees the future, so the
model must be trained (or fine-tuned) causal; ``docs/default-model.md`` measures it.

``encode`` is the whole-sequence form (training, export, offline); ``attend`` is shared with
the streaming step. Both mirror the HF modules they replace (dropout and LayerDrop included,
so a causal model trains the way its bidirectional preset does).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SUPPORTED = ("wav2vec2", "hubert", "wavlm")


def allowed(query_pos: torch.Tensor, key_pos: torch.Tensor, left: int) -> torch.Tensor:
    """[N, M] bool: key j is visible to query i iff i - left <= j <= i (absolute positions)."""
    offset = key_pos[None, :] - query_pos[:, None]
    return (offset <= 0) & (offset >= -left)


def positional_kernel(encoder: nn.Module) -> int:
    return int(encoder.pos_conv_embed.conv.kernel_size[0])


def causal_positional(pos_conv: nn.Module, hidden: torch.Tensor,
                      past: torch.Tensor | None = None) -> torch.Tensor:
    """The positional conv [B, T, H] -> [B, T, H] with output t reading inputs t-K+1..t.

    HF's module pads K//2 frames on both sides (output t reads t-K//2..t+K-1-K//2); here the
    same weights run unpadded over the K-1 frames before the sequence (``past`` [B, K-1, H],
    zeros when None: the start of a stream) followed by the sequence, which yields exactly the
    T causal outputs (a stream's step computes only its new frames' outputs this way)."""
    conv = pos_conv.conv
    kernel = int(conv.kernel_size[0])
    x = hidden.transpose(1, 2)
    if past is None:
        x = F.pad(x, (kernel - 1, 0))
    else:
        x = torch.cat([past.transpose(1, 2).to(x.dtype), x], dim=2)
    y = F.conv1d(x, conv.weight, conv.bias, stride=1, padding=0, dilation=conv.dilation,
                 groups=conv.groups)
    return pos_conv.activation(y).transpose(1, 2)


def relative_bias(attention: nn.Module, query_pos: torch.Tensor,
                  key_pos: torch.Tensor) -> torch.Tensor:
    """WavLM's relative-position bias [heads, N, M] (HF ``compute_bias`` for any positions)."""
    bucket = attention._relative_positions_bucket(key_pos[None, :] - query_pos[:, None])
    return attention.rel_attn_embed(bucket).permute(2, 0, 1)


def attend(attention: nn.Module, x: torch.Tensor, past_key: torch.Tensor,
           past_value: torch.Tensor, visible: torch.Tensor, bias: torch.Tensor | None,
           heads: int, training: bool = False):
    """Self-attention of the queries of ``x`` [B, N, H] over ``past`` keys/values [B, P, H]
    followed by ``x``'s own; ``visible`` [N, P+N] bool; ``bias`` WavLM's [heads, N, P+N]
    (gated per query from ``x``, as HF does) or None. Returns (output, keys, values of x)."""
    b, n, hidden = x.shape
    head_dim = hidden // heads
    q = attention.q_proj(x)
    k_new, v_new = attention.k_proj(x), attention.v_proj(x)
    k = torch.cat([past_key.to(k_new.dtype), k_new], dim=1)
    v = torch.cat([past_value.to(v_new.dtype), v_new], dim=1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, head_dim).transpose(1, 2)

    scores = torch.matmul(split(q) * (head_dim ** -0.5), split(k).transpose(2, 3))
    if bias is not None:
        g = attention.gru_rel_pos_linear(split(x))  # [B, heads, N, 8]
        g = g.reshape(b, heads, n, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(g).chunk(2, dim=-1)
        gate = gate_a * (gate_b * attention.gru_rel_pos_const - 1.0) + 2.0  # [B, heads, N, 1]
        scores = scores + gate * bias.unsqueeze(0).to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    p = float(getattr(attention, "dropout", 0.0)) if training else 0.0
    if p > 0:
        probs = F.dropout(probs, p=p, training=True)
    out = torch.matmul(probs, split(v)).transpose(1, 2).reshape(b, n, hidden)
    return attention.out_proj(out), k_new, v_new


def encode(encoder: nn.Module, config, hidden: torch.Tensor, frame_mask: torch.Tensor,
           left: int) -> torch.Tensor:
    """The HF encoder's forward, causal: [B, T, H] encoder-input frames -> final states."""
    stable = bool(getattr(config, "do_stable_layer_norm", False))
    wavlm = config.model_type == "wavlm"
    heads = int(config.num_attention_heads)
    training = encoder.training
    hidden = hidden * frame_mask.unsqueeze(-1).to(hidden.dtype)  # padded frames output 0
    hidden = hidden + causal_positional(encoder.pos_conv_embed, hidden)
    if not stable:
        hidden = encoder.layer_norm(hidden)
    hidden = encoder.dropout(hidden)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    visible = allowed(positions, positions, left)
    bias = relative_bias(encoder.layers[0].attention, positions, positions) if wavlm else None
    empty = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[2])
    layerdrop = float(getattr(config, "layerdrop", 0.0))
    for i, layer in enumerate(encoder.layers):
        if training and i > 0 and layerdrop > 0 and torch.rand([]) < layerdrop:
            continue  # HF's LayerDrop
        if stable:
            a, _, _ = attend(layer.attention, layer.layer_norm(hidden), empty, empty, visible,
                             bias, heads, training)
            hidden = hidden + layer.dropout(a)
            hidden = hidden + layer.feed_forward(layer.final_layer_norm(hidden))
        else:
            a, _, _ = attend(layer.attention, hidden, empty, empty, visible, bias, heads, training)
            hidden = layer.layer_norm(hidden + layer.dropout(a))
            hidden = layer.final_layer_norm(hidden + layer.feed_forward(hidden))
    if stable:
        hidden = encoder.layer_norm(hidden)
    return hidden
