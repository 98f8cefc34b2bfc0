"""Training state that is not model weights, in a form a checkpoint can store without pickle:
the random generators, the optimizer's state, and the skipped-example counts as of a batch.
Used by peftmm/checkpoint.py (which writes and reads them) and the trainer."""

from __future__ import annotations

import random
from collections import Counter, deque

import torch

from .errors import DataError


class SkipTracker:
    """The collate function: the batcher, noting its skip log after each batch. The data loader
    makes the next batch before the loop receives this one, so a checkpoint after batch n
    takes the counts as they were after batch n, not after n + 1."""

    def __init__(self, batcher):
        self.batcher, self.log = batcher, batcher.skips
        self.made, self.after, self.ever = 0, deque(maxlen=4), frozenset()

    def start(self, done: int) -> None:
        self.made = done
        self.after.clear()

    def __call__(self, examples):
        batch = self.batcher(examples)
        self.made += 1
        if len(self.ever) != len(self.log.ever):   # it only grows: copied only when it has
            self.ever = frozenset(self.log.ever)
        self.after.append((self.made, (self.log.seen, dict(self.log.reasons), self.log.first, self.ever)))
        return batch

    def state_after(self, batches: int) -> tuple:
        return next(state for made, state in self.after if made == batches)


def log_state(state: tuple, examples: list[dict]) -> dict:
    seen, reasons, first, ever = state
    index = {id(e): i for i, e in enumerate(examples)}
    return {"seen": seen, "reasons": reasons, "first": [first.message, first.where] if first else None,
            "ever": sorted(index[i] for i in ever)}


def restore_log(log, state: dict, examples: list[dict]) -> None:
    log.seen, log.reasons = state["seen"], Counter(state["reasons"])
    log.first = DataError(*state["first"]) if state["first"] else None
    log.ever = {id(examples[i]) for i in state["ever"]}


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """The global generators' states: (JSON part, tensors)."""
    version, internal, gauss = random.getstate()
    data = {"python": [version, list(internal), gauss]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    try:
        import numpy as np
    except ImportError:
        return data, tensors
    name, keys, pos, has_gauss, cached = np.random.get_state()
    data["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    return data, tensors


def restore_rng(saved) -> None:
    """Set the global generators from a checkpoint (checkpoint.Saved) written with capture_rng."""
    version, internal, gauss = saved.state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(saved.tensors["rng.torch"])
    cuda = saved.part("rng.cuda.")
    cuda = [cuda[str(i)] for i in range(len(cuda))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "numpy" in saved.state["rng"]:
        import numpy as np

        name, pos, has_gauss, cached = saved.state["rng"]["numpy"]
        np.random.set_state((name, saved.tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def flatten_optimizer(state_dict: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimizer's state_dict as (JSON part, tensors named ``optimizer.<index>.<key>``)."""
    tensors, rest = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                rest.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "state": rest}, tensors


def unflatten_optimizer(data: dict, tensors: dict[str, torch.Tensor], current_groups: list[dict]) -> dict:
    """The inverse of flatten_optimizer; tuples (Adam's betas) come back as tuples."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in data["state"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}
              for group, now in zip(data["param_groups"], current_groups)]
    return {"state": state, "param_groups": groups}
