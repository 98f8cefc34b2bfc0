"""What training and inference share after the model is built: the frozen-feature caches a run
fills (towers with nothing to train encode each distinct input once) and the evaluation loop over a
split (``peftmm eval`` and every validation and test pass of ``peftmm train``)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbones import TOWERS
from .batching import Batcher
from .data.skips import needed_text_error
from .distributed import gather_rows, process_slice
from .errors import DataError
from .feature_store import feature_cache_dir
from .features import FeatureCache
from .precision import inference_context
from .tensors import to_device


def build_caches(model, recipe, log=None, write: bool = True, shared: Path | None = None) -> dict[str, FeatureCache]:
    """A cache for every tower that has nothing to train (unless the recipe opts out), kept on
    disk too under ``train.feature_cache_dir`` (feature_store.py). ``write``: whether this process
    adds entries there (the main one; the others only read it); ``log``: where a damaged
    cache is reported. ``shared``: the folder used when the recipe names none but several
    processes must share one (the main process computes the features, the others read them)."""
    names = [name for name in TOWERS if not model.has_trainable(name) and getattr(recipe, name).cache_features
             and name in model.task.cached_towers]
    where = recipe.train.feature_cache_dir or (str(shared) if shared is not None else None)
    folder = feature_cache_dir(where, recipe.source, create=bool(names) and write)
    return {name: FeatureCache(model.towers[name], model.max_length, folder=folder, write=write, log=log)
            for name in names}


def fill_caches(caches: dict[str, FeatureCache], model, examples, device, progress=True, on_bad=None,
                precision: dict | None = None, accelerator=None) -> None:
    """``on_bad``: see FeatureCache.fill (None: an unreadable image raises). ``precision``: the
    run's (precision.record): the towers encode under the autocast training and inference use
    on CUDA. Under several processes (``accelerator``) the main one encodes first and writes the
    shared disk cache; the others then read it (computing only what it could not give them)."""
    several = accelerator is not None and accelerator.num_processes > 1
    if several and not accelerator.is_main_process:
        accelerator.wait_for_everyone()
    try:
        with inference_context(precision, device):
            _fill(caches, model, examples, device, progress, on_bad)
    finally:
        if several and accelerator.is_main_process:
            accelerator.wait_for_everyone()


def _fill(caches, model, examples, device, progress, on_bad) -> None:
    for name, cache in caches.items():
        if name == "vision":
            keys = [str(e["image"]) for e in examples]
        else:  # texts the batcher will skip (empty, or none at all) are not worth a cache entry
            keys = [model.task.text_of(e) for e in examples if needed_text_error(model.task, e) is None]
        cache.fill(keys, device, progress, on_bad=on_bad)


@torch.no_grad()
def evaluate(model, examples, batcher, batch_size: int, device, progress=False, desc="eval",
             accelerator=None) -> dict:
    """Loss and task metrics over ``examples`` (sorted by image so each image is encoded once),
    and how many examples they were computed over (``examples``). A batcher with a skip log
    leaves out the examples it cannot use and counts them there (reset here first).

    Under several processes (``accelerator``) each computes the outputs of its slice of the
    sorted examples and all of them the metrics over the gathered outputs. A task with its own
    ``evaluate`` (captioning) runs it whole on every process."""
    skips = getattr(batcher, "skips", None)
    if skips is not None:
        skips.new_epoch()
    if model.task.own_evaluation:  # a task whose metrics need more than outputs (captioning generates)
        if skips is not None:  # it batches the examples more than once (loss, captions): screen them once
            examples, batcher = batcher.screen(examples), Batcher(batcher.model, batcher.caches)
        if not examples:
            raise skips.all_skipped_error() if skips is not None and skips.seen else _nothing(desc)
        return model.task.evaluate(model, examples, batcher, batch_size, device, progress=progress,
                                   desc=desc) | {"examples": len(examples)}
    model.eval()
    examples = sorted(examples, key=lambda e: str(e["image"]))
    several = accelerator is not None and accelerator.num_processes > 1
    if several:
        examples = process_slice(examples, accelerator.num_processes, accelerator.process_index)
    logits, targets = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False):
        batch = batcher(examples[start: start + batch_size])
        if not batch:  # every example of this batch was skipped
            continue
        batch = to_device(batch, device)
        logits.append(model(batch).float().cpu())
        targets.append(batch["labels"].cpu())
    if several:   # every process gets every output, in the order of the sorted examples
        logits = gather_rows(torch.cat(logits) if logits else torch.zeros(0), accelerator).cpu()
        targets = gather_rows(torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long), accelerator).cpu()
        logits, targets = ([logits], [targets]) if len(logits) else ([], [])
    if not logits:
        raise skips.all_skipped_error() if skips is not None and skips.seen else _nothing(desc)
    logits, targets = torch.cat(logits), torch.cat(targets)
    return {"loss": model.task.loss(logits, targets).item(), **model.task.metrics(logits, targets),
            "examples": len(logits)}


def _nothing(split: str) -> DataError:
    return DataError(f"the {split} split has no examples to evaluate")
