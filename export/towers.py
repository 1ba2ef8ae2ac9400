"""The two towers as traceable modules with the bundle's I/O names (runtime/manifest.py)."""

from __future__ import annotations

import torch
from torch import nn


class AudioGraph(nn.Module):
    """(waveform [B, T], attention_mask [B, T]) -> (embedding [B, D], head_<name>...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head_names = [h.name for h in model.config.heads]

    def forward(self, waveform: torch.Tensor, attention_mask: torch.Tensor):
        encoding = self.model.encode_audio(waveform, attention_mask)
        if not self.head_names:
            return encoding.embedding
        logits = self.model.heads(encoding.pooled, encoding.embedding)
        return (encoding.embedding, *[logits[name] for name in self.head_names])


class TextGraph(nn.Module):
    """(input_ids [B, L], attention_mask [B, L]) -> embedding [B, D]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.embed_text(input_ids, attention_mask)
