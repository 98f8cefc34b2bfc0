"""Tasks that answer with one of a data set's labels: a classifier head over the fused vector.

VQA (the answers are the labels) and classification (a label per image) share the head, loss,
metrics (accuracy, macro-F1) and decoding (the top-k labels with probabilities) written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DataError
from ..schema import MAX_WIDTH
from .base import Task


class LabelTask(Task):
    primary_metric = "accuracy"
    classifies_into_labels = True

    @dataclass
    class Config:
        hidden: int = field(default=256, metadata={"min": 1, "max": MAX_WIDTH})
        dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 0.9})
        top_k: int = field(default=5, metadata={"min": 1, "max": 1000})

    def __init__(self, config, labels: list[str]):
        super().__init__(config, labels)
        self.label_index = {label: i for i, label in enumerate(self.labels)}

    def build_head(self, in_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(in_dim, self.config.hidden), nn.GELU(), nn.Dropout(self.config.dropout),
                             nn.Linear(self.config.hidden, len(self.labels)))

    def targets(self, examples) -> torch.Tensor:
        try:
            return torch.tensor([self.label_index[e["label"]] for e in examples])
        except KeyError as e:
            raise DataError(f"answer {e.args[0]!r} is not one of the task's {len(self.labels)} answers") from None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        predicted = outputs.argmax(-1)
        return {"accuracy": (predicted == targets).float().mean().item(),
                "macro_f1": macro_f1(predicted, targets, len(self.labels))}

    def decode(self, logits: torch.Tensor) -> list[dict]:
        """Per example: the answer and the top-k answers with probabilities."""
        return top_answers(logits.float().softmax(-1), self.labels, self.config.top_k)


def top_answers(probs: torch.Tensor, names: list[str], top_k: int) -> list[dict]:
    """Per row of ``probs`` (one column per name): the likeliest name and the top-k with scores."""
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [{"answer": names[idx[0]], "scores": [{"answer": names[i], "score": round(p, 6)} for p, i in zip(ps, idx)]}
            for ps, idx in zip(top.values.tolist(), top.indices.tolist())]


def macro_f1(predicted: torch.Tensor, targets: torch.Tensor, classes: int) -> float:
    """F1 per class, averaged over the classes that occur in the targets or the predictions."""
    scores = []
    for c in range(classes):
        tp = ((predicted == c) & (targets == c)).sum().item()
        fp = ((predicted == c) & (targets != c)).sum().item()
        fn = ((predicted != c) & (targets == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
