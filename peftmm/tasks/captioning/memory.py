"""Retrieval-augmented captioning: the training captions of the images most like this one, as
words the LM can read before it writes (SmallCap, Ramos et al., CVPR 2023, with a frozen
decoder and a small trained part, here the projector and the LM's LoRA).

A captioner trained on a few thousand pairs has to name concepts it never saw; the captions of
similar training images give it candidate words to copy, combine or leave out. The memory holds,
per training caption, the pooled frozen-vision feature of its image (L2-normalised, float16),
its token ids, and a hash of its exclusion key: its text, or the example field named by
``retrieved_exclude`` (emoji: ``family``). It is built once before training (the vision tower must
be frozen, so the features never change), saved in the bundle under ``memory.`` and read back
with it: a bundle captions new images with the memory it was trained with.

While training, an example never retrieves an entry with its own exclusion key: at test time
the image's caption is not in the memory either, and under a split by family (emoji) nor is any
caption of its family, so training must not lean on siblings ("man walking" for "woman
walking") that test images never have.
"""

from __future__ import annotations

import zlib

import torch
from torch.nn import functional as F

PAD = -1


def key_hash(key: str) -> int:
    return zlib.crc32(" ".join(str(key).split()).encode())


class CaptionMemory:
    def __init__(self, keys: torch.Tensor, ids: torch.Tensor, hashes: torch.Tensor):
        self.keys, self.ids, self.hashes = keys, ids, hashes   # [N, D] float16, [N, L] int32, [N] int64

    @classmethod
    def build(cls, features: torch.Tensor, captions: list[str], keys: list[str], tokenizer,
              max_tokens: int) -> CaptionMemory:
        """``features``: pooled vision features ``[N, D]`` of the images of ``captions``;
        ``keys``: each entry's exclusion key."""
        rows = [tokenizer(" " + " ".join(c.split()), add_special_tokens=False)["input_ids"][:max_tokens]
                for c in captions]
        ids = torch.full((len(rows), max(map(len, rows), default=1)), PAD, dtype=torch.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        hashes = torch.tensor([key_hash(k) for k in keys], dtype=torch.int64)
        return cls(F.normalize(features.float(), dim=-1).half(), ids, hashes)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "ids": self.ids, "hashes": self.hashes}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CaptionMemory:
        missing = {"keys", "ids", "hashes"} - set(tensors)
        if missing:
            raise KeyError(f"memory.{sorted(missing)[0]}")
        return cls(tensors["keys"], tensors["ids"].to(torch.int32), tensors["hashes"].to(torch.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device) -> CaptionMemory:
        """Move the keys and their hashes to ``device`` for good (``ids`` are read on the host:
        captions_ids builds Python lists from them)."""
        self.keys, self.hashes = self.keys.to(device), self.hashes.to(device)
        return self

    def nearest(self, pooled: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Indices ``[B, k]`` of the entries most cosine-similar to each pooled feature, best first;
        entries whose exclusion-key hash equals the row's ``exclude`` hash are never chosen."""
        if self.keys.device != pooled.device:   # built or loaded elsewhere: moved once, kept there
            self.to(pooled.device)
        scores = F.normalize(pooled.float(), dim=-1) @ self.keys.float().T
        if exclude is not None:
            scores = scores.masked_fill(self.hashes[None, :] == exclude[:, None], float("-inf"))
        return scores.topk(min(k, len(self)), dim=-1).indices

    def captions_ids(self, index: int) -> list[int]:
        row = self.ids[index]
        return row[row != PAD].tolist()
