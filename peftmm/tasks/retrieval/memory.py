"""The training pairs as a bridge between the modalities, for retrieval.

Cross-modal similarity is learned from a few thousand pairs; similarity within one modality
comes from the backbones' pre-training and is far more reliable. So a caption never seen in
training is matched better to an image through training pairs: the training captions most like
it (text to text) point at their images, and those are compared with the image (image to
image); likewise the training images most like the image point at their captions, compared with
the caption. Tip-Adapter's cache (Zhang et al., ECCV 2022) and SuS-X's TIP-X (Udandarao et al.,
ICCV 2023) score a test image through the training images most like it in the same way; here
both directions, in the model's own trained embedding space:

    bridge(image, text) = 1/2 * sum_j w_text(j) * cos(image, memory_image_j)
                        + 1/2 * sum_j w_image(j) * cos(text, memory_text_j)

with ``w_text`` a softmax (temperature ``temperature``) over the cosines of the text with its
``k`` most similar training texts (the rest 0), ``w_image`` likewise for the image. Each sum is
one dot product with a stand-in: the weighted mean of the neighbours' embeddings. The task
mixes it with the direct cosine (task.py). The memory is each training pair's image and
text embedding, L2-normalised float16, built once after training with the best weights
(``RetrievalTask.finish``) and saved in the bundle under ``memory.``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class PairMemory:
    def __init__(self, images: torch.Tensor, texts: torch.Tensor):
        if len(images) != len(texts):
            raise ValueError(f"pair memory: {len(images)} image embeddings for {len(texts)} text ones")
        # [N, D_image], [N, D_text] float16, L2-normalised, row i one training pair. The two sides
        # are never compared with each other, so they may even live in different spaces (the
        # frozen towers' own features, bench/emoji_baselines.py).
        self.images, self.texts = images, texts

    @classmethod
    def build(cls, images: torch.Tensor, texts: torch.Tensor) -> PairMemory:
        return cls(F.normalize(images.float(), dim=-1).half(), F.normalize(texts.float(), dim=-1).half())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.images, "texts": self.texts}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> PairMemory:
        missing = {"images", "texts"} - set(tensors)
        if missing:
            raise KeyError(f"memory.{sorted(missing)[0]}")
        return cls(tensors["images"], tensors["texts"])

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device) -> PairMemory:
        """Move the memory to ``device`` for good (the model's; see MultimodalModel._apply)."""
        self.images, self.texts = self.images.to(device), self.texts.to(device)
        return self

    def bridge(self, images: torch.Tensor, texts: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
        """``[I, T]`` bridge scores of L2-normalised ``images [I, D]`` and ``texts [T, D]``: each
        text's stand-in image (the weighted mean of its nearest training captions' images) against
        the images, and each image's stand-in text against the texts, averaged."""
        if self.images.device != images.device:   # built or loaded elsewhere: moved once, kept there
            self.to(images.device)
        memory_images, memory_texts = self.images.float(), self.texts.float()
        text_stand_ins = _neighbour_mean(texts, memory_texts, memory_images, k, temperature)     # [T, D]
        image_stand_ins = _neighbour_mean(images, memory_images, memory_texts, k, temperature)   # [I, D]
        return (images @ text_stand_ins.T + image_stand_ins @ texts.T) / 2


def _neighbour_mean(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int,
                    temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Per query, the mean of the ``values`` of its ``k`` most cosine-similar ``keys``, weighted by
    a softmax of those cosines over ``temperature``; queries in chunks, so memory stays at
    ``chunk x len(keys)`` similarities however many queries there are."""
    out = []
    for start in range(0, len(queries), chunk):
        top = (queries[start: start + chunk] @ keys.T).topk(min(k, len(keys)), dim=-1)
        weights = (top.values / temperature).softmax(-1)                        # [q, k]
        out.append(torch.einsum("qk,qkd->qd", weights, values[top.indices]))
    return torch.cat(out) if out else queries.new_zeros(0, values.shape[-1])
