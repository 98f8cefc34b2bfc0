"""Dual projection: no cross-talk between the towers, each pooled and projected into one space.

The fusion for contrastive tasks (retrieval, zero-shot classification): the image and the text
of an example are embedded independently, so a text can be scored against any image. Output is
``[image embedding, text embedding]`` side by side, each L2-normalised; the task head scales
them (see tasks/retrieval/task.py).

``text_projection: false`` keeps the text side locked: a text's embedding is the text tower's
own mean-pooled output, and only the image side learns to map into that space (LiT's locked
tower, on the text side). Trained on a few thousand pairs, a text projection bends the sentence
space around the training captions; without one, a caption never seen in training keeps the
place the text model gives it, next to the captions it resembles. Measured on the emoji family
split by bench/emoji_tasks.py, into bench/results/emoji_tasks.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..schema import MAX_WIDTH
from . import FUSIONS, masked_mean


def _projection(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@FUSIONS.register("dual-projection")
class DualProjection(nn.Module):
    @dataclass
    class Config:
        dim: int = field(default=256, metadata={"min": 8, "max": MAX_WIDTH})
        projection: Literal["linear", "mlp"] = "linear"  # linear heads were 3 points better (NOTES)
        text_projection: bool = True   # false: texts stay in the text tower's space (dim = its width)

    def __init__(self, config, vision_dim: int, text_dim: int):
        super().__init__()
        dim = config.dim if config.text_projection else text_dim
        self.vision_proj = _projection(vision_dim, dim, config.projection)
        self.text_proj = _projection(text_dim, dim, config.projection) if config.text_projection else nn.Identity()
        self.out_dim = 2 * dim

    def embed_images(self, vision, vision_mask) -> torch.Tensor:
        return F.normalize(self.vision_proj(masked_mean(vision, vision_mask)), dim=-1)

    def embed_texts(self, text, text_mask) -> torch.Tensor:
        return F.normalize(self.text_proj(masked_mean(text, text_mask)), dim=-1)

    def forward(self, vision, vision_mask, text, text_mask):
        return torch.cat([self.embed_images(vision, vision_mask), self.embed_texts(text, text_mask)], dim=-1)
