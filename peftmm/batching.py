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

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .data.skips import SplitLog, needed_text_error
from .errors import DataError
from .features import FeatureCache
from .images import load_image
from .tensors import to_device  # noqa: F401  (batching.to_device: the name kept where it was)


def _distinct(values: list) -> tuple[list, torch.Tensor]:
    position: dict = {}
    index = [position.setdefault(v, len(position)) for v in values]
    return list(position), torch.tensor(index, dtype=torch.long)


def image_workers(setting: int | None, caches: dict) -> int:
    """Threads for decoding training images (``train.image_workers``): none where the vision
    tower's features are cached (nothing is decoded per batch)."""
    if "vision" in caches:
        return 0
    return min(4, os.cpu_count() or 1) if setting is None else setting


class Batcher:
    """``workers``: threads that decode and resize a batch's distinct images together (PIL and
    numpy release the GIL), instead of one after the other on the caller's thread; the batch,
    and which examples are skipped in which order, are the same either way."""

    def __init__(self, model, caches: dict[str, FeatureCache] | None = None, skips: SplitLog | None = None,
                 workers: int = 0):
        self.model = model
        self.caches = caches or {}
        self.skips = skips
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="peftmm-images") if workers > 0 else None

    def __call__(self, examples: list[dict]) -> dict:
        pixels: dict[str, torch.Tensor] = {}
        failed: dict[str, DataError] = {}
        if self.pool is not None and "vision" not in self.caches:
            self._decode_together(examples, pixels, failed)
        if self.skips is not None:
            examples = self.screen(examples, pixels, failed)
            if not examples:
                return {}
        elif failed:   # prediction: the caller asked for that very image
            raise next(iter(failed.values()))
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

    def _decode_together(self, examples: list[dict], pixels: dict, failed: dict) -> None:
        preprocess = self.model.towers["vision"].processor

        def decode(path):
            try:
                return preprocess(load_image(path))
            except DataError as error:
                return error

        paths = list(dict.fromkeys(str(e["image"]) for e in examples))
        for path, result in zip(paths, self.pool.map(decode, paths)):
            (failed if isinstance(result, DataError) else pixels)[path] = result

    def screen(self, examples: list[dict], pixels: dict | None = None, failed: dict | None = None) -> list[dict]:
        """The usable examples; the others go to ``self.skips``. Images decoded on the way are
        put in ``pixels`` (when given) so the batch does not decode them again; those decoded
        already are taken from there, and ``failed`` holds the ones that could not be."""
        self.skips.seen += len(examples)
        task, errors, kept = self.model.task, {}, []
        for e in examples:
            error = needed_text_error(task, e)
            if error is None:
                path = str(e["image"])
                if path not in errors:
                    errors[path] = (failed or {}).get(path) or (None if pixels and path in pixels
                                                                 else self.image_error(path, pixels))
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

