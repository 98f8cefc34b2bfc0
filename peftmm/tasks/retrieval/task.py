"""Cross-modal retrieval: images and texts in one space, trained with symmetric InfoNCE.

The fusion (``dual-projection``) gives each example ``[image embedding, text embedding]``,
L2-normalised. The head holds CLIP's learnable temperature: it multiplies both halves by
``sqrt(exp(logit_scale))``, so a plain dot product of the outputs is ``scale * cosine``, the
InfoNCE logit. Within a batch each image's positive is its own example's text and every other
text is a negative (and the other way round). Recall@K is computed over a whole split: each
image against every text of the split, each text against every image.

With ``memory_neighbours: K`` a trained model also scores an image and a text through the
training pairs (memory.py): after training, the best weights embed every training pair,
and the similarity becomes ``(1 - memory_weight) * cosine + memory_weight * bridge``. Training and
the validation that picks the best epoch use the plain cosine (the memory does not exist yet);
the test split, ``eval``, ``predict`` and zero-shot labels use the mixed one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...errors import DataError
from ...tensors import to_device
from .. import TASKS
from ..base import Task
from .memory import PairMemory

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


def recall_metrics(similarity: torch.Tensor) -> dict[str, float]:
    """Recall@K both ways from an ``[N, N]`` image-by-text similarity whose diagonal holds the pairs."""
    out = {}
    for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
        # rank of the positive = how many candidates score strictly higher
        rank = (scores > scores.diagonal().unsqueeze(1)).sum(1)
        for k in RECALL_AT:
            out[f"{direction}_r{k}"] = (rank < k).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


@TASKS.register("retrieval")
class RetrievalTask(Task):
    primary_metric = "mean_recall"  # the mean of R@1/5/10 both ways: steadier than one R@1
    fusions = ("dual-projection",)   # independent image and text embeddings
    loss_spans_batch = True          # every other example of the batch is a negative
    targets_need_labels = False      # each example's positive is its own text: no label needed
    ranks_texts = True               # an image against one text per label: zero-shot labels
    text_noun = "caption"
    pipeline_tag = "zero-shot-image-classification"

    @dataclass
    class Config:
        temperature: float = field(default=0.07, metadata={"gt": 0.0, "max": 1.0})
        max_scale: float = field(default=100.0, metadata={"gt": 1.0})
        # The training pairs as a bridge (memory.py): how many nearest training texts (and
        # images) a text (an image) is scored through, 0: none; the softmax temperature over their
        # cosines; the bridge's share of the similarity.
        memory_neighbours: int = field(default=0, metadata={"min": 0, "max": 1024})
        memory_temperature: float = field(default=0.05, metadata={"gt": 0.0, "max": 10.0})
        memory_weight: float = field(default=0.7, metadata={"min": 0.0, "max": 1.0})

    def __init__(self, config, labels: list[str]):
        super().__init__(config, labels)
        self.memory: PairMemory | None = None   # built by finish or read from a bundle

    @classmethod
    def predict_arguments(cls, config: dict) -> str:
        return " --labels 'cat,dog,bird' --template 'a picture of {}'"

    @classmethod
    def describe_memory(cls, config: dict, memory: dict[str, torch.Tensor]) -> str | None:
        if "images" not in memory:
            return None
        return (f"pair memory: {len(memory['images']):,} training image-text pairs embedded after training; scores "
                f"mix the cosine with the bridge through the {config.get('memory_neighbours')} nearest pairs "
                f"(share {config.get('memory_weight')})")

    def build_head(self, in_dim: int) -> nn.Module:
        return Temperature(self.config.temperature, self.config.max_scale)

    def targets(self, examples: list[dict]) -> torch.Tensor:
        return torch.arange(len(examples))  # each example's positive is itself

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images, texts = split_embeddings(outputs.float())
        logits = images @ texts.T
        positives = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, positives) + F.cross_entropy(logits.T, positives)) / 2

    def similarity(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """``[I, T]`` similarity of output halves: their cosine, mixed with the bridge through the
        training pairs when the model has a pair memory."""
        images, texts = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
        cosine = images @ texts.T
        if self.memory is None:
            return cosine
        share = self.config.memory_weight
        bridge = self.memory.bridge(images, texts, self.config.memory_neighbours, self.config.memory_temperature)
        return (1 - share) * cosine + share * bridge

    def logits(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """``similarity`` times the learned scale (each half carries its square root), for a softmax."""
        scale = images.float().norm(dim=-1, keepdim=True) * texts.float().norm(dim=-1)
        return scale * self.similarity(images, texts)

    def text_probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """The first image against every text of the batch, as a softmax over ``logits``."""
        images, texts = split_embeddings(outputs.float())
        return self.logits(images[:1], texts)[0].softmax(-1)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return recall_metrics(self.similarity(*split_embeddings(outputs.float())))

    def decode(self, outputs: torch.Tensor) -> list[dict]:
        """Per example: the similarity of its image and its text (the cosine, or mixed, see above)."""
        similarity = self.similarity(*split_embeddings(outputs.float())).diagonal()
        return [{"similarity": round(c, 6)} for c in similarity.tolist()]

    # -- the pair memory -----------------------------------------------------------------------
    @torch.no_grad()
    def finish(self, model, examples: list[dict], batcher, device, progress: bool = False) -> None:
        """Embed every distinct training pair with the trained weights (memory_neighbours > 0).
        ``batcher`` screens (it has a SplitLog): what training left out stays out here too."""
        if not self.config.memory_neighbours:
            return
        pairs = [{"image": image, "text": text}
                 for image, text in dict.fromkeys((str(e["image"]), self.text_of(e)) for e in examples)]
        was_training = model.training
        model.eval()
        images, texts = [], []
        for start in tqdm(range(0, len(pairs), 256), desc="pair memory", disable=not progress, leave=False):
            batch = batcher(pairs[start: start + 256])   # {} when nothing in the chunk is usable
            if not batch:
                continue
            image_half, text_half = split_embeddings(model(to_device(batch, device)).float().cpu())
            images.append(image_half)
            texts.append(text_half)
        model.train(was_training)
        if not images:
            raise DataError("task.memory_neighbours: the train split has no usable image-text pair to remember")
        self.memory = PairMemory.build(torch.cat(images), torch.cat(texts))

    def load_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.memory_neighbours:
            self.memory = PairMemory.from_tensors(tensors)
