"""Will it fit? A recipe's peak training memory, estimated without loading a single weight.

Backbones are built from their config.json on the meta device (modules and shapes, no memory) and
get the recipe's methods, fusion and head as training puts them (``MultimodalModel.build``), so
trainable parameters are counted. Frozen weights take their precision's bytes: int8 a byte per
weight of a quantised Linear layer plus an fp32 scale per row, nf4 half a byte plus an fp32 scale
per 64, the rest (embeddings, norms, convolutions, biases, skipped layers) the compute dtype's.

Activations are simulated: a training step, an evaluation batch and a feature-caching batch run
on the meta device under :class:`Meter`, which follows every tensor ops create and free and keeps
the most bytes alive at once (as on real tensors: tests/test_plan.py). Batches have the trainer's
shapes: the most rows, distinct images and texts one of its batches holds (same sampler and seed),
the longest texts, the cached towers' tokens. Towers with nothing to train keep nothing for
backward; with ``gradient_checkpointing`` the meta run checkpoints too. On cuda, bf16 autocast
(``mixed_precision: auto``) is imitated by :func:`autocast`.

Allocators hold more than their live tensors: 10% is added (CUDA's caching allocator rounds and
fragments; malloc keeps freed blocks and loading leaves copies: bench/plan_check.py measured 13%
over the tensors on easy-vqa-fusion-only). ``cuda`` adds a CUDA context (~0.5 GiB), ``cpu`` the
process baseline (Python, libraries, data: this process's resident memory, having loaded the
same). Not simulated: captioning's generation in evaluation, buffers inside kernels.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import namedtuple
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from .backbones import QUANTIZATION_SKIP, TOWERS, BackboneInfo, Tower, blueprint
from .batching import Batcher
from .errors import DataError, PeftmmError
from .io import format_size

GiB = 2**30
CARDS = (8, 12, 16, 24)      # GiB: common consumer and workstation cards
CUDA_CONTEXT = GiB // 2      # CUDA runtime, cuBLAS/cuDNN handles and workspaces: ~0.3-0.6 GiB
ALLOCATOR_SLACK = 0.10       # what allocators hold beyond the live tensors (module docstring)
CACHE_BATCH = 32             # FeatureCache's encoding batch (features.py)
_UNITS = {"b": 1} | {u + "b": 1000**i for i, u in enumerate("kmgt", 1)}                  # kB, MB, GB, TB
_UNITS |= {u: 1024**i for i, u in enumerate("kmgt", 1)} | {u + "ib": 1024**i for i, u in enumerate("kmgt", 1)}


def parse_size(text: str) -> int:
    """``8GiB``, ``12 GB``, ``24576MiB``, ``16G`` (binary, like ``free -g``) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise PeftmmError(f"--gpu-mem {text!r} is not a memory size; write a number and a unit, "
                          "e.g. 8GiB, 12GB or 24576MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 2**20:
        raise PeftmmError(f"--gpu-mem {text!r} is less than 1 MiB; did you mean {match.group(1)}GiB?")
    return size


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    recipe: str
    device: str
    parts: list[Part]
    details: dict = field(default_factory=dict)   # what it assumed: batch shapes, phases, caches

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    def fits(self, budget: int) -> bool:
        return self.total <= budget

    def cards(self) -> dict[int, bool]:
        """Whether it fits each common card size (GiB)."""
        return {gib: self.fits(gib * GiB) for gib in CARDS}

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "device": self.device, "total": self.total,
                "parts": [asdict(p) for p in self.parts], "details": self.details}


Suggestion = namedtuple("Suggestion", "knob overrides estimate")   # a knob, its --set values, the estimate after


class Meter(TorchDispatchMode):
    """Follows every tensor that ops create while active, by storage, until it is freed: ``peak``
    is the most bytes alive at once, parameter gradients left out (``watch_gradients``: they are
    counted on their own). On the meta device tensors have shapes but no data, so a run costs
    nothing; ``.item()`` there has no value, and is answered True (a full mask) or 1."""

    def __init__(self):
        super().__init__()
        self.live, self.grads = {}, set()   # storage -> (bytes, weakref); the storages of gradients
        self.now = self.grad_bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for storage in (t.untyped_storage() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            if (key := storage._cdata) not in self.live:
                self.live[key] = (storage.nbytes(), weakref.ref(storage, lambda _, key=key: self._free(key)))
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now - self.grad_bytes)
        return out

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, None))
        self.now -= size
        if key in self.grads:
            self.grads.discard(key)
            self.grad_bytes -= size

    def watch_gradients(self, parameters) -> list:
        def hook(param):
            key = param.grad.untyped_storage()._cdata
            if key in self.live and key not in self.grads:
                self.grads.add(key)
                self.grad_bytes += self.live[key][0]
        return [p.register_post_accumulate_grad_hook(hook) for p in parameters]


@contextmanager
def autocast(dtype: torch.dtype):
    """torch.autocast's rule on a GPU, for meta tensors (which autocast leaves alone): matrix
    products, convolutions and attention in ``dtype``; normalisation, softmax and losses in fp32.
    The functions are swapped in torch and torch.nn.functional meanwhile, backward included, where
    checkpointed blocks run their forward again and must cast the same way."""
    spots = [(F, n, dtype) for n in ("linear", "conv1d", "conv2d", "scaled_dot_product_attention")]
    spots += [(torch, n, dtype) for n in ("matmul", "bmm", "baddbmm", "einsum")]
    spots += [(F, n, torch.float32) for n in ("layer_norm", "group_norm", "softmax", "log_softmax", "cross_entropy")]
    originals = [getattr(module, name) for module, name, _ in spots]

    def casting(fn, to):
        cast = partial(tree_map_only, torch.Tensor, lambda t: t.to(to) if t.is_floating_point() else t)
        return lambda *args, **kwargs: fn(*cast(args), **cast(kwargs))

    for (module, name, to), fn in zip(spots, originals):
        setattr(module, name, casting(fn, to))
    try:
        yield
    finally:
        for (module, name, _), fn in zip(spots, originals):
            setattr(module, name, fn)


@lru_cache(maxsize=8)
def _blueprint(name: str, source: str, image_size: int | None, causal_lm: bool):
    return blueprint(name, source, image_size=image_size, causal_lm=causal_lm)


def empty_tower(name: str, spec, causal_lm: bool = False) -> Tower:
    """A tower on the meta device, as load_tower would build it, without weights."""
    causal_lm = causal_lm and name == "text"
    plan = _blueprint(name, spec.backbone, spec.image_size if name == "vision" else None, causal_lm)
    model = plan.empty_model(spec.precision).requires_grad_(False).eval()
    info = BackboneInfo(spec.backbone, plan.model_type, "", spec.precision, 0, plan.layout)
    tower = Tower(name, model, info, plan.processor)
    tower.causal_lm = causal_lm
    with Meter(), torch.no_grad():
        info.hidden_size = tower(**tower.probe_inputs())[0].shape[-1]
    return tower


def weight_bytes(model: nn.Module, precision: str) -> int:
    """Bytes of a tower model's frozen parameters and buffers at ``precision``."""
    total, seen = 0, set()
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) in seen or tensor.requires_grad:
                continue
            seen.add(id(tensor))
            quantised = (precision in ("int8", "nf4") and isinstance(module, nn.Linear) and name == "weight"
                         and not any(skip in module_name for skip in QUANTIZATION_SKIP))
            if not quantised:
                total += tensor.numel() * tensor.element_size()
            elif precision == "int8":  # int8 weights, one fp32 scale per output row (bitsandbytes' SCB)
                total += tensor.numel() + 4 * tensor.shape[0]
            else:                      # nf4: two weights a byte, one fp32 absmax per block of 64
                total += tensor.numel() // 2 + 4 * math.ceil(tensor.numel() / 64)
    return total


class _ShapeCache:
    """Stands in for a FeatureCache: tokens of the right shape (``lengths``: per key, or one for all)."""

    def __init__(self, lengths, width: int):
        self.length = (lambda key: lengths) if isinstance(lengths, int) else lengths.__getitem__
        self.width, self.failed = width, {}

    def lookup(self, keys: list[str], prefix: str) -> dict:
        n = max(map(self.length, keys))
        return {f"{prefix}_tokens": torch.zeros(len(keys), n, self.width, device="meta"),
                f"{prefix}_mask": torch.ones(len(keys), n, dtype=torch.bool, device="meta")}

    def nbytes(self, keys) -> int:
        return sum(map(self.length, set(keys))) * self.width * 4   # fp32, padding dropped


class _ShapeBatcher(Batcher):
    """The trainer's batcher, with pixels as meta tensors of their real shape (no image is read)."""

    def vision_inputs(self, images, pixels=None) -> dict:
        if "vision" in self.caches:
            return self.caches["vision"].lookup(images, "vision")
        size = self.model.towers["vision"].processor.size
        return {"pixel_values": torch.zeros(len(images), 3, size, size, device="meta")}

    def __call__(self, examples):
        return {k: v.to("meta") for k, v in super().__call__(examples).items()}


def most_per_batch(examples, batches, text_of) -> dict:
    """The most rows, distinct images and distinct texts that any one batch (index lists) holds."""
    counts = [(len(b), len({str(examples[i]["image"]) for i in b}), len({text_of(examples[i]) for i in b}))
              for b in batches]
    return dict(zip(("rows", "images", "texts"), map(max, zip(*counts))))


class Planner:
    """Estimates over one recipe's data; the variants that knobs try reuse its data and tokens."""

    def __init__(self, recipe):
        from .data import load_splits

        self.recipe, self.splits = recipe, load_splits(recipe.data)
        if not (self.splits.train and self.splits.val):   # training refuses these too
            raise DataError(f"the train or val split of data.source {recipe.data.source} is empty: nothing to plan")

    def train_batches(self, spec):
        """The trainer's batches of one epoch (index lists): its sampler, its seed."""
        from .sampling import ImageGroupedBatchSampler

        if spec.group_by_image:
            return ImageGroupedBatchSampler(self.splits.train, spec.batch_size, spec.seed)
        shuffled = torch.utils.data.RandomSampler(self.splits.train, generator=torch.Generator().manual_seed(spec.seed))
        return torch.utils.data.BatchSampler(shuffled, spec.batch_size, drop_last=False)

    def estimate(self, recipe=None, device: str = "cuda", baseline: int | None = None) -> Estimate:
        from .model import MultimodalModel, _task_needs_lm

        recipe, splits = recipe or self.recipe, self.splits
        if device not in ("cuda", "cpu"):
            raise PeftmmError(f"device {device!r}: plan for cuda or cpu")
        towers = {name: empty_tower(name, getattr(recipe, name), _task_needs_lm(recipe)) for name in TOWERS}
        with Meter():   # (methods find their places with a forward pass, on meta tensors here)
            model = MultimodalModel.build(recipe, splits.labels, device="meta", towers=towers)
        task, spec = model.task, recipe.train
        own_text = getattr(task, "text_inputs", None) is not None   # captioning: one LM row per caption
        key = (lambda e: e.get("text") or "") if own_text else task.text_of
        everything = splits.train + splits.val + splits.test
        texts = list(dict.fromkeys(map(key, everything)))   # tokens of each, as the tokenizer cuts them
        tokenized = model.towers["text"].processor(texts, truncation=True, max_length=recipe.text.max_length)
        lengths = dict(zip(texts, map(len, tokenized["input_ids"])))
        longest = sorted(lengths, key=lengths.get, reverse=True)
        caches = self._caches(model, recipe, lengths)

        def batch(most, pool):   # the most images and texts of one batch, the longest texts
            images = list(dict.fromkeys(str(e["image"]) for e in pool))[: most["images"]]
            texts = longest[: most["texts"]]
            return _ShapeBatcher(model, caches)([{**pool[i % len(pool)], "image": images[i % len(images)],
                                                  "text": texts[i % len(texts)]} for i in range(most["rows"])])

        distinct = id if own_text else key
        train_most = most_per_batch(splits.train, self.train_batches(spec), distinct)
        ordered, size = sorted(splits.val, key=lambda e: str(e["image"])), spec.eval_batch_size  # evaluate's order
        eval_most = most_per_batch(ordered, [range(i, min(i + size, len(ordered)))
                                             for i in range(0, len(ordered), size)], distinct)
        mixed = {"auto": "bf16", "bf16": "bf16", "fp16": "fp16"}.get(spec.mixed_precision) if device == "cuda" else None
        casts = partial(autocast, {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed]) if mixed else nullcontext
        trainable = [p for p in model.parameters() if p.requires_grad]
        phases = {"a training step": self._step(model, lambda: batch(train_most, splits.train), trainable, casts)}
        phases["an evaluation batch"] = self._step(model, lambda: batch(eval_most, ordered), None, casts)
        for name in caches:      # encoding one batch for the feature cache (no autocast: towers run bare)
            tower, size = model.towers[name], model.towers["vision"].processor.size
            with Meter() as meter, torch.no_grad():
                inputs = ({"pixel_values": torch.zeros(CACHE_BATCH, 3, size, size, device="meta")} if name == "vision"
                          else tower.tokenize(longest[:CACHE_BATCH], recipe.text.max_length))
                tower(**{k: v.to("meta") for k, v in inputs.items()})
            phases[f"caching {name} features"] = meter.peak
        phase = max(phases, key=phases.get)

        weights = sum(p.numel() * p.element_size() for p in trainable)
        cached = {name: cache.nbytes(str(e["image"]) if name == "vision" else key(e) for e in everything)
                  for name, cache in caches.items()}
        parts = [Part(f"{name} weights (frozen, {getattr(recipe, name).precision})",
                      weight_bytes(model.towers[name].model, getattr(recipe, name).precision),
                      getattr(recipe, name).backbone) for name in TOWERS]
        parts += [Part("trainable weights", weights, f"{sum(p.numel() for p in trainable):,} parameters"),
                  Part("gradients", weights, "one per trainable weight"),
                  Part("AdamW states", 2 * weights, "two moments per trainable weight"),
                  Part("fp32 master copies", 0, "none: AdamW updates the trainable weights in place, in their dtype"),
                  Part("feature cache", sum(cached.values()),
                       ", ".join(f"{n} {format_size(b)}" for n, b in cached.items()) or "no tower cached"),
                  Part("activations", phases[phase], f"peak of {phase}")]
        parts.append(Part("allocator overhead", int(ALLOCATOR_SLACK * sum(p.bytes for p in parts)),
                          "10%: " + ("the caching allocator's rounding and fragmentation" if device == "cuda"
                                     else "freed blocks malloc keeps, copies made while loading")))
        parts.append(Part("CUDA context", CUDA_CONTEXT, "runtime and library workspaces") if device == "cuda" else
                     Part("process baseline", process_baseline() if baseline is None else baseline,
                          "Python, torch, transformers and the data"))
        return Estimate(recipe.name, device, parts, {
            "train_batch": train_most, "eval_batch": eval_most, "phases": phases, "cached": sorted(caches),
            "longest_text_tokens": lengths[longest[0]] if longest else 0, "mixed_precision": mixed or "no",
            "checkpointed": [n for n, t in model.towers.items() if t.checkpointed]})

    @staticmethod
    def _step(model, make_batch, trainable, casts) -> int:
        """Peak bytes of one batch: forward (and backward, given ``trainable``) on the meta device."""
        model.train(trainable is not None)
        with Meter() as meter, torch.set_grad_enabled(trainable is not None), casts():
            hooks = meter.watch_gradients(trainable or [])
            batch = make_batch()
            outputs = model(batch)
            if trainable is not None:
                model.task.loss(outputs, batch["labels"]).backward()
            del batch, outputs
        for hook in hooks:
            hook.remove()
        return meter.peak

    @staticmethod
    def _caches(model, recipe, lengths) -> dict:
        """Stand-ins for the caches training fills (trainer.build_caches' rule)."""
        out = {name: model.towers[name] for name in TOWERS if not model.has_trainable(name)
               and getattr(recipe, name).cache_features and name in getattr(model.task, "cached_towers", TOWERS)}
        if "text" in out:
            out["text"] = _ShapeCache(lengths, out["text"].info.hidden_size)
        if "vision" in out:
            with Meter(), torch.no_grad():
                size = out["vision"].processor.size
                tokens = out["vision"](pixel_values=torch.zeros(1, 3, size, size, device="meta"))[0]
            out["vision"] = _ShapeCache(tokens.shape[1], tokens.shape[2])
        return out

    def suggestions(self, estimate: Estimate, budget: int, baseline: int | None = None) -> list[Suggestion]:
        """Knobs in the order to try them (batch size, int8, checkpointing, caching), each with
        the estimate after turning it alone; only those that lower the estimate."""
        from .recipe import from_dict

        recipe, spec, out = self.recipe, self.recipe.train, []

        def variant(overrides):
            return self.estimate(from_dict(recipe.to_dict(), recipe.source, overrides), estimate.device, baseline)

        size = spec.batch_size // 2
        while size >= 1:       # the largest halving that fits (or 1), grad_accum keeping the effective batch
            accum = math.ceil(spec.grad_accum * spec.batch_size / size)
            smaller = variant(overrides := [f"train.batch_size={size}", f"train.grad_accum={accum}"])
            if smaller.fits(budget) or size == 1:
                out.append(Suggestion(f"lower train.batch_size to {size} (grad_accum {accum}: effective batch "
                                      f"{size * accum})", overrides, smaller))
                break
            size //= 2
        knobs = [("load the frozen backbones in int8", "precision", "int8",
                  lambda t: t.precision in ("fp32", "bf16") and not any(m.type == "full" for m in t.methods)),
                 ("turn on gradient_checkpointing", "gradient_checkpointing", "true",
                  lambda t: t.methods and not t.gradient_checkpointing),
                 ("stop caching frozen features (slower epochs)", "cache_features", "false",
                  lambda t: not t.methods and t.cache_features)]
        for text, key, value, applies in knobs:
            overrides = [f"{n}.{key}={value}" for n in TOWERS if applies(getattr(recipe, n))]
            if overrides:
                out.append(Suggestion(f"{text}: {', '.join(o.split('=')[0] for o in overrides)}", overrides,
                                      variant(overrides)))
        return [s for s in out if s.estimate.total < estimate.total]


def process_baseline() -> int:
    """This process's resident memory: it has imported what training imports and loaded the data."""
    import os
    import resource

    import bitsandbytes  # noqa: F401  (training imports it; so should the baseline)
    try:
        with open("/proc/self/statm") as f:   # Linux: pages resident now
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:                           # elsewhere: the peak so far, in bytes (macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

