"""LoRA through peft, with targets resolved inside one tower only."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import PeftmmError
from . import METHODS
from .base import Method, match_targets


@METHODS.register("lora")
class LoRA(Method):
    mergeable = True
    mixed_batches = True  # peft's adapter_names: each row through its own adapter
    slot_fragments = (".lora_A.", ".lora_B.")

    @dataclass
    class Config:
        r: int = field(default=8, metadata={"min": 1, "max": 1024})
        alpha: float = field(default=16.0, metadata={"gt": 0.0})
        dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})
        targets: list[str] | None = None   # None: the architecture's defaults (architectures.json)

    def inject(self, tower) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        patterns = self.config.targets or tower.arch.get("lora_targets")
        if not patterns:
            raise PeftmmError(f"{tower.name}.methods lora: no default targets for {tower.info.model_type}; "
                              "set targets: [...] in the recipe")
        # peft gets exact module names, never suffixes: a suffix like q_proj must not reach
        # past this tower (the LLaVA mis-targeting bug).
        self.target_modules = [_inside_adapter(tower.model, name) for name in match_targets(tower, patterns)]
        self.peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha,
                                      lora_dropout=self.config.dropout, target_modules=self.target_modules)
        with warnings.catch_warnings():  # more than one adapter in a model is what slots are for
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(self.peft_config, tower.model, adapter_name=self.slot)
        _expose_conv_geometry(tower.model)
        _follow_tower_slots(tower)

    def remove(self, tower) -> None:
        for layer in _lora_layers(tower.model):
            if self.slot in layer.lora_A:
                layer.delete_adapter(self.slot)
        _follow_tower_slots(tower)  # peft re-sets the active adapters when deleting one

    def merge(self, tower) -> None:
        """Fold B A into the frozen weights: inference then costs what the backbone alone costs."""
        if tower.info.precision in ("int8", "nf4"):
            raise PeftmmError(f"{tower.name}.methods lora: cannot merge into {tower.info.precision} weights "
                              "without re-quantising them (outputs would change); load the backbone in fp32 or bf16")

        for layer in _lora_layers(tower.model):
            if self.slot in layer.lora_A:
                layer.merge(adapter_names=[self.slot])


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
    for layer in _lora_layers(tower.model):
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
