"""Will it fit? A recipe's peak training memory, estimated without loading a single weight.

Backbones are built from their config.json on the meta device (modules and shapes, no memory;
for a hub id while the hub cannot be reached, peftmm/hub_configs' copy of it) and get the
recipe's methods, fusion and head as training puts them (``MultimodalModel.build``), so
trainable parameters are counted. Frozen weights take their precision's bytes: int8 a byte per
weight of a quantised Linear layer plus an fp32 scale per row, nf4 half a byte plus an fp32 scale
per 64, the rest (embeddings, norms, convolutions, biases, skipped layers) the compute dtype's.
On CPU the checkpoint's pages that int8/nf4 was quantised from stay resident as well (the file
is memory-mapped and the mapping outlives loading). Trainable weights add a gradient, two AdamW
moments and the best epoch's copy.

Activations are simulated: a batch of feature caching, a training step and an evaluation batch
run on the meta device under plan_meter.Meter, which follows every tensor ops create and free
(views of existing tensors are not new memory) and keeps the most bytes alive at once (as on
real tensors: tests/test_plan.py). Batches have the trainer's shapes: the most rows, distinct
images and texts one of its batches holds (same sampler and seed; evaluation: of the val or the
test split, whichever batch is larger), the longest texts, the cached towers' tokens. Towers
with nothing to train keep nothing for backward; with ``gradient_checkpointing`` the meta run
checkpoints too. bitsandbytes layers allocate as they do (plan_meter.emulate_bitsandbytes: a
dequantised weight in each call on CPU and for nf4; on CUDA int8, int8 rows of the input and an
int32 product). On cuda, the autocast training would pick on the card is imitated (precision.py:
this machine's card when it has one, else a current one, where ``mixed_precision: auto`` is bf16),
and the feature cache is not counted: it lives in host memory (features.py).

On cpu the phases run in the trainer's order through a model of glibc malloc (plan_meter.Heap):
the caches of train and val filled batch by batch, training steps until the heap stops growing,
validation, a checkpoint (clones of the trainable state and its serialised bytes), the test split
cached and evaluated. Freed heap blocks stay with the process, so the heap training cut is still
held when a later phase maps its large blocks; the estimate is that replay's most resident
moment: what is alive then plus the freed chunks malloc holds (bench/results/plan_check.json
compares it with real runs).

Allocators hold more still: 10% is added (CUDA's caching allocator rounds and fragments; glibc
fragments more than the replay's best fit, and loading leaves copies). ``cuda`` adds a CUDA
context (~0.5 GiB), ``cpu`` the process baseline (Python, libraries, data: this process's
resident memory, having loaded the same). Not simulated: captioning's generation in evaluation,
buffers inside kernels (oneDNN, cuBLAS), the shard buffers of ``train.feature_cache_dir``.
"""

from __future__ import annotations

import math
import re
from collections import namedtuple
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import torch

from . import hub_configs
from .backbones import TOWERS, BackboneInfo, Tower
from .data import load_splits
from .errors import DataError, PeftmmError
from .io import format_size
from .model import MultimodalModel, _task_needs_lm
from .plan_blueprint import blueprint
from .plan_meter import (  # noqa: F401
    Meter,
    ShapeBatcher,
    ShapeCache,
    autocast,
    checkpoint_trace,
    emulate_bitsandbytes,
    file_itemsize,
    most_per_batch,
    quantised_source_bytes,
    replay_run,
    weight_bytes,
)
from .precision import AUTOCAST_DTYPES, mixed_precision, planned_facts
from .recipe import from_dict
from .sampling import ImageGroupedBatchSampler
from .tensors import to_device

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


@lru_cache(maxsize=8)
def _blueprint(name: str, source: str, image_size: int | None, causal_lm: bool):
    """plan_blueprint.blueprint, or for a hub id while the hub cannot be reached, peftmm/hub_configs'
    copy of its config (``.offline`` set: the plan says so)."""
    folder = hub_configs.folder_for(source)
    if folder is not None and not Path(source).expanduser().exists() and not hub_configs.hub_reachable():
        return hub_configs.blueprint(name, source, folder, image_size, causal_lm)
    return blueprint(name, source, image_size=image_size, causal_lm=causal_lm)


def empty_tower(name: str, spec, causal_lm: bool = False) -> Tower:
    """A tower on the meta device, as load_tower would build it, without weights."""
    causal_lm = causal_lm and name == "text"
    plan = _blueprint(name, spec.backbone, spec.image_size if name == "vision" else None, causal_lm)
    model = plan.empty_model(spec.precision).requires_grad_(False).eval()
    info = BackboneInfo(spec.backbone, plan.model_type, "", spec.precision, 0, plan.layout)
    tower = Tower(name, model, info, plan.processor)
    tower.causal_lm = causal_lm
    tower.file_itemsize = file_itemsize(plan.folder, plan.config)   # bytes a weight in its checkpoint file
    tower.offline = plan.offline
    with Meter(), torch.no_grad():
        info.hidden_size = tower(**tower.probe_inputs())[0].shape[-1]
    return tower


class Planner:
    """Estimates over one recipe's data; the variants that knobs try reuse its data and tokens."""

    def __init__(self, recipe):
        self.recipe, self.splits = recipe, load_splits(recipe.data)
        if not (self.splits.train and self.splits.val):   # training refuses these too
            raise DataError(f"the train or val split of data.source {recipe.data.source} is empty: nothing to plan")

    def train_batches(self, spec):
        """The trainer's batches of one epoch (index lists): its sampler, its seed."""
        if spec.group_by_image:
            return ImageGroupedBatchSampler(self.splits.train, spec.batch_size, spec.seed)
        shuffled = torch.utils.data.RandomSampler(self.splits.train, generator=torch.Generator().manual_seed(spec.seed))
        return torch.utils.data.BatchSampler(shuffled, spec.batch_size, drop_last=False)

    def estimate(self, recipe=None, device: str = "cuda", baseline: int | None = None) -> Estimate:
        recipe, splits = recipe or self.recipe, self.splits
        if device not in ("cuda", "cpu"):
            raise PeftmmError(f"device {device!r}: plan for cuda or cpu")
        towers = {name: empty_tower(name, getattr(recipe, name), _task_needs_lm(recipe)) for name in TOWERS}
        for name, tower in towers.items():
            emulate_bitsandbytes(tower.model, getattr(recipe, name).precision, device)
        with Meter():   # (methods find their places with a forward pass, on meta tensors here)
            model = MultimodalModel.build(recipe, splits.labels, device="meta", towers=towers)
        task, spec = model.task, recipe.train
        task.prepare_shapes(model, splits.train)   # captioning: the retrieved captions' memory
        own_text = task.own_text_inputs   # captioning: one LM row per caption
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
            return ShapeBatcher(model, caches)([{**pool[i % len(pool)], "image": images[i % len(images)],
                                                  "text": texts[i % len(texts)]} for i in range(most["rows"])])

        distinct = id if own_text else key
        train_most = most_per_batch(splits.train, self.train_batches(spec), distinct)
        size = spec.eval_batch_size   # validation each epoch and the test split at the end, in evaluate's order
        ordered = [sorted(split, key=lambda e: str(e["image"])) for split in (splits.val, splits.test) if split]
        eval_most = {k: max(most_per_batch(o, [range(i, min(i + size, len(o))) for i in range(0, len(o), size)],
                                           distinct)[k] for o in ordered) for k in ("rows", "images", "texts")}
        mixed = mixed_precision(spec.mixed_precision, planned_facts(device)) if device == "cuda" else "no"
        dtype = AUTOCAST_DTYPES.get(mixed)   # precision.py: what the trainer would pick on that card
        casts = partial(autocast, dtype) if dtype is not None else nullcontext
        trainable = [p for p in model.parameters() if p.requires_grad]
        weights = sum(p.numel() * p.element_size() for p in trainable)
        caching = {f"caching {name} features": name for name in caches}
        phases, traces = {}, {}
        for phase, name in caching.items():   # encoding one batch for the feature cache (towers run bare)
            phases[phase], traces[phase] = self._cache_batch(model.towers[name], longest, recipe.text.max_length,
                                                             sum(lengths.values()) / max(len(lengths), 1))
        for phase, make, train in (("a training step", lambda: batch(train_most, splits.train), trainable),
                                   ("an evaluation batch", lambda: batch(eval_most, sum(ordered, [])), None)):
            phases[phase], traces[phase] = self._step(model, make, train, casts)
        held = {}
        if device == "cpu":
            phases["writing a checkpoint"] = 3 * 4 * weights   # (plan_meter.checkpoint_trace)
            held = self._timeline(traces, caching, trainable, key, size)
            phase = held["peak_phase"]
        else:
            phase = max(phases, key=phases.get)

        cached = {name: cache.nbytes(str(e["image"]) if name == "vision" else key(e) for e in everything)
                  for name, cache in caches.items()}
        parts = [Part(f"{name} weights (frozen, {getattr(recipe, name).precision})",
                      weight_bytes(model.towers[name].model, getattr(recipe, name).precision),
                      getattr(recipe, name).backbone) for name in TOWERS]
        if device == "cpu":
            pages = {name: quantised_source_bytes(model.towers[name].model, getattr(recipe, name).precision,
                                                  model.towers[name].file_itemsize) for name in TOWERS}
            parts.append(Part("weight files kept mapped", sum(pages.values()),
                              "pages int8/nf4 was quantised from: " + ", ".join(
                                  f"{n} {format_size(b)}" for n, b in pages.items() if b) if any(pages.values())
                              else "none: no tower quantised"))
        cache_note = ", ".join(f"{n} {format_size(b)}" for n, b in cached.items()) or "no tower cached"
        parts += [Part("trainable weights", weights, f"{sum(p.numel() for p in trainable):,} parameters"),
                  Part("gradients", weights, "one per trainable weight"),
                  Part("AdamW states", 2 * weights, "two moments per trainable weight"),
                  Part("fp32 master copies", 0, "none: AdamW updates the trainable weights in place, in their dtype"),
                  Part("best epoch's weights", weights, "the trainable weights of the best epoch so far, a copy"),
                  Part("feature cache", sum(cached.values()), cache_note) if device == "cpu" else
                  Part("feature cache", 0, "in host memory, not on the card" + (f": {cache_note}" if cached else "")),
                  Part("activations", held["own"] if held else phases[phase],
                       f"alive at the peak, in {phase}" if held else f"peak of {phase}")]
        if device == "cpu":
            parts.append(Part("freed memory malloc keeps", held["free_at_peak"],
                              f"freed heap chunks glibc malloc holds at the peak (replayed: {held['steps']} steps)"))
        parts.append(Part("allocator overhead", int(ALLOCATOR_SLACK * sum(p.bytes for p in parts)),
                          "10%: " + ("the caching allocator's rounding and fragmentation" if device == "cuda"
                                     else "malloc's fragmentation, copies made while loading")))
        parts.append(Part("CUDA context", CUDA_CONTEXT, "runtime and library workspaces") if device == "cuda" else
                     Part("process baseline", process_baseline() if baseline is None else baseline,
                          "Python, torch, transformers and the data"))
        return Estimate(recipe.name, device, parts, {
            "train_batch": train_most, "eval_batch": eval_most, "trainable_params": sum(p.numel() for p in trainable),
            "phases": phases, "peak_phase": phase, **held,
            "cached": sorted(caches), "longest_text_tokens": lengths[longest[0]] if longest else 0,
            "mixed_precision": mixed, "checkpointed": [n for n, t in model.towers.items() if t.checkpointed],
            "offline": {n: getattr(recipe, n).backbone for n, t in towers.items() if t.offline}})

    @staticmethod
    def _step(model, make_batch, trainable, casts) -> tuple[int, list]:
        """Peak bytes of one batch, and its trace (plan_meter.Meter): forward (and backward, given
        ``trainable``) on the meta device."""
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
        for p in trainable or []:
            p.grad = None
        return meter.peak, meter.trace()

    @staticmethod
    def _cache_batch(tower, longest, max_length, mean_tokens) -> tuple[int, list]:
        """One batch of FeatureCache.fill: inputs, the tower, one entry per input (kept: never
        freed in the trace), without padding (texts: ``mean_tokens`` each)."""
        with Meter() as meter, torch.no_grad():
            if tower.name == "vision":
                size = tower.processor.size
                inputs = {"pixel_values": torch.stack([torch.zeros(3, size, size, device="meta")
                                                       for _ in range(CACHE_BATCH)])}
            else:
                inputs = to_device(tower.tokenize(longest[:CACHE_BATCH], max_length), "meta")
            tokens, mask = tower(**inputs)
            n = tokens.shape[1] if tower.name == "vision" else max(1, round(mean_tokens))
            entries = [t[:n].clone() for t in tokens]
            del inputs, tokens, mask
        del entries
        return meter.peak, meter.trace()

    def _timeline(self, traces, caching, trainable, key, eval_size) -> dict:
        """CPU: the phases in the trainer's order through plan_meter's malloc model: the caches of
        train and val filled batch by batch, training steps, validation, a checkpoint, the test
        split cached and evaluated."""
        traces["writing a checkpoint"] = checkpoint_trace([p.numel() * p.element_size() for p in trainable] * 4)

        def fill(examples):   # whole batches, then the last one keeping only its own entries
            out = []
            for phase, name in caching.items():
                n, trace = len({str(e["image"]) if name == "vision" else key(e) for e in examples}), traces[phase]
                kept = sorted({s for s, size in trace if size is not None} - {s for s, size in trace if size is None})
                out.append((phase, n // CACHE_BATCH, trace))
                if n % CACHE_BATCH:
                    dropped = set(kept[n % CACHE_BATCH - CACHE_BATCH:])
                    out.append((phase, 1, [e for e in trace if e[0] not in dropped]))
            return out

        splits, evaluation = self.splits, traces["an evaluation batch"]
        return replay_run([*fill(splits.train + splits.val), ("a training step", None, traces["a training step"]),
                           ("an evaluation batch", -(-len(splits.val) // eval_size), evaluation),
                           ("writing a checkpoint", 1, traces["writing a checkpoint"]),
                           *fill(splits.test), ("an evaluation batch", -(-len(splits.test) // eval_size), evaluation)])

    @staticmethod
    def _caches(model, recipe, lengths) -> dict:
        """Stand-ins for the caches training fills (evaluation.build_caches' rule)."""
        out = {name: model.towers[name] for name in TOWERS if not model.has_trainable(name)
               and getattr(recipe, name).cache_features and name in model.task.cached_towers}
        if "text" in out:
            out["text"] = ShapeCache(lengths, out["text"].info.hidden_size)
        if "vision" in out:
            with Meter(), torch.no_grad():
                size = out["vision"].processor.size
                tokens = out["vision"](pixel_values=torch.zeros(1, 3, size, size, device="meta"))[0]
            out["vision"] = ShapeCache(tokens.shape[1], tokens.shape[2])
        return out

    def suggestions(self, estimate: Estimate, budget: int, baseline: int | None = None) -> list[Suggestion]:
        """Knobs in the order to try them (batch size, int8, checkpointing, caching), each with
        the estimate after turning it alone; only those that lower the estimate."""
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

