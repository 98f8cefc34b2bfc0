"""LoRA through peft, with targets resolved inside one tower only, and peft's LoRA variants:
DoRA, rsLoRA, initialisations (Gaussian, PiSSA, OLoRA), rank and alpha per module, LoRA+.

PiSSA and OLoRA start by moving part of each target's frozen weight into the LoRA factors
(W = W_res + s B0 A0). A bundle must rebuild on the unchanged backbone, so what it stores is the
plain LoRA that adds the same change to W: B A - B0 A0 = [B | -B0] [A ; A0], rank 2r (peft's own
conversion, ``subtract_mutated_init``); see :meth:`LoRA.export`.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import PeftmmError, RecipeError
from . import METHODS
from .base import DEFAULT_SLOT, Method, match_targets

PLAIN_INITS = ("default", "gaussian")   # leave the frozen weights alone
MUTATING_INITS = ("pissa", "olora")     # move part of W into the factors (plus pissa_niter_N)
QUANTISED = ("int8", "nf4")
# peft 0.21's LoftQ either rewrites fp32 weights with their quantised copy (no plain LoRA on the
# unchanged backbone can express W_q - W, and it needs scipy) or, for nf4 layers, runs on CUDA only
_LOFTQ = ("init_lora_weights = 'loftq' is not supported: peft's LoftQ replaces the frozen weights by their "
          "quantised copy, which no bundle on the unchanged backbone can express; train LoRA on a precision: "
          "nf4 tower with init_lora_weights: default (QLoRA) instead")
_PISSA_FAST = re.compile(r"pissa_niter_[1-9][0-9]{0,2}")


def mutates_base(init: str) -> bool:
    return init in MUTATING_INITS or bool(_PISSA_FAST.fullmatch(init))


@METHODS.register("lora")
class LoRA(Method):
    mergeable = True
    mixed_batches = True  # peft's adapter_names: each row through its own adapter
    slot_fragments = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")

    @dataclass
    class Config:
        r: int = field(default=8, metadata={"min": 1, "max": 1024})
        alpha: float = field(default=16.0, metadata={"gt": 0.0})
        dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})
        targets: list[str] | None = None   # None: the architecture's defaults (architectures.json)
        use_dora: bool = False             # weight-decomposed LoRA: a trained magnitude per output
        use_rslora: bool = False           # scale by alpha / sqrt(r) instead of alpha / r
        init_lora_weights: str = "default"  # default | gaussian | pissa | pissa_niter_N | olora
        # target pattern -> rank / alpha for the modules it matches (first matching key wins)
        rank_pattern: dict[str, int] = field(default_factory=dict)
        alpha_pattern: dict[str, float] = field(default_factory=dict)
        # LoRA+: lora_B (and DoRA's magnitudes) train at lr * this ratio
        loraplus_lr_ratio: float | None = field(default=None, metadata={"gt": 0.0, "max": 10_000.0})

        def validate(self):
            init = self.init_lora_weights
            if init == "loftq":
                raise ValueError(_LOFTQ)
            if init not in PLAIN_INITS + MUTATING_INITS and not _PISSA_FAST.fullmatch(init):
                raise ValueError(f"init_lora_weights = {init!r} is not allowed; choose one of: default, gaussian, "
                                 "pissa, pissa_niter_N (N = 1..999), olora")
            for key, value in self.rank_pattern.items():
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
                    raise ValueError(f"rank_pattern.{key} = {value!r}: a rank must be an integer in 1..1024")
            for key, value in self.alpha_pattern.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ValueError(f"alpha_pattern.{key} = {value!r}: an alpha must be a number > 0")

    def __init__(self, config, slot: str = DEFAULT_SLOT):
        super().__init__(config, slot)
        self.mixed_batches = not config.use_dora  # peft: "Cannot pass `adapter_names` when DoRA is enabled"

    @classmethod
    def check_precision(cls, config, precision: str, key: str, where: str | None = None) -> None:
        """Refuse what peft cannot do on bitsandbytes layers (measured with peft 0.21, bitsandbytes 0.50)."""
        if precision not in QUANTISED:
            return
        if config.use_dora and precision == "int8":
            raise RecipeError(f"{key}.use_dora: DoRA on int8 (bitsandbytes Linear8bitLt) layers fails in peft; "
                              "use precision: nf4, bf16 or fp32, or use_dora: false", where)
        if mutates_base(config.init_lora_weights):
            raise RecipeError(f"{key}.init_lora_weights = {config.init_lora_weights!r} is refused on a {precision} "
                              "tower: it rewrites the frozen weights, which quantised (bitsandbytes) layers would "
                              "re-quantise, so no bundle could rebuild the tower on the unchanged backbone; "
                              "use precision: fp32 or bf16, or init_lora_weights: default", where)

    def learning_rate(self, parameter_name: str, lr: float) -> float:
        ratio = self.config.loraplus_lr_ratio
        if ratio is not None and (".lora_B." in f".{parameter_name}" or ".lora_magnitude_vector." in parameter_name):
            return lr * ratio  # as peft's create_loraplus_optimizer groups them
        return lr

    def inject(self, tower) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = self.config
        targets, ranks, alphas = lora_layout(tower, config)
        if mutates_base(config.init_lora_weights):
            _check_mutating_init(tower, config.init_lora_weights, targets, self.slot)
        # peft gets exact module names, never suffixes: a suffix like q_proj must not reach
        # past this tower (the LLaVA mis-targeting bug).
        inside = {name: _inside_adapter(tower.model, name) for name in targets}
        self.target_modules = list(inside.values())
        init = True if config.init_lora_weights == "default" else config.init_lora_weights
        if mutates_base(config.init_lora_weights) and next(tower.model.parameters()).is_meta:
            init = True  # the planner (plan.py) builds on meta tensors: shapes only, nothing to decompose
        self.peft_config = LoraConfig(
            r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=self.target_modules,
            use_dora=config.use_dora, use_rslora=config.use_rslora, init_lora_weights=init,
            rank_pattern={re.escape(inside[m]): r for m, r in ranks.items()},
            alpha_pattern={re.escape(inside[m]): a for m, a in alphas.items()})
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # peft's own PiSSA-to-LoRA conversion cannot do rsLoRA with patterns; export (below) can
            warnings.filterwarnings("ignore", message="Using Rank-Stabilized LoRA with rank_pattern")
            torch.manual_seed(0)  # randomised SVD (pissa_niter_N): the same start on a resumed run
            inject_adapter_in_model(self.peft_config, tower.model, adapter_name=self.slot)
        _expose_conv_geometry(tower.model)
        _follow_tower_slots(tower)
        self.initial = {}  # PiSSA/OLoRA: (B0, A0) per layer, what export subtracts
        if mutates_base(config.init_lora_weights):
            self.initial = {layer: (layer.lora_B[self.slot].weight.detach().clone(),
                                    layer.lora_A[self.slot].weight.detach().clone())
                            for layer in self._layers(tower)}

    def _layers(self, tower) -> list:
        return [layer for layer in _lora_layers(tower.model) if self.slot in layer.lora_A]

    def remove(self, tower) -> None:
        for layer in self._layers(tower):
            if layer in self.initial:  # give the shared backbone its own weights back
                b0, a0 = self.initial[layer]
                with torch.no_grad():
                    layer.get_base_layer().weight += layer.scaling[self.slot] * (b0 @ a0)
            layer.delete_adapter(self.slot)
        self.initial = {}
        _follow_tower_slots(tower)  # peft re-sets the active adapters when deleting one

    def merge(self, tower) -> None:
        """Fold B A into the frozen weights: inference then costs what the backbone alone costs."""
        if tower.info.precision in QUANTISED:
            raise PeftmmError(f"{tower.name}.methods lora: cannot merge into {tower.info.precision} weights "
                              "without re-quantising them (outputs would change); load the backbone in fp32 or bf16")

        for layer in self._layers(tower):
            layer.merge(adapter_names=[self.slot])

    def export(self, tower, state: dict) -> tuple[dict, object]:
        """A PiSSA/OLoRA LoRA as the plain LoRA of rank 2r that changes the unchanged backbone the
        same way; every other LoRA as it is."""
        if not self.initial:
            return state, self.config
        names = {layer: name for name, layer in tower.model.named_modules()}
        state = dict(state)
        for layer, (b0, a0) in self.initial.items():
            stem = self.canonical_name(f"{names[layer]}.lora_A.{self.slot}.weight").rsplit(".lora_A.", 1)[0]
            a_key, b_key = f"{stem}.lora_A.{DEFAULT_SLOT}.weight", f"{stem}.lora_B.{DEFAULT_SLOT}.weight"
            state[a_key] = torch.cat([state[a_key], a0], dim=0)
            state[b_key] = torch.cat([state[b_key], -b0], dim=1)
        return state, replace(_side_by_side(self.config, 2), init_lora_weights="default")

    @classmethod
    def concatenated(cls, config, count: int):
        """``count`` LoRAs of ``config`` side by side: rank x count at the same scaling."""
        if config.use_dora:
            raise PeftmmError("lora: DoRA's magnitude vectors hold the norm of the whole adapted weight and do not "
                              "concatenate; merge DoRA bundles with linear, ties or the dare methods")
        return _side_by_side(config, count)


def _side_by_side(config, count: int):
    """The LoRA config of ``count`` adapters of ``config`` concatenated along the rank: rank
    r x count at the same scaling (alpha / r needs alpha x count, alpha / sqrt(r) needs alpha x
    sqrt(count)), per-module patterns alike."""
    grow = math.sqrt(count) if config.use_rslora else float(count)
    grown = replace(config, r=count * config.r, alpha=config.alpha * grow,
                    rank_pattern={k: count * v for k, v in config.rank_pattern.items()},
                    alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()})
    grown.type = config.type   # the registry sets it on the instance; replace() builds a new one
    return grown


def lora_layout(tower, config) -> tuple[list[str], dict[str, int], dict[str, float]]:
    """The tower's LoRA targets (exact module names), and the rank and alpha of those that
    rank_pattern / alpha_pattern set (resolved in this tower, never past it)."""
    patterns = config.targets or tower.arch.get("lora_targets")
    if not patterns:
        raise PeftmmError(f"{tower.name}.methods lora: no default targets for {tower.info.model_type}; "
                          "set targets: [...] in the recipe")
    targets = match_targets(tower, patterns)
    return targets, _per_module(tower, config.rank_pattern, targets, "rank_pattern"), \
        _per_module(tower, config.alpha_pattern, targets, "alpha_pattern")


def _per_module(tower, pattern: dict, targets: list[str], key: str) -> dict:
    chosen: dict = {}
    for name, value in pattern.items():
        hits = [m for m in match_targets(tower, [name], key=f"lora {key}") if m in targets]
        if not hits:
            raise PeftmmError(f"{tower.name}.methods lora {key}: {name!r} matches none of the LoRA targets "
                              f"({_few(targets)}); add the modules to targets, or correct the pattern")
        for module in hits:
            chosen.setdefault(module, value)
    return chosen


def _check_mutating_init(tower, init: str, targets: list[str], slot: str) -> None:
    if slot != DEFAULT_SLOT:
        raise PeftmmError(f"{tower.name}.methods lora: init_lora_weights = {init!r} rewrites the frozen weights, "
                          "which a backbone shared with other adapters cannot allow; load its bundle (saved as "
                          "plain LoRA) instead")
    for name in targets:
        if not isinstance(tower.model.get_submodule(name), nn.Linear):
            kind = type(tower.model.get_submodule(name)).__name__
            raise PeftmmError(f"{tower.name}.methods lora init_lora_weights = {init!r}: peft initialises it on "
                              f"Linear layers only, and target {name} is a {kind}; leave it out of targets or use "
                              "init_lora_weights: default")


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _follow_tower_slots(tower) -> None:
    """Make every LoRA layer of the tower read the tower's ActiveSlots.

    peft reads a layer's active adapters from ``_active_adapter`` each forward pass; pointing all
    of them at the tower's one list makes switching slots O(1). That attribute is private (peft's
    public ``set_adapter`` also sets requires_grad), so pyproject.toml bounds peft to the minor
    versions tested. Mixed batches go through peft's
    own ``adapter_names`` argument, passed in by a hook while ``tower.slots.rows`` is set.
    """
    follow_slots(tower, _lora_layers(tower.model))


def follow_slots(tower, layers) -> None:
    """Point peft tuner layers (LoRA's, or another tuner's) at the tower's ActiveSlots."""
    for layer in layers:
        layer._active_adapter = tower.slots.names
        if not getattr(layer, "peftmm_rows_hook", False):
            layer.register_forward_pre_hook(_rows_hook(tower.slots), with_kwargs=True)
            layer.peftmm_rows_hook = True


def _rows_hook(slots):
    def hook(module, args, kwargs):
        if slots.rows is not None:
            kwargs["adapter_names"] = slots.rows
        return args, kwargs
    return hook


def _expose_conv_geometry(model) -> None:
    """peft's Conv2d wrapper hides stride/padding/...; transformers' TF-style padding reads them."""
    from peft.tuners.lora.layer import Conv2d

    for module in model.modules():
        if isinstance(module, Conv2d):
            base = module.get_base_layer()
            for attr in ("stride", "padding", "dilation", "kernel_size", "groups", "in_channels", "out_channels"):
                setattr(module, attr, getattr(base, attr))


def _inside_adapter(model, name: str) -> str:
    """A module already wrapped by a bottleneck adapter gets LoRA on the layer inside it, so
    both orders of injection give the same structure: adapter(W x + B A x)."""
    module = model.get_submodule(name)
    return f"{name}.base_layer" if hasattr(module, "peftmm_adapter") else name


def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
