"""Attribute heads: small classifiers on the audio side (e.g. GEmo-CLAP's gender head)."""

from __future__ import annotations

import torch
from torch import nn

from clapedge.models.config import HeadConfig


class AttributeHeads(nn.Module):
    """One Linear per head, fed the pooled audio features or the normalised embedding."""

    def __init__(self, heads: list[HeadConfig], pooled_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.inputs = {h.name: h.input for h in heads}
        self.labels = {h.name: list(h.labels) for h in heads}
        self.layers = nn.ModuleDict({
            h.name: nn.Linear(pooled_dim if h.input == "audio_pooled" else embed_dim, len(h.labels))
            for h in heads
        })

    def forward(self, pooled: torch.Tensor, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        sources = {"audio_pooled": pooled, "audio_embedding": embedding}
        return {name: layer(sources[self.inputs[name]]) for name, layer in self.layers.items()}
