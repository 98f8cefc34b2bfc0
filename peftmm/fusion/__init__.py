"""Fusion adapters: trainable modules that link the vision and text towers.

Each takes token sequences from both towers and returns one vector per example
(``out_dim`` wide) for the task head. Registered by name in FUSIONS.
"""

from __future__ import annotations

import torch

from ..registry import Registry

FUSIONS = Registry("fusion")


def build_fusion(config, vision_dim: int, text_dim: int):
    return FUSIONS.get(config.type)(config, vision_dim, text_dim)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


from . import concat_mlp, dual_projection, gated_cross_attention, projector  # noqa: E402,F401  (each registers itself)
