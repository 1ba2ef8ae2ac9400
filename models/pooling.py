"""Pooling a sequence of frame/token states [B, T, H] to one vector per item [B, H].

Every pooling takes the boolean validity mask [B, T] (True = real frame/token) so the towers
call them the same way; ``mean`` ignores it on purpose (see ``MeanPooling``). No data-dependent
Python branches: the same code traces to ONNX with dynamic B and T.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedMeanPooling(nn.Module):
    """Mean over valid positions: an item gives the same vector alone or padded in a batch."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        # clamp: an all-padding row yields zeros instead of NaN (inputs are validated upstream)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeanPooling(nn.Module):
    """Mean over all positions, padding included: the semantics ParaCLAP and pre-fix
    ParaSpeechCLAP checkpoints were trained with. Only batch-invariant for unpadded input."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        del mask
        return hidden.mean(dim=1)


class FirstPooling(nn.Module):
    """The first position: CLS / <s> for text towers."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        del mask
        return hidden[:, 0]


class AttentionPooling(nn.Module):
    """Softmax-weighted mean over valid positions, scored against one learned query."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.scale = dim ** -0.5

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(hidden, self.query) * self.scale
        # finfo.min, not -inf: an all-padding row stays finite, and fp16 export keeps working
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (hidden * weights).sum(dim=1)


def build_pooling(kind: str, dim: int) -> nn.Module:
    if kind == "masked_mean":
        return MaskedMeanPooling()
    if kind == "mean":
        return MeanPooling()
    if kind == "first":
        return FirstPooling()
    if kind == "attention":
        return AttentionPooling(dim)
    raise ValueError(f"unknown pooling {kind!r}")  # configs are validated before this
