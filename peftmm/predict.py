"""Inference on a saved bundle: predict one example, or evaluate a split."""

from __future__ import annotations

from pathlib import Path

import torch

from .batching import Batcher
from .bundle import CONFIG, load_bundle
from .data import load_splits
from .errors import BundleError


def resolve_bundle(path: str | Path) -> Path:
    """A bundle folder, a run directory (its ``bundle/``), or a name under ./adapters/."""
    path = Path(path)
    for candidate in (path, path / "bundle", Path("adapters") / path):
        if (candidate / CONFIG).is_file():
            return candidate
    raise BundleError("no adapter bundle here (expected adapter_config.json in it, in its bundle/, "
                      "or a bundle of that name under ./adapters)", str(path))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    def __init__(self, model, recipe, config, device):
        self.model, self.recipe, self.config, self.device = model, recipe, config, device
        self.batcher = Batcher(model)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, merge: bool = False) -> "Predictor":
        """``merge=True`` folds LoRA into non-quantised backbones: same answers, faster calls."""
        device = device or default_device()
        model, recipe, config = load_bundle(resolve_bundle(path), device=device)
        if merge:
            model.merge_methods()
        return cls(model, recipe, config, device)

    @torch.no_grad()
    def predict_batch(self, examples: list[dict]) -> list[dict]:
        batch = {k: v.to(self.device) for k, v in self.batcher(examples).items()}
        return self.model.task.decode(self.model(batch))

    def predict(self, image: str | Path, question: str) -> dict:
        return self.predict_batch([{"image": str(image), "text": question}])[0]


def evaluate_bundle(path: str | Path, split: str = "test", batch_size: int = 256, progress: bool = True,
                    device: str | None = None, max_samples: int | None = None) -> dict:
    from .trainer import evaluate

    predictor = Predictor.load(path, device)
    spec = predictor.recipe.data
    examples = load_splits(spec)[split]
    if max_samples:
        examples = examples[:max_samples]
    return evaluate(predictor.model, examples, predictor.batcher, batch_size, predictor.device,
                    progress=progress, desc=split) | {"examples": len(examples)}
