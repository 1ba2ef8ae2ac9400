"""The text tower: token ids [B, L] + attention mask [B, L] -> pooled features [B, H]."""

from __future__ import annotations

import torch
from torch import nn

from clapedge.models.backbones import build_backbone
from clapedge.models.config import TextTowerConfig
from clapedge.models.pooling import build_pooling


class TextTower(nn.Module):
    """``base`` is the HF backbone (name kept from the seed checkpoints: text_branch.base.*).

    A frozen tower runs its backbone without gradient and always in eval mode, so training
    the projection on top of it (ParaCLAP's detached CLS, the default model's MiniLM) does not
    switch the backbone's dropout on.
    """

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        self.base = build_backbone(cfg.backbone, cfg.backbone_config, audio=False)
        self.pooling = build_pooling(cfg.pooling, self.hidden_size)
        self.frozen = cfg.freeze
        if self.frozen:
            self.base.requires_grad_(False)
            self.base.eval()

    @property
    def hidden_size(self) -> int:
        return int(self.base.config.hidden_size)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if self.frozen:
            self.base.eval()
        return self

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.base(input_ids=input_ids, attention_mask=attention_mask)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                hidden = self._hidden(input_ids, attention_mask)
        else:
            hidden = self._hidden(input_ids, attention_mask)
        return self.pooling(hidden, attention_mask.bool())
