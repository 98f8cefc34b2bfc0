"""Adapter arithmetic: bundles on the same backbone weights combined into one adapter.

LoRA pairs combine as peft's ``add_weighted_adapter`` combines them (combination types
``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``cat``), through peft's own merge_utils
functions: per layer, adapter i's A and B are weighted by sqrt(|w_i * scaling_i|) (the sign goes
on A), and the weighted A's and B's are combined separately. ``cat`` instead stacks the adapters
along the rank (A_i weighted by w_i * scaling_i), so the delta is exactly sum_i w_i delta_i at
rank sum_i r_i. peft gives the new adapter scaling 1 (alpha = r); a merged bundle keeps its first
bundle's LoRA settings instead (for ``cat`` with rank and alpha grown by the number of sources),
so both factors are divided by sqrt(scaling) there and B A * scaling is peft's delta weight exactly.

Every other trained tensor (bottleneck adapters, prefixes, DoRA magnitudes, fusion, head) is
the weighted sum of the sources' tensors. What a task built from data (``memory.*``) must be
the same in every source. Bundles merge only where they agree: the same task, labels, backbone
weights (fingerprints), methods per tower, fusion, and tensor names and shapes; the first
difference is refused by bundle and tensor, before anything is loaded or written.

The same combination serves two callers: ``peftmm merge`` (:func:`merge_bundles`) writes a
bundle, and the runtime's request-time mixes (Runtime.register_mix) keep it in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.merge_utils import dare_linear, dare_ties, task_arithmetic, ties

from . import recipe as recipes
from .backbones import TOWERS
from .bundle import (
    WEIGHTS,
    bundle_summary,
    check_adapter_name,
    load_bundle,
    read_config,
    read_header,
    resolve_bundle,
    save_bundle,
)
from .bundle_files import member
from .errors import MergeError, PeftmmError
from .methods import METHODS
from .model import MultimodalModel
from .safe_load import short_repr
from .tasks.base import MEMORY

# peft's combination types this supports, each (task tensors, weights, density) -> combined tensor.
# majority_sign_method "total" is add_weighted_adapter's default.
COMBINATIONS = {
    "linear": lambda tensors, weights, density: task_arithmetic(tensors, weights),
    "ties": lambda tensors, weights, density: ties(tensors, weights, density, "total"),
    "dare_linear": lambda tensors, weights, density: dare_linear(tensors, weights, density),
    "dare_ties": lambda tensors, weights, density: dare_ties(tensors, weights, density, "total"),
}
CAT = "cat"   # LoRA factors side by side: no tensor function, the rank grows (_concatenated_lora)
MERGE_METHODS = (*COMBINATIONS, CAT)
PRUNING = ("ties", "dare_linear", "dare_ties")   # the types that read a density
LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"   # peft's names, as bundles store them


@dataclass(frozen=True)
class Combination:
    """How sources combine: peft's combination type, one weight per source, the density the
    pruning types keep, and the seed of DARE's random pruning."""
    method: str
    weights: tuple[float, ...]
    density: float | None = None
    seed: int | None = None

    def record(self, sources: list[dict]) -> dict:
        """What a merged bundle's config (key ``merge``) and card say was merged."""
        return {"method": self.method, "weights": list(self.weights), "density": self.density, "seed": self.seed,
                "sources": sources}


def combination(count: int, weights=None, method: str = "linear", density: float | None = None,
                seed: int | None = None) -> Combination:
    """Check the options of a merge of ``count`` sources; weights default to 1/count each."""
    if method not in MERGE_METHODS:
        raise MergeError(f"merge method {short_repr(method)} is not known; choose one of: "
                         f"{', '.join(MERGE_METHODS)}")
    if count < 1:
        raise MergeError("a merge needs at least one bundle")
    weights = [1.0 / count] * count if weights is None else list(weights)
    if len(weights) != count:
        raise MergeError(f"{len(weights)} weight{'s' if len(weights) != 1 else ''} for {count} bundle"
                         f"{'s' if count != 1 else ''}: give one weight per bundle, in their order")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise MergeError(f"merge weight {short_repr(weight)} is not a finite number")
    if method in PRUNING:
        if density is None:
            raise MergeError(f"merge method {method} prunes: give the density to keep, in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise MergeError(f"density {short_repr(density)} is out of range: it must be in (0, 1] "
                             "(the share of each adapter's values kept)")
    elif density is not None:
        raise MergeError(f"density applies to {', '.join(PRUNING)} only, not to {method}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MergeError(f"seed {short_repr(seed)} must be a whole number")
    return Combination(method, tuple(float(w) for w in weights), None if density is None else float(density), seed)


# -- agreement --------------------------------------------------------------------------------

def check_agree(sources: list[tuple[str, dict, dict]]) -> None:
    """MergeError at the first way a source differs from the first one.

    ``sources``: (label, bundle config, {tensor name: shape}) each; the label names the source
    in messages (a bundle's path, a registered adapter's name).
    """
    first, config, shapes = sources[0]
    for tower in TOWERS:
        if any(m.get("type") == "full" for m in config["recipe"][tower].get("methods", [])):
            raise MergeError(f"its {tower} tower is fine-tuned in full: merge combines parameter-efficient "
                             "methods on shared backbones, not whole backbones", first)
    for label, other, other_shapes in sources[1:]:
        difference = _difference(first, config, shapes, other, other_shapes)
        if difference:
            raise MergeError(f"{difference}; only bundles that agree with {first} merge", label)


def _difference(first: str, config: dict, shapes: dict, other: dict, other_shapes: dict) -> str | None:
    """How ``other`` (config, tensor shapes) first differs from the first source, or None."""
    if other["task"] != config["task"]:
        return f"its task is {other['task']}, not {config['task']}"
    for tower in TOWERS:
        mine, theirs = config["towers"][tower]["fingerprint"], other["towers"][tower]["fingerprint"]
        if mine != theirs:
            return (f"its {tower} backbone {other['towers'][tower]['backbone']!r} has weight fingerprint "
                    f"{theirs[:12]}, not {mine[:12]}: other backbone weights")
        types = [_method_type(m) for m in config["recipe"][tower].get("methods", [])]
        other_types = [_method_type(m) for m in other["recipe"][tower].get("methods", [])]
        if types != other_types:
            return (f"its {tower} methods are {', '.join(other_types) or 'none'}, "
                    f"not {', '.join(types) or 'none'}: other methods")
    if other["labels"] != config["labels"]:
        index = next((i for i, (a, b) in enumerate(zip(other["labels"], config["labels"])) if a != b),
                     min(len(other["labels"]), len(config["labels"])))
        found = short_repr(other["labels"][index]) if index < len(other["labels"]) else "nothing"
        wanted = short_repr(config["labels"][index]) if index < len(config["labels"]) else "nothing"
        return f"its labels differ ({len(other['labels'])} labels; label {index} is {found}, not {wanted})"
    fusion, other_fusion = config["recipe"]["fusion"], other["recipe"]["fusion"]
    if other_fusion != fusion:
        return f"its fusion {_compact(other_fusion)} is not {_compact(fusion)}: another fusion"
    for name in sorted(set(shapes) | set(other_shapes)):
        if name not in other_shapes:
            return f"it lacks tensor {name}"
        if name not in shapes:
            return f"it has tensor {name}, which {first} lacks"
        if tuple(shapes[name]) != tuple(other_shapes[name]):
            return f"tensor {name} has shape {tuple(other_shapes[name])}, not {tuple(shapes[name])}"
    return None


def _method_type(method) -> str:
    return str(method.get("type")) if isinstance(method, dict) else str(method)


def _compact(data) -> str:
    return json.dumps(data, sort_keys=True)


# -- combining loaded models ----------------------------------------------------------------------

@torch.no_grad()
def combine_into(out, sources: list, how: Combination, labels: list[str]) -> None:
    """Overwrite the trained tensors of model ``out`` with the combination of ``sources``
    (models whose methods live in the same towers as ``out``'s, each in its own slot);
    ``labels`` name the sources in messages."""
    memory = sources[0].task.memory_tensors()
    for label, source in zip(labels[1:], sources[1:]):
        theirs = source.task.memory_tensors()
        for name, tensor in memory.items():
            if name not in theirs or not torch.equal(theirs[name].to(tensor.device), tensor):
                raise MergeError(f"its task data {MEMORY}.{name} differs from {labels[0]}'s: it was built from "
                                 "other training data, and such bundles do not merge", label)
    if memory:   # the same in every source; a model built afresh (cat) has none yet
        out.task.load_memory(dict(memory))
    slots = [source.slot for source in sources]
    lora: set[str] = set()
    for tower_name in TOWERS:
        with torch.random.fork_rng():   # DARE draws its masks from torch's global generator
            if how.seed is not None:
                torch.manual_seed(how.seed)
            lora |= {f"{tower_name}.{name}" for name in _combine_lora(out.towers[tower_name], out.slot, slots, how)}
    target = out.trainable_state_dict()
    states = [source.trainable_state_dict() for source in sources]
    for name, tensor in target.items():
        if name.endswith((LORA_A, LORA_B)) and _pair(name) in lora:
            continue
        if not tensor.dtype.is_floating_point:   # counters and the like: the same in every source, or refused
            other = next((label for label, state in zip(labels, states) if not torch.equal(state[name], tensor)), None)
            if other is not None:
                raise MergeError(f"tensor {name} ({tensor.dtype}) differs from {labels[0]}'s and does not average",
                                 other)
            continue
        total = sum(weight * state[name].to(torch.float32) for weight, state in zip(how.weights, states))
        tensor.copy_(total.to(tensor.dtype))


def _pair(name: str) -> str:
    """The module a LoRA A or B tensor belongs to (its name without the LoRA suffix)."""
    return name.removesuffix(LORA_A).removesuffix(LORA_B)


def _combine_lora(tower, out_slot: str, slots: list[str], how: Combination) -> list[str]:
    """Combine the LoRA layers of one tower, in the order peft visits them (module order, as
    ``add_weighted_adapter`` does), so DARE's random masks follow the same draws. Returns the
    layers' module names as a bundle stores them (no ``base_layer`` steps)."""
    done = []
    for module_name, layer in tower.model.named_modules():
        if not isinstance(layer, LoraLayer) or out_slot not in layer.lora_A:
            continue
        A, B = _weighted_lora(layer, slots, how)
        root = math.sqrt(layer.scaling[out_slot])   # the output's own scaling, folded back out
        layer.lora_A[out_slot].weight.copy_(A / root)
        layer.lora_B[out_slot].weight.copy_(B / root)
        done.append(".".join(part for part in module_name.split(".") if part != "base_layer"))
    return done


def _weighted_lora(layer, slots: list[str], how: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's _generalized_task_arithmetic_weighted_adapter for one layer: (A, B) of the new
    adapter at scaling 1."""
    if how.method == CAT:
        return _concatenated_lora(layer, slots, how)
    weights_a, weights_b, tensors_a, tensors_b = [], [], [], []
    for slot, weight in zip(slots, how.weights):
        scaled = weight * layer.scaling[slot]
        sign = 1 if scaled >= 0 else -1   # on A only: on both it would cancel
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
        tensors_a.append(layer.lora_A[slot].weight.data)
        tensors_b.append(layer.lora_B[slot].weight.data)
    dtype = tensors_a[0].dtype
    combine = COMBINATIONS[how.method]
    A = combine(tensors_a, torch.tensor(weights_a).to(tensors_a[0].device), how.density)
    B = combine(tensors_b, torch.tensor(weights_b).to(tensors_b[0].device), how.density)
    return A.to(dtype), B.to(dtype)


def _concatenated_lora(layer, slots: list[str], how: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``cat`` for one layer: the A's (each times w_i * scaling_i) stacked along the rank
    and the B's beside them, so B A is sum_i w_i B_i A_i scaling_i, at scaling 1."""
    A = torch.cat([layer.lora_A[slot].weight.data * (weight * layer.scaling[slot])
                   for slot, weight in zip(slots, how.weights)], dim=0)
    B = torch.cat([layer.lora_B[slot].weight.data for slot in slots], dim=1)
    return A, B


def output_model(path: Path, config: dict, how: Combination, device, towers: dict, slot: str):
    """(model, recipe) a combination of ``how.weights``'s sources is written into: the first
    source's bundle (``path``, ``config``) rebuilt under ``slot``, whose tensors combine_into
    overwrites; for ``cat`` its recipe with every LoRA's rank grown by the number of sources,
    built without weights (combine_into sets them all)."""
    if how.method != CAT:
        model, recipe, _ = load_bundle(path, device, towers=towers, slot=slot)
        return model, recipe
    recipe = recipes.from_dict(config["recipe"], source=str(path))
    for tower in TOWERS:
        spec = getattr(recipe, tower)
        try:
            spec.methods = [METHODS.get(m.type).concatenated(m, len(how.weights)) for m in spec.methods]
        except PeftmmError as error:
            raise MergeError(f"{tower}.methods: {error.message}", str(path)) from None
    model = MultimodalModel.build(recipe, config["labels"], device=device, towers=towers, slot=slot)
    return model.eval(), recipe


# -- peftmm merge -------------------------------------------------------------------------------

def bundle_fingerprint(path: Path) -> str:
    """sha256 of a bundle's weights file: names the exact tensors that went into a merge."""
    digest = hashlib.sha256()
    with open(member(path, WEIGHTS), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge(out: str | Path, bundles: list[str | Path], weights: list[float] | None = None, method: str = "linear",
          density: float | None = None, seed: int | None = None, device: str = "cpu", overwrite: bool = False) -> Path:
    """``peftmm merge`` from Python: ``bundles`` are folders, run directories, names under
    ./adapters or Hub references (resolve_bundle); the options are checked first (:func:`combination`)."""
    how = combination(len(bundles), weights, method, density, seed)
    return merge_bundles(out, [resolve_bundle(b) for b in bundles], how, device=device, overwrite=overwrite)


def merge_bundles(out: str | Path, bundles: list[str | Path], how: Combination, device: str = "cpu",
                  overwrite: bool = False) -> Path:
    """Write the combination of ``bundles`` (resolved folders) as an ordinary bundle at ``out``.

    Every check runs before anything is written; the bundle is written atomically (save_bundle).
    """
    out = Path(out)
    paths = [Path(p) for p in bundles]
    if len(how.weights) != len(paths):
        raise MergeError(f"{len(how.weights)} weights for {len(paths)} bundles: give one weight per bundle")
    name = check_adapter_name(out.name)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MergeError("already exists; use --force to replace it", str(out))
    configs = []
    for path in paths:   # config, header and checksum of each, as load_bundle checks them
        bundle_summary(path)
        configs.append(read_config(path))
    check_agree([(str(p), c, _header_shapes(p)) for p, c in zip(paths, configs)])
    sources, towers = [], None
    try:
        for index, path in enumerate(paths):
            model, _, _ = load_bundle(path, device, towers=towers, slot=f"merge_source_{index}")
            sources.append(model)
            towers = dict(model.towers)
        merged, recipe = output_model(paths[0], configs[0], how, device, towers, "merge_result")
        sources.append(merged)
        combine_into(merged, sources[:-1], how, [str(p) for p in paths])
        data = recipe.to_dict()
        data["name"] = name
        record = how.record([{"name": c["name"], "path": str(p), "weights_sha256": bundle_fingerprint(p)}
                             for p, c in zip(paths, configs)])
        return save_bundle(merged, recipes.from_dict(data, source=str(out)), out, metrics={}, overwrite=overwrite,
                           precision=configs[0].get("precision"), extra={"merge": record})
    finally:
        for model in reversed(sources):
            model.remove_methods()


def _header_shapes(path: Path) -> dict[str, list]:
    return {k: v["shape"] for k, v in read_header(path).items() if k != "__metadata__"}
