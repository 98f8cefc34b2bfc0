"""Turn a list of examples into model inputs, encoding each distinct image and text once.

easy-VQA asks ~10 questions per image and has only 107 distinct questions, and most real VQA
data repeats images and prompts too: the batch holds the distinct inputs plus an index per
example, so a tower never runs twice on the same input in one step. A tower whose outputs are
cached (see features.py) contributes its tokens directly.

A batcher given a :class:`~peftmm.data.skips.SplitLog` (training and its evaluations) first
screens its examples: one whose image cannot be read or whose needed text is empty is left out
and recorded there (or stops the run, under ``data.on_bad_sample: stop``). A batch with nothing
left is ``{}``. Without one (prediction) a bad image raises its DataError, as the caller asked
for that very image.
"""

from __future__ import annotations

import torch

from .data.images import load_image
from .data.skips import SplitLog, needed_text_error
from .errors import DataError
from .features import FeatureCache


def _distinct(values: list) -> tuple[list, torch.Tensor]:
    position: dict = {}
    index = [position.setdefault(v, len(position)) for v in values]
    return list(position), torch.tensor(index, dtype=torch.long)


class Batcher:
    def __init__(self, model, caches: dict[str, FeatureCache] | None = None, skips: SplitLog | None = None):
        self.model = model
        self.caches = caches or {}
        self.skips = skips

    def __call__(self, examples: list[dict]) -> dict:
        pixels: dict[str, torch.Tensor] = {}
        if self.skips is not None:
            examples = self.screen(examples, pixels)
            if not examples:
                return {}
        images, image_index = _distinct([str(e["image"]) for e in examples])
        task = self.model.task
        if task.own_text_inputs:  # the task builds its text inputs and labels itself (captioning)
            return {"image_index": image_index, **self.vision_inputs(images, pixels),
                    **task.text_inputs(self.model.towers["text"], examples, self.model.max_length)}
        texts, text_index = _distinct([task.text_of(e) for e in examples])
        batch = {"image_index": image_index, "text_index": text_index}
        batch.update(self.vision_inputs(images, pixels))
        batch.update(self.text_inputs(texts))
        if not task.targets_need_labels or all("label" in e for e in examples):
            batch["labels"] = task.targets(examples)  # retrieval: pairs, no label needed
        return batch

    def screen(self, examples: list[dict], pixels: dict | None = None) -> list[dict]:
        """The usable examples; the others go to ``self.skips``. Images decoded on the way are
        put in ``pixels`` (when given) so the batch does not decode them again."""
        self.skips.seen += len(examples)
        task, errors, kept = self.model.task, {}, []
        for e in examples:
            error = needed_text_error(task, e)
            if error is None:
                path = str(e["image"])
                if path not in errors:
                    errors[path] = self.image_error(path, pixels)
                error = errors[path]
            if error is None:
                kept.append(e)
            else:
                self.skips.skip(e, error)
        return kept

    def image_error(self, path: str, pixels: dict | None = None) -> DataError | None:
        cache = self.caches.get("vision")
        if cache is not None:            # filled before use: an unreadable image is in failed
            return cache.failed.get(path)
        try:
            image = self.model.towers["vision"].processor(load_image(path))
        except DataError as error:
            return error
        if pixels is not None:
            pixels[path] = image
        return None

    def vision_inputs(self, images: list[str], pixels: dict | None = None) -> dict:
        if "vision" in self.caches:
            return self.caches["vision"].lookup(images, "vision")
        preprocess, pixels = self.model.towers["vision"].processor, pixels or {}
        return {"pixel_values": torch.stack([pixels[p] if p in pixels else preprocess(load_image(p))
                                             for p in images])}

    def text_inputs(self, texts: list[str]) -> dict:
        if "text" in self.caches:
            return self.caches["text"].lookup(texts, "text")
        return self.model.towers["text"].tokenize(texts, self.model.max_length)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
