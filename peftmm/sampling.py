"""Batches that keep all questions about one image together.

When the vision tower trains (adapters, LoRA, full fine-tuning) it cannot be cached, and VQA
data asks many questions per image (easy-VQA: ~10). Packing each image's questions into the
same batch lets the batcher encode that image once per epoch instead of once per question.
Image order is reshuffled every epoch from a seeded generator, so runs are repeatable.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class ImageGroupedBatchSampler(torch.utils.data.Sampler):
    def __init__(self, examples: list[dict], batch_size: int, seed: int = 0):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, example in enumerate(examples):
            groups[str(example["image"])].append(i)
        self.groups = list(groups.values())
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._length = len(list(self._batches(range(len(self.groups)))))

    def _batches(self, order):
        batch: list[int] = []
        for g in order:
            batch.extend(self.groups[g])
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self):
        order = torch.randperm(len(self.groups), generator=self.generator).tolist()
        yield from self._batches(order)

    def __len__(self) -> int:
        return self._length
