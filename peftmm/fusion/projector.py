"""LLaVA's projector: vision tokens mapped into a decoder LM's input-embedding space.

The projected tokens are a prefix of the LM's prompt (see tasks/captioning/task.py), so unlike the
other fusions it returns a token sequence ``[B, N, text_dim]`` with its mask, not one vector per
example. The MLP is LLaVA-1.5's ``mlp2x_gelu`` (Linear, GELU, Linear); ``layers: 1`` gives the
linear projector of the first LLaVA. ``max_tokens`` average-pools the vision tokens, in their
order, down to at most that many first, which keeps the LM's sequences short (a MobileNetV2 at
224 px gives 49 tokens, a ViT-B/16 196).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PeftmmError
from ..schema import MAX_WIDTH
from . import FUSIONS


@FUSIONS.register("projector")
class ProjectorFusion(nn.Module):
    yields_tokens = True  # a prefix for a decoder LM, not a vector for a head

    @dataclass
    class Config:
        layers: int = field(default=2, metadata={"min": 1, "max": 2})  # 2: mlp2x_gelu, 1: linear
        # MLP width; None: the LM's width
        hidden: int | None = field(default=None, metadata={"min": 8, "max": MAX_WIDTH})
        max_tokens: int | None = field(default=None, metadata={"min": 1, "max": 4096})  # None: keep all
        input_norm: bool = True   # LayerNorm on the vision features first (their scale varies by tower)
        dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})

    def __init__(self, config, vision_dim: int, text_dim: int):
        super().__init__()
        self.max_tokens = config.max_tokens
        hidden = config.hidden or text_dim
        self.norm = nn.LayerNorm(vision_dim) if config.input_norm else nn.Identity()
        if config.layers == 1:
            self.mlp = nn.Sequential(nn.Linear(vision_dim, text_dim), nn.Dropout(config.dropout))
        else:
            self.mlp = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Dropout(config.dropout),
                                     nn.Linear(hidden, text_dim))
        self.out_dim = text_dim

    def forward(self, vision: torch.Tensor, vision_mask: torch.Tensor, text=None, text_mask=None):
        """``[B, N, Dv]`` vision tokens and their mask -> ``[B, N', text_dim]`` and mask, N' <= max_tokens."""
        if text is not None:
            raise PeftmmError("fusion 'projector' feeds vision tokens to a decoder LM (task: captioning); "
                              "for a task that reads one vector per example use concat-mlp or gated-cross-attention")
        vision, vision_mask = pool_tokens(vision, vision_mask, self.max_tokens)
        return self.mlp(self.norm(vision)), vision_mask


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor, max_tokens: int | None):
    """Average runs of neighbouring tokens (adaptive pooling over the token axis) so that at most
    ``max_tokens`` remain; masked tokens take no part, and a run of only masked tokens is masked."""
    if max_tokens is None or tokens.shape[1] <= max_tokens:
        return tokens, mask
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    summed = F.adaptive_avg_pool1d((tokens * weights).transpose(1, 2), max_tokens).transpose(1, 2)
    share = F.adaptive_avg_pool1d(weights.transpose(1, 2), max_tokens).transpose(1, 2)
    return summed / share.clamp(min=1e-6), share.squeeze(-1) > 0
