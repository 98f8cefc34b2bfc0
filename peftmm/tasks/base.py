"""What every task provides: a head, how a batch runs through the model, loss, metrics, decoding.

Most tasks (VQA, classification, retrieval) read one fused vector per example: the default
:meth:`Task.forward` encodes both towers, fuses them and applies the head. A task that needs
another path through the model (captioning feeds vision tokens into a decoder LM) overrides it.
"""

from __future__ import annotations

import torch


class Task:
    registry_name: str          # set by TASKS.register
    Config: type
    primary_metric: str         # what early stopping and the model card lead with
    fusions: tuple[str, ...] | None = None  # fusion types the task can read; None: any
    # Under several processes (distributed.batch_loss): a loss where each example's term depends
    # on the others' outputs (contrastive) is computed over the gathered batch; any other is a
    # mean over loss_units(targets) and is reweighted by each process's share of them.
    loss_spans_batch: bool = False

    def __init__(self, config, labels: list[str]):
        self.config = config
        self.labels = list(labels)

    def build_head(self, in_dim: int) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Refuse task settings that do not fit the rest of the recipe (RecipeError)."""

    def prepare(self, model, examples: list[dict], batcher, device, progress: bool = False) -> None:
        """Once before training, with the train examples (after feature caching): a task that
        keeps state built from the data (captioning's caption memory) builds it here."""

    def finish(self, model, examples: list[dict], batcher, device, progress: bool = False) -> None:
        """Once after training, with the best weights loaded and the train examples, before the
        test split is evaluated and the bundle saved (retrieval's pair memory is built here)."""

    def prepare_shapes(self, model, examples: list[dict]) -> None:
        """What ``prepare`` builds, in shape only, encoding nothing (peftmm plan's meta model)."""

    def memory_tensors(self) -> dict[str, torch.Tensor]:
        """Non-trainable tensors the task built in ``prepare`` or ``finish``; bundles store them as
        ``memory.*``."""
        return {}

    def load_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``memory_tensors`` gave (from a bundle)."""

    def forward(self, model, batch: dict) -> torch.Tensor:
        # The batcher encodes each distinct image and text once; *_index maps examples to them.
        vision, vision_mask = model.encode("vision", batch)
        text, text_mask = model.encode("text", batch)
        vi, ti = batch["image_index"], batch["text_index"]
        return model.head(model.fusion(vision[vi], vision_mask[vi], text[ti], text_mask[ti]))

    def text_of(self, example: dict) -> str:
        """The text the text tower reads for an example (a task may fix it, see classification)."""
        return example["text"]

    def targets(self, examples: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_units(self, targets: torch.Tensor) -> int | torch.Tensor:
        """How many terms ``loss`` averages over: one per example unless a task says otherwise."""
        return len(targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Over a whole split: ``outputs`` and ``targets`` of all its examples, in order."""
        raise NotImplementedError

    def decode(self, outputs: torch.Tensor) -> list[dict]:
        raise NotImplementedError

    def generate_text(self, model, batch: dict, options=None, streams=None):
        """For a task that writes text with its text tower as a causal LM (``text_tower_causal_lm``):
        generate for the rows of ``batch`` under ``options`` (a GenerationOptions; None: the
        bundle's own settings), sending each row's new text to ``streams[row]`` where given, and
        return a :class:`~peftmm.generation.Generated` whose ``ids`` ``decode`` reads. The whole
        contract, which the runtime and the OpenAI-compatible API rely on, is in generation.py."""
        raise NotImplementedError(f"task {self.registry_name} answers without generating text")
