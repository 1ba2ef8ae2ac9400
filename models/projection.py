"""Projections from pooled backbone features to the shared embedding space.

Submodule names follow the seed checkpoints (ParaSpeechCLAP / ParaCLAP ``Projection``:
``linear1``, ``linear2``, ``layer_norm``) so their state dicts load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clapedge.models.config import ProjectionConfig


def _activation(name: str):
    # exact (erf) GELU, as F.gelu's default and the seeds use
    return F.gelu if name == "gelu" else F.relu


class LinearProjection(nn.Module):
    def __init__(self, d_in: int, cfg: ProjectionConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, cfg.out_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(x))


class MlpProjection(nn.Module):
    """Linear -> activation -> dropout -> Linear (GEmo-CLAP: ReLU, 512)."""

    def __init__(self, d_in: int, cfg: ProjectionConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_dim or cfg.out_dim
        self.linear1 = nn.Linear(d_in, hidden)
        self.linear2 = nn.Linear(hidden, cfg.out_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.drop(self.act(self.linear1(x))))


class ResidualProjection(nn.Module):
    """ParaSpeechCLAP's block: e1 = W1 x; out = LayerNorm(e1 + Dropout(W2 act(e1)))."""

    def __init__(self, d_in: int, cfg: ProjectionConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, cfg.out_dim, bias=False)
        self.linear2 = nn.Linear(cfg.out_dim, cfg.out_dim, bias=False)
        self.layer_norm = nn.LayerNorm(cfg.out_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.linear1(x)
        e2 = self.drop(self.linear2(self.act(e1)))
        return self.layer_norm(e1 + e2)


def build_projection(d_in: int, cfg: ProjectionConfig) -> nn.Module:
    kinds = {"linear": LinearProjection, "mlp": MlpProjection, "residual": ResidualProjection}
    return kinds[cfg.kind](d_in, cfg)
