"""Helpers on the dicts of tensors that batchers, towers and tasks pass around.

A module of the lowest layer (it imports nothing of peftmm), so towers, tasks and the trainer
share one spelling of each helper instead of repeating the comprehension.
"""

from __future__ import annotations


def to_device(batch: dict, device) -> dict:
    """``batch`` with every tensor moved to ``device`` (a batch, tokenizer output or model inputs)."""
    return {k: v.to(device) for k, v in batch.items()}
