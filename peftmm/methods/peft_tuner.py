"""Any peft tuner that ``inject_adapter_in_model`` can put into a tower, as one method:
``{type: peft, tuner: IA3, targets: [...], options: {...}}``.

``tuner`` names a peft type (IA3, LOHA, LOKR, BOFT, OFT, HRA, ...; any case); ``options`` are the
fields of that type's peft config class, checked against it when the recipe loads. Targets (and
IA3's ``feedforward_modules``) are resolved inside the tower to exact module names, as LoRA's are.
The tuner's parameters are recognised by peft's parameter prefix for it (``ia3_``, ``hada_``,
``lokr_``, ...) followed by the slot name, so bundles, slots and the runtime treat them like LoRA's.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import schema
from ..errors import PeftmmError, RecipeError
from . import METHODS
from .base import DEFAULT_SLOT, Method, match_targets

# Settings peftmm sets itself: the targets (``targets``), what a bundle holds, where it came from.
MANAGED = ("target_modules", "exclude_modules", "modules_to_save", "task_type", "peft_type", "inference_mode",
           "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "target_parameters",
           "trainable_token_indices")
MODULE_OPTIONS = ("feedforward_modules",)  # lists of modules, resolved in the tower like targets
KINDS = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding, nn.LayerNorm)


def injectable_tuners() -> dict[str, tuple[type, type, str]]:
    """{PEFT TYPE: (config class, tuner class, parameter prefix)} of the peft types peftmm can inject."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    found = {}
    for kind, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(kind)
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(kind)
        if _refusal(str(kind.value), config_cls, tuner, prefix, PromptLearningConfig) is None:
            found[str(kind.value)] = (config_cls, tuner, prefix)
    return found


def _refusal(name: str, config_cls, tuner, prefix, prompt_learning) -> str | None:
    """Why peftmm cannot use a peft type as a method (None: it can)."""
    if name in ("LORA", "ADALORA"):
        return "it is LoRA: use {type: lora} (with use_dora, use_rslora, init_lora_weights, ... as needed)"
    if issubclass(config_cls, prompt_learning) or name == "ADAPTION_PROMPT":
        return ("it is prompt learning (virtual tokens through a PeftModel), not a layer peft can inject; "
                "peftmm's own {type: prefix} method adds per-layer prefixes to any tower")
    if tuner is None or not prefix or name in ("XLORA", "SHADOW"):
        return "peft's inject_adapter_in_model does not support it"
    if getattr(tuner, "uses_shared_state", False):
        return ("it keeps state shared by all layers on peft's tuner object, which inject_adapter_in_model "
                "refuses (peft: 'uses shared state stored on the tuner')")
    return None


def resolve_tuner(name) -> tuple[str, type, type, str]:
    """(PEFT TYPE, config class, tuner class, prefix) for a tuner name in any case; ValueError otherwise."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    usable = injectable_tuners()
    key = name.upper().replace("-", "_") if isinstance(name, str) else None
    if key in usable:
        return (key, *usable[key])
    known = {str(k.value): k for k in PEFT_TYPE_TO_CONFIG_MAPPING}
    if key in known:
        kind = known[key]
        why = _refusal(key, PEFT_TYPE_TO_CONFIG_MAPPING[kind], PEFT_TYPE_TO_TUNER_MAPPING.get(kind),
                       PEFT_TYPE_TO_PREFIX_MAPPING.get(kind), PromptLearningConfig)
        raise ValueError(f"tuner = {name!r} cannot be used: {why}")
    hint = difflib.get_close_matches(str(key), list(usable), n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ValueError(f"tuner = {name!r} is not a peft tuner{did_you_mean}; choose one of: {', '.join(sorted(usable))}")


def _check_types(config_cls, options: dict) -> None:
    """Option values against the peft config's annotations (peft itself does not check them, and a
    wrong type would fail at the first forward pass); annotations outside what a recipe can hold
    (torch dtypes, callables) are left to peft."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation peft cannot resolve itself: nothing to check against
        return
    for key, value in options.items():
        try:
            schema.check_value(hints[key], value, f"options.{key}", None)
        except TypeError:
            continue
        except RecipeError as e:
            raise ValueError(e.message) from None


@METHODS.register("peft")
class PeftTuner(Method):
    mergeable = True  # where the tuner's layers can merge (merge() says which cannot)

    @dataclass
    class Config:
        tuner: str                         # a peft type: IA3, LOHA, LOKR, BOFT, ... (any case)
        targets: list[str] | None = None   # None: the architecture's LoRA targets (architectures.json)
        options: dict = field(default_factory=dict)   # fields of the tuner's peft config class

        def validate(self):
            kind, config_cls, _, _ = resolve_tuner(self.tuner)
            self.tuner = kind  # saved bundles name it as peft does
            fields = {f.name for f in dataclasses.fields(config_cls) if f.init} - set(MANAGED)
            for key in self.options:
                if key not in fields:
                    hint = difflib.get_close_matches(str(key), sorted(fields), n=1)
                    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                    managed = f"; peftmm sets {key} itself" + (" (use targets)" if key == "target_modules" else "") \
                        if key in MANAGED else ""
                    raise ValueError(f"options.{key} is not an option of peft's {config_cls.__name__}{did_you_mean}"
                                     f"{managed}; valid options: {', '.join(sorted(fields))}")
            _check_types(config_cls, self.options)
            try:  # peft's own checks of the values
                self.peft_config(["placeholder"], {name: [] for name in MODULE_OPTIONS if name in fields})
            except (TypeError, ValueError, AttributeError, KeyError) as e:  # whatever peft's checks raise
                raise ValueError(f"options for {kind} are refused by peft's {config_cls.__name__}: {e}") from None

        def peft_config(self, targets: list[str], modules: dict):
            _, config_cls, _, _ = resolve_tuner(self.tuner)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return config_cls(**{**self.options, **modules, "target_modules": targets})

    def __init__(self, config, slot: str = DEFAULT_SLOT):
        super().__init__(config, slot)
        self.kind, self.config_cls, _, self.prefix = resolve_tuner(config.tuner)

    # -- which parameters are this method's: <prefix><anything>.<slot>[.<anything>] ---------------
    def _slot_part(self, parts: list[str]) -> int | None:
        return next((i + 1 for i, p in enumerate(parts[:-1])
                     if p.startswith(self.prefix) and parts[i + 1] == self.slot), None)

    def owns(self, parameter_name: str) -> bool:
        return self._slot_part(parameter_name.split(".")) is not None

    def canonical_name(self, parameter_name: str) -> str:
        parts = [p for p in parameter_name.split(".") if p != "base_layer"]
        at = self._slot_part(parts)
        if at is not None:
            parts[at] = DEFAULT_SLOT
        return ".".join(parts)

    def inject(self, tower) -> None:
        from peft import inject_adapter_in_model

        where = f"{tower.name}.methods peft ({self.kind})"
        patterns = self.config.targets or tower.arch.get("lora_targets")
        if not patterns:
            raise PeftmmError(f"{where}: no default targets for {tower.info.model_type}; set targets: [...]")
        targets = match_targets(tower, patterns, kinds=KINDS)
        modules = {}
        for option in MODULE_OPTIONS:
            if option in {f.name for f in dataclasses.fields(self.config_cls)}:
                given = self.config.options.get(option) or []
                given = [given] if isinstance(given, str) else given
                resolved = match_targets(tower, list(given), kinds=KINDS, key=f"peft options.{option}")
                outside = [m for m in resolved if m not in targets]
                if outside:
                    raise PeftmmError(f"{where} options.{option}: {outside[0]} is not among the targets")
                modules[option] = resolved
        peft_config = self.config.peft_config(targets, modules)
        layers = sorted({type(tower.model.get_submodule(t)).__name__ for t in targets})
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(peft_config, tower.model, adapter_name=self.slot)
            self._follow(tower)
            self._probe(tower)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
            self.remove(tower)
            raise PeftmmError(f"{where}: peft cannot apply {self.kind} to these targets at precision "
                              f"{tower.info.precision} (layer types: {', '.join(layers)}): "
                              f"{str(e).strip().splitlines()[0][:300]}") from None

    def _probe(self, tower) -> None:
        """One forward pass through this slot on the smallest input: some tuners wrap a layer type
        they cannot compute with (LoHa and LoKr on nf4 layers reshape the packed 4-bit weight), and
        that must fail here, before training, not at its first step."""
        active = list(tower.slots.names)
        tower.slots.activate(self.slot)
        try:
            with torch.no_grad():
                tower(**tower.probe_inputs())
        finally:
            tower.slots.names[:] = active

    def _layers(self, tower) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in tower.model.modules() if isinstance(m, BaseTunerLayer)
                and any(self.slot in getattr(m, n) for n in m.adapter_layer_names)
                and any(n.startswith(self.prefix) for n in m.adapter_layer_names)]

    def _follow(self, tower) -> None:
        """Every layer of this tuner reads the tower's ActiveSlots (as LoRA's do; see lora.py)."""
        for layer in self._layers(tower):
            layer._active_adapter = tower.slots.names

    def remove(self, tower) -> None:
        for layer in self._layers(tower):
            layer.delete_adapter(self.slot)
        self._follow(tower)

    def merge(self, tower) -> None:
        if tower.info.precision in ("int8", "nf4"):
            raise PeftmmError(f"{tower.name}.methods peft ({self.kind}): cannot merge into {tower.info.precision} "
                              "weights without re-quantising them; load the backbone in fp32 or bf16")
        for layer in self._layers(tower):
            try:
                layer.merge(adapter_names=[self.slot])
            except NotImplementedError:
                raise PeftmmError(f"{tower.name}.methods peft ({self.kind}): peft cannot merge "
                                  f"{type(layer).__name__} layers") from None
