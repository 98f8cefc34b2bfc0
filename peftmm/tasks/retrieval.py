"""Cross-modal retrieval: images and texts in one space, trained with symmetric InfoNCE.

The fusion (``dual-projection``) gives each example ``[image embedding, text embedding]``,
L2-normalised. The head holds CLIP's learnable temperature: it multiplies both halves by
``sqrt(exp(logit_scale))``, so a plain dot product of the outputs is ``scale * cosine``, the
InfoNCE logit. Within a batch each image's positive is its own example's text and every other
text is a negative (and the other way round). Recall@K is computed over a whole split: each
image against every text of the split, each text against every image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from . import TASKS
from .base import Task

RECALL_AT = (1, 5, 10)


class Temperature(nn.Module):
    def __init__(self, initial: float, maximum: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / initial)))
        self.max_log = math.log(maximum)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log).exp()  # CLIP caps the scale at 100

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings * self.scale().sqrt()


def split_embeddings(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = outputs.shape[-1] // 2
    return outputs[..., :half], outputs[..., half:]


@TASKS.register("retrieval")
class RetrievalTask(Task):
    primary_metric = "mean_recall"  # the mean of R@1/5/10 both ways: steadier than one R@1
    fusions = ("dual-projection",)   # independent image and text embeddings
    loss_spans_batch = True          # every other example of the batch is a negative

    @dataclass
    class Config:
        temperature: float = field(default=0.07, metadata={"gt": 0.0, "max": 1.0})
        max_scale: float = field(default=100.0, metadata={"gt": 1.0})

    def build_head(self, in_dim: int) -> nn.Module:
        return Temperature(self.config.temperature, self.config.max_scale)

    def targets(self, examples: list[dict]) -> torch.Tensor:
        return torch.arange(len(examples))  # each example's positive is itself

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images, texts = split_embeddings(outputs.float())
        logits = images @ texts.T
        positives = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, positives) + F.cross_entropy(logits.T, positives)) / 2

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        images, texts = split_embeddings(outputs.float())
        similarity = images @ texts.T
        out = {}
        for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
            # rank of the positive = how many candidates score strictly higher
            rank = (scores > scores.diagonal().unsqueeze(1)).sum(1)
            for k in RECALL_AT:
                out[f"{direction}_r{k}"] = (rank < k).float().mean().item()
        out["mean_recall"] = sum(out.values()) / len(out)
        return out

    def decode(self, outputs: torch.Tensor) -> list[dict]:
        """Per example: the cosine similarity of its image and its text."""
        images, texts = split_embeddings(outputs.float())
        cosine = F.cosine_similarity(images, texts, dim=-1)
        return [{"similarity": round(c, 6)} for c in cosine.tolist()]
