"""Frozen-feature cache: a tower with nothing to train gives the same output every epoch.

Its tokens are computed once per distinct image or text (batched, under inference mode) and
looked up afterwards. Entries are keyed by the input itself; the cache belongs to one loaded
tower, so a different backbone, precision or preprocessing never sees it.

An image that cannot be read is not cached as anything: its error is kept in ``failed``, so the
batcher can skip its examples (``data.on_bad_sample``) without trying to decode it again.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data.images import load_image
from .errors import DataError


class FeatureCache:
    def __init__(self, tower, max_length: int | None = None, batch_size: int = 32):
        self.tower = tower
        self.max_length = max_length  # text towers: where the tokenizer truncates
        self.batch_size = batch_size
        self.store: dict[str, torch.Tensor] = {}
        self.failed: dict[str, DataError] = {}   # vision: images that could not be read

    def fill(self, keys, device, progress: bool = True, on_bad=None) -> None:
        """Encode the keys not cached yet. An unreadable image raises its DataError, or, given
        ``on_bad(key, error)``, is reported there (which may raise) and left out of the cache."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.store and k not in self.failed))
        if not missing:
            return
        bar = tqdm(total=len(missing), desc=f"caching {self.tower.name} features", unit="item",
                   disable=not progress, dynamic_ncols=True)
        with torch.inference_mode():
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start: start + self.batch_size]
                bar.update(len(chunk))
                if self.tower.name == "vision":
                    pixels = self._readable(chunk, on_bad)
                    chunk = list(pixels)
                    if not chunk:    # every image of this chunk was unreadable
                        continue
                    tokens, mask = self.tower(pixel_values=torch.stack(list(pixels.values())).to(device))
                else:
                    tokens, mask = self.tower(**{k: v.to(device) for k, v in
                                                 self.tower.tokenize(chunk, self.max_length).items()})
                for key, t, m in zip(chunk, tokens, mask):
                    self.store[key] = t[m].to("cpu", copy=True)  # drop padding
        bar.close()

    def _readable(self, chunk: list[str], on_bad) -> dict[str, torch.Tensor]:
        """The pixels of the images in ``chunk`` that load; the others go to ``failed``."""
        pixels = {}
        for key in chunk:
            try:
                pixels[key] = self.tower.processor(load_image(key))
            except DataError as error:
                if on_bad is None:
                    raise
                on_bad(key, error)
                self.failed[key] = error
        return pixels

    def lookup(self, keys: list[str], prefix: str) -> dict:
        tokens, mask = pad_tokens([self.store[k] for k in keys])
        return {f"{prefix}_tokens": tokens, f"{prefix}_mask": mask}


def pad_tokens(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[N_i, D]`` token tensors (padding dropped) into ``[B, max N, D]`` plus a mask."""
    length = max(t.shape[0] for t in items)
    tokens = items[0].new_zeros(len(items), length, items[0].shape[-1])
    mask = torch.zeros(len(items), length, dtype=torch.bool, device=items[0].device)
    for i, t in enumerate(items):
        tokens[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return tokens, mask
