"""Shared test steps: build a model from a recipe dict, overfit one batch, compare outputs,
perturb the trainable weights, keep torch's random state."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from peftmm import recipe_from_dict
from peftmm.batching import Batcher
from peftmm.data import load_splits
from peftmm.model import MultimodalModel


def build(recipe_dict: dict):
    recipe = recipe_from_dict(recipe_dict)
    splits = load_splits(recipe.data)
    model = MultimodalModel.build(recipe, splits.labels)
    return recipe, model, splits


def batch_of(model, examples) -> dict:
    return Batcher(model)(examples)


def overfit(model, batch, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """Train on one batch; returns the loss before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.task.loss(model(batch), batch["labels"])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(batch)


@torch.no_grad()
def perturb(model, scale: float = 0.05) -> None:
    """Add Gaussian noise of std ``scale`` to every trainable tensor. LoRA's B and the adapters'
    up-projections start at zero: without this a wrong load, slot or adapter would not show."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * scale)


@contextmanager
def torch_rng_kept():
    """Restore torch's global random state on exit, so that later tests' seeded expectations do
    not depend on whether the code inside ran (conftest's ``keep_torch_rng`` fixtures use it)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)
