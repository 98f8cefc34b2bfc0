"""Batches that keep all questions about one image together.

When the vision tower trains (adapters, LoRA, full fine-tuning) it cannot be cached, and VQA
data asks many questions per image (easy-VQA: ~10). Packing each image's questions into the
same batch lets the batcher encode that image once per epoch instead of once per question.
Image order is reshuffled every epoch from a seeded generator, so runs are repeatable.

Either sampler is wrapped in :class:`ResumableBatches`, so a run resumed from a checkpoint
(see checkpoint.py) trains on the rest of the interrupted epoch's batches and no others.
"""

from __future__ import annotations

import itertools
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


class ResumableBatches(torch.utils.data.Sampler):
    """A batch sampler whose next pass can start part-way: ``skip`` batches are dropped as
    indices (nothing is loaded or counted for them), which is how a resumed run continues an
    epoch where its checkpoint left it. ``generator`` decides the epoch's order: with its state
    at the start of an epoch, the same batches come again."""

    def __init__(self, batches, generator: torch.Generator):
        self.batches, self.generator, self.skip = batches, generator, 0
        self.batch_size = getattr(batches, "batch_size", None)
        self.sampler = getattr(batches, "sampler", None)   # accelerate's loader wrapper looks for it (get_sampler)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)


def train_loader(examples: list[dict], spec, collate, num_processes: int = 1,
                 process_index: int = 0) -> tuple[torch.utils.data.DataLoader, ResumableBatches]:
    """The training data loader (``spec``: the recipe's train section) and its batch sampler.
    Under several processes each draws the same batches and loads its slice of them
    (distributed.ProcessSlices), so the global batch is ``spec.batch_size`` whatever their number."""
    if spec.group_by_image:
        grouped = ImageGroupedBatchSampler(examples, spec.batch_size, spec.seed)
        # the loader draws its (unused) worker seed from torch's global generator, as it always did
        source, generator, order = grouped, None, grouped.generator
    else:  # what DataLoader(shuffle=True, generator=...) builds, its generator drawing the same numbers
        generator = torch.Generator().manual_seed(spec.seed)
        sampler = torch.utils.data.RandomSampler(examples, generator=generator)
        source, order = torch.utils.data.BatchSampler(sampler, spec.batch_size, drop_last=False), generator
    if num_processes > 1:
        from .distributed import ProcessSlices

        source = ProcessSlices(source, num_processes, process_index)
    batches = ResumableBatches(source, order)
    loader = torch.utils.data.DataLoader(examples, batch_sampler=batches, collate_fn=collate, generator=generator)
    return loader, batches
