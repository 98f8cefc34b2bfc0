"""The simple baseline: pool each tower, concatenate, one MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..schema import MAX_WIDTH
from . import FUSIONS, masked_mean


@FUSIONS.register("concat-mlp")
class ConcatMLPFusion(nn.Module):
    @dataclass
    class Config:
        dim: int = field(default=512, metadata={"min": 8, "max": MAX_WIDTH})
        dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 0.9})

    def __init__(self, config, vision_dim: int, text_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(vision_dim + text_dim), nn.Linear(vision_dim + text_dim, config.dim),
                                 nn.GELU(), nn.Dropout(config.dropout))
        self.out_dim = config.dim

    def forward(self, vision, vision_mask, text, text_mask):
        return self.mlp(torch.cat([masked_mean(vision, vision_mask), masked_mean(text, text_mask)], dim=-1))
