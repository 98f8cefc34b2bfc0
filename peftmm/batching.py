"""Turn a list of examples into model inputs, encoding each distinct image and text once.

easy-VQA asks ~10 questions per image and has only 107 distinct questions, and most real VQA
data repeats images and prompts too: the batch holds the distinct inputs plus an index per
example, so a tower never runs twice on the same input in one step. A tower whose outputs are
cached (see features.py) contributes its tokens directly.
"""

from __future__ import annotations

import torch

from .data.images import load_image
from .features import FeatureCache


def _distinct(values: list) -> tuple[list, torch.Tensor]:
    position: dict = {}
    index = [position.setdefault(v, len(position)) for v in values]
    return list(position), torch.tensor(index, dtype=torch.long)


class Batcher:
    def __init__(self, model, caches: dict[str, FeatureCache] | None = None):
        self.model = model
        self.caches = caches or {}

    def __call__(self, examples: list[dict]) -> dict:
        images, image_index = _distinct([str(e["image"]) for e in examples])
        own_text = getattr(self.model.task, "text_inputs", None)
        if own_text is not None:  # the task builds its text inputs and labels itself (captioning)
            return {"image_index": image_index, **self.vision_inputs(images),
                    **own_text(self.model.towers["text"], examples, self.model.max_length)}
        texts, text_index = _distinct([self.model.task.text_of(e) for e in examples])
        batch = {"image_index": image_index, "text_index": text_index}
        batch.update(self.vision_inputs(images))
        batch.update(self.text_inputs(texts))
        if all("label" in e for e in examples):
            batch["labels"] = self.model.task.targets(examples)
        return batch

    def vision_inputs(self, images: list[str]) -> dict:
        if "vision" in self.caches:
            return self.caches["vision"].lookup(images, "vision")
        preprocess = self.model.towers["vision"].processor
        return {"pixel_values": torch.stack([preprocess(load_image(p)) for p in images])}

    def text_inputs(self, texts: list[str]) -> dict:
        if "text" in self.caches:
            return self.caches["text"].lookup(texts, "text")
        return self.model.towers["text"].tokenize(texts, self.model.max_length)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
