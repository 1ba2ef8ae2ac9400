"""The audio tower: raw 16 kHz waveform [B, T] + valid lengths -> pooled features [B, H].

We drive the HF backbone's parts ourselves (conv front end, feature projection, encoder)
instead of calling its ``forward`` for two reasons:

* padding: the frame mask comes from the conv length formula (what HF's
  ``_get_feature_vector_attention_mask`` computes for right-padded input) written with
  ``arange < length`` so it exports to ONNX without scatter ops; and Base-size models'
  GroupNorm front end (``feat_extract_norm="group"``) normalises each channel over time, so
  zero padding would change every frame. We normalise over the valid frames only, which is
  exactly GroupNorm for an unpadded clip, so a clip gives the same embedding alone or padded.
* no training-only paths (SpecAugment) and no data-dependent Python control flow.
"""

from __future__ import annotations

import torch
from torch import nn

from clapedge.models import causal
from clapedge.models.backbones import build_backbone
from clapedge.models.config import AudioTowerConfig
from clapedge.models.pooling import build_pooling


def conv_output_lengths(lengths: torch.Tensor, kernels: list[int], strides: list[int]) -> torch.Tensor:
    """Frames produced by un-padded 1-D convs: floor((L - k) / s) + 1 per layer."""
    for kernel, stride in zip(kernels, strides):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def length_mask(lengths: torch.Tensor, size: int | torch.Tensor) -> torch.Tensor:
    """[B, size] bool, True for positions < length (right padding)."""
    positions = torch.arange(size, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def masked_standardize(wave: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Zero mean, unit variance over valid samples (HF feature extractor ``do_normalize``)."""
    weights = mask.to(wave.dtype)
    count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (wave * weights).sum(dim=1, keepdim=True) / count
    var = (((wave - mean) * weights) ** 2).sum(dim=1, keepdim=True) / count
    return (wave - mean) / torch.sqrt(var + eps) * weights


def masked_group_norm(x: torch.Tensor, mask: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm over [B, C, F] whose statistics use only the valid frames of ``mask`` [B, F]."""
    batch, channels, frames = x.shape
    groups = norm.num_groups
    grouped = x.reshape(batch, groups, channels // groups, frames)
    weights = mask.to(x.dtype).reshape(batch, 1, 1, frames)
    count = (weights.sum(dim=3, keepdim=True) * (channels // groups)).clamp(min=1.0)
    mean = (grouped * weights).sum(dim=(2, 3), keepdim=True) / count
    var = (((grouped - mean) * weights) ** 2).sum(dim=(2, 3), keepdim=True) / count
    normed = ((grouped - mean) / torch.sqrt(var + norm.eps)).reshape(batch, channels, frames)
    if norm.affine:
        normed = normed * norm.weight.reshape(1, -1, 1) + norm.bias.reshape(1, -1, 1)
    return normed


class MaskedConvStack(nn.Module):
    """data2vec-audio's positional embedding is a stack of convs; HF zeroes padded frames only
    before the first, so from the second on the valid frames near the end would see non-zero
    padding (a clip would embed differently alone and in a batch). Re-zeroing after every layer
    gives each layer what it sees for the clip alone. Keeps HF's ``layers`` (same weights and
    state-dict keys); the tower sets ``frame_mask`` around each encoder call."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers
        self.frame_mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.transpose(1, 2)
        keep = None if self.frame_mask is None else self.frame_mask.to(hidden.dtype).unsqueeze(1)
        for layer in self.layers:
            hidden = layer(hidden)
            if keep is not None:
                hidden = hidden * keep
        return hidden.transpose(1, 2)


class AudioTower(nn.Module):
    """``base`` is the HF backbone (name kept from the seed checkpoints: audio_branch.base.*)."""

    def __init__(self, cfg: AudioTowerConfig) -> None:
        super().__init__()
        self.base = build_backbone(cfg.backbone, cfg.backbone_config, audio=True)
        self.pooling = build_pooling(cfg.pooling, self.hidden_size)
        self.normalize_waveform = cfg.normalize_waveform
        self.causal_context = cfg.causal_context
        self.kernels = list(self.base.config.conv_kernel)
        self.strides = list(self.base.config.conv_stride)
        if cfg.backbone == "data2vec-audio":
            encoder = self.base.encoder
            encoder.pos_conv_embed = MaskedConvStack(encoder.pos_conv_embed.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.base.config.hidden_size)

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(sample_lengths, self.kernels, self.strides)

    def _conv_features(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = wave.unsqueeze(1)
        for i, layer in enumerate(self.base.feature_extractor.conv_layers):
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, nn.GroupNorm):
                hidden = layer.conv(hidden)
                valid = conv_output_lengths(lengths, self.kernels[: i + 1], self.strides[: i + 1])
                hidden = masked_group_norm(hidden, length_mask(valid, hidden.shape[-1]), norm)
                hidden = layer.activation(hidden)
            else:
                hidden = layer(hidden)
        return hidden.transpose(1, 2)

    def _encode(self, projected: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """The HF encoder; it zeroes padded frames before the positional conv and masks them
        as attention keys. A data2vec conv stack gets the mask for the duration of the call."""
        if self.causal_context is not None:
            return causal.encode(self.base.encoder, self.base.config, projected, frame_mask,
                                 self.causal_context)
        pos_conv = self.base.encoder.pos_conv_embed
        stack = pos_conv if isinstance(pos_conv, MaskedConvStack) else None
        if stack is not None:
            stack.frame_mask = frame_mask
        try:
            return self.base.encoder(projected, attention_mask=frame_mask)[0]
        finally:
            if stack is not None:
                stack.frame_mask = None

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled [B, H], frame mask [B, F]) for waves right-padded past ``lengths``."""
        sample_mask = length_mask(lengths, wave.shape[1])
        # Zeroed padding: whatever the caller padded with, the valid frames never see it.
        wave = wave * sample_mask.to(wave.dtype)
        if self.normalize_waveform:
            wave = masked_standardize(wave, sample_mask)
        features = self._conv_features(wave, lengths)
        frame_mask = length_mask(self.frame_lengths(lengths), features.shape[1])
        projected = self.base.feature_projection(features)
        if isinstance(projected, tuple):  # wav2vec2/WavLM also return the normed features
            projected = projected[0]
        hidden = self._encode(projected, frame_mask)
        return self.pooling(hidden, frame_mask), frame_mask
