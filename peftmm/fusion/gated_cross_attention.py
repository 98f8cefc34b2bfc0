"""Gated cross-attention (Flamingo-style): text tokens attend to vision tokens.

Each block adds ``tanh(gate) * cross_attention`` and ``tanh(gate) * feed_forward`` to the text
stream, with the gates starting at zero: before training the fused output is exactly the
unimodal features, and the model learns how much of the token-level interaction to let in.

The output is ``[text, vision, text * vision]`` over the pooled streams: the element-wise
product (the classic VQA bilinear pooling) lets the head match a word to a visual property
directly, which a concatenation alone must learn through the head's layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..schema import MAX_HEADS, MAX_WIDTH
from . import FUSIONS, masked_mean


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, text, vision, vision_mask):
        attended, _ = self.attn(self.attn_norm(text), vision, vision, key_padding_mask=~vision_mask, need_weights=False)
        text = text + torch.tanh(self.attn_gate) * attended
        return text + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(text))


@FUSIONS.register("gated-cross-attention")
class GatedCrossAttentionFusion(nn.Module):
    @dataclass
    class Config:
        dim: int = field(default=256, metadata={"min": 8, "max": MAX_WIDTH})
        heads: int = field(default=4, metadata={"min": 1, "max": MAX_HEADS})
        layers: int = field(default=1, metadata={"min": 1, "max": 24})
        dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 0.9})

        def validate(self):
            if self.dim % self.heads:
                raise ValueError(f"dim = {self.dim} must be divisible by heads = {self.heads}")

    def __init__(self, config, vision_dim: int, text_dim: int):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, config.dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, config.dim))
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(config.dim, config.heads, config.dropout)
                                    for _ in range(config.layers))
        self.out_dim = 3 * config.dim

    def forward(self, vision, vision_mask, text, text_mask):
        vision = self.vision_proj(vision)
        text = self.text_proj(text)
        for block in self.blocks:
            text = block(text, vision, vision_mask)
        text, vision = masked_mean(text, text_mask), masked_mean(vision, vision_mask)
        return torch.cat([text, vision, text * vision], dim=-1)
