"""Frozen-feature cache: a tower with nothing to train gives the same output every epoch.

Its tokens are computed once per distinct image or text (batched, under inference mode) and
looked up afterwards. Entries are keyed by the input itself; the cache belongs to one loaded
tower, so a different backbone, precision or preprocessing never sees it.

An image that cannot be read is not cached as anything: its error is kept in ``failed``, so the
batcher can skip its examples (``data.on_bad_sample``) without trying to decode it again.

On disk (``train.feature_cache_dir``) the entries outlive the run: see feature_store.py.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import DataError
from .feature_store import DiskCache, cache_key, file_stamp, stderr
from .images import load_image
from .tensors import to_device


class FeatureCache:
    """``folder``: the root of an on-disk cache (``train.feature_cache_dir``), or None for
    memory only. ``write``: whether new entries go there (False: read it only). ``log``: where
    a damaged cache is reported (stderr by default)."""

    def __init__(self, tower, max_length: int | None = None, batch_size: int | None = None, folder=None,
                 write: bool = True, log=None):
        self.tower = tower
        self.max_length = max_length  # text towers: where the tokenizer truncates
        self.batch_size = batch_size  # None: batch_size_for(device)
        self.store: dict[str, torch.Tensor] = {}
        self.failed: dict[str, DataError] = {}   # vision: images that could not be read
        self.log = log or stderr
        self.disk = DiskCache(folder, cache_key(tower, max_length), tower.info.hidden_size, write, self.log,
                              {"backbone": tower.info.source}) if folder is not None else None

    def fill(self, keys, device, progress: bool = True, on_bad=None) -> None:
        """Encode the keys not cached yet. An unreadable image raises its DataError, or, given
        ``on_bad(key, error)``, is reported there (which may raise) and left out of the cache."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.store and k not in self.failed))
        if not missing:
            return
        read = 0
        if self.disk is not None:
            found = self.disk.read(missing, stamped=self.tower.name == "vision")
            self.store.update(found)
            read = len(found)
            missing = [k for k in missing if k not in found]
        stamps: dict[str, tuple[int, int]] = {}   # vision: each image file as it was read
        bar = tqdm(total=len(missing), desc=f"caching {self.tower.name} features", unit="item",
                   disable=not progress or not missing, dynamic_ncols=True)
        size = self.batch_size or batch_size_for(device)
        try:
            with torch.inference_mode():
                for start in range(0, len(missing), size):
                    chunk = missing[start: start + size]
                    bar.update(len(chunk))
                    if self.tower.name == "vision":
                        pixels = self._readable(chunk, on_bad, stamps if self.disk is not None else None)
                        chunk = list(pixels)
                        if not chunk:    # every image of this chunk was unreadable
                            continue
                        tokens, mask = self.tower(pixel_values=torch.stack(list(pixels.values())).to(device))
                    else:
                        tokens, mask = self.tower(**to_device(self.tower.tokenize(chunk, self.max_length), device))
                    # one device-to-host copy for the batch; indexing by the mask copies each row
                    # out of it (dropping padding), so no entry keeps the whole batch alive
                    tokens, mask = tokens.cpu(), mask.cpu()
                    for key, t, m in zip(chunk, tokens, mask):
                        self.store[key] = t[m]
                        if self.disk is not None and (self.tower.name != "vision" or key in stamps):
                            self.disk.add(key, self.store[key], stamps.get(key))
        finally:   # what was computed before an error (on_bad under ``stop``) is kept on disk too
            bar.close()
            if self.disk is not None:
                self.disk.flush()
        if self.disk is not None:
            computed = len(missing) - sum(k in self.failed for k in missing)
            where = "written there" if self.disk.write else "kept in memory"
            self.log(f"peftmm: feature cache {self.disk.folder}: {read:,} {self.tower.name} entries read, "
                     f"{computed:,} computed and {where}")

    def _readable(self, chunk: list[str], on_bad, stamps: dict | None = None) -> dict[str, torch.Tensor]:
        """The pixels of the images in ``chunk`` that load; the others go to ``failed``. Given
        ``stamps``, each image whose file did not change while it was read gets its stamp there."""
        pixels = {}
        for key in chunk:
            before = file_stamp(key) if stamps is not None else None
            try:
                pixels[key] = self.tower.processor(load_image(key))
            except DataError as error:
                if on_bad is None:
                    raise
                on_bad(key, error)
                self.failed[key] = error
                continue
            if stamps is not None:
                after = file_stamp(key)
                if after is not None and before in (None, after):   # None before: written by a repairer
                    stamps[key] = after
        return pixels

    def lookup(self, keys: list[str], prefix: str) -> dict:
        tokens, mask = pad_tokens([self.store[k] for k in keys])
        return {f"{prefix}_tokens": tokens, f"{prefix}_mask": mask}


def batch_size_for(device) -> int:
    """Encoding batch of the cache fill: a GPU is starved by 32 images a batch; on CPU the batch
    size stays what it was (the same blocking of the matmuls, the same cached numbers)."""
    return 256 if torch.device(device).type == "cuda" else 32


def pad_tokens(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[N_i, D]`` token tensors (padding dropped) into ``[B, max N, D]`` plus a mask."""
    length = max(t.shape[0] for t in items)
    tokens = items[0].new_zeros(len(items), length, items[0].shape[-1])
    mask = torch.zeros(len(items), length, dtype=torch.bool, device=items[0].device)
    for i, t in enumerate(items):
        tokens[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return tokens, mask
