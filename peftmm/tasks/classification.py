"""Image(-text) classification into a data set's labels, e.g. the Unicode group of an emoji.

The head, loss and metrics (accuracy, macro-F1) of every label task (labels.py), as VQA's. With a
``prompt``, every example's text is that fixed prompt, so the label is read from the image
alone (the setup of a linear probe on image features); without one, from image and text.

``parent_labels: true`` reads labels as ``"parent > child"`` paths (emoji: ``data.label:
group > subgroup``): the head is trained on the children, the finer task, and answers, metrics
and early stopping are on the parents, each parent's probability the sum of its children's. The
finer labels give the few training images of a parent more to tell apart: on the emoji groups
even a logistic probe on frozen image features gains from them (bench/emoji_baselines.py,
README "Results on emoji").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError
from . import TASKS
from .labels import LabelTask, macro_f1, top_answers

SEPARATOR = " > "


@TASKS.register("classification")
class ClassificationTask(LabelTask):
    pipeline_tag = "image-classification"

    @dataclass
    class Config(LabelTask.Config):
        prompt: str | None = None  # a fixed text for every example: classify the image alone
        parent_labels: bool = False  # labels are "parent > child": train on children, answer parents

    def __init__(self, config, labels: list[str]):
        super().__init__(config, labels)
        if config.parent_labels:
            flat = [label for label in self.labels if SEPARATOR not in label]
            if flat:
                raise DataError(f"task.parent_labels: label {flat[0]!r} is not a 'parent{SEPARATOR}child' path "
                                f"({len(flat)} of {len(self.labels)} labels are not)")
            parents = [label.split(SEPARATOR, 1)[0] for label in self.labels]
            self.parents = sorted(set(parents))
            self.parent_of = torch.tensor([self.parents.index(p) for p in parents])

    @classmethod
    def predict_arguments(cls, config: dict) -> str:
        # with a prompt the image alone is classified; without one, the image with its text
        return "" if config.get("prompt") is not None else " --text 'the text that goes with the image'"

    def text_of(self, example: dict) -> str:
        return self.config.prompt if self.config.prompt is not None else example["text"]

    def _parent_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        index = self.parent_of.to(probs.device)
        return probs.new_zeros(len(probs), len(self.parents)).index_add_(1, index, probs)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        if not self.config.parent_labels:
            return super().metrics(outputs, targets)
        predicted = self._parent_probabilities(outputs).argmax(-1)
        truth = self.parent_of.to(targets.device)[targets]
        fine = super().metrics(outputs, targets)
        return {"accuracy": (predicted == truth).float().mean().item(),
                "macro_f1": macro_f1(predicted, truth, len(self.parents)),
                "child_accuracy": fine["accuracy"], "child_macro_f1": fine["macro_f1"]}

    def decode(self, logits: torch.Tensor) -> list[dict]:
        """Per example: the parent answer and the top-k parents, plus the most likely child."""
        if not self.config.parent_labels:
            return super().decode(logits)
        out = top_answers(self._parent_probabilities(logits), self.parents, self.config.top_k)
        for row, child in zip(out, logits.argmax(-1).tolist()):
            row["child"] = self.labels[child].split(SEPARATOR, 1)[1]
        return out
