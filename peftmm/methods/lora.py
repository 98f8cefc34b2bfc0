"""LoRA through peft, with targets resolved inside one tower only."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import METHODS
from .base import Method, match_targets

ADAPTER_NAME = "default"


@METHODS.register("lora")
class LoRA(Method):
    mergeable = True

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
            from ..errors import PeftmmError

            raise PeftmmError(f"{tower.name}.methods lora: no default targets for {tower.info.model_type}; "
                              "set targets: [...] in the recipe")
        # peft gets exact module names, never suffixes: a suffix like q_proj must not reach
        # past this tower (the LLaVA mis-targeting bug).
        self.target_modules = [_inside_adapter(tower.model, name) for name in match_targets(tower, patterns)]
        self.peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha,
                                      lora_dropout=self.config.dropout, target_modules=self.target_modules)
        inject_adapter_in_model(self.peft_config, tower.model, adapter_name=ADAPTER_NAME)
        _expose_conv_geometry(tower.model)

    def owns(self, parameter_name: str) -> bool:
        return ".lora_" in parameter_name

    def merge(self, tower) -> None:
        """Fold B A into the frozen weights: inference then costs what the backbone alone costs."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if tower.info.precision in ("int8", "nf4"):
            from ..errors import PeftmmError

            raise PeftmmError(f"{tower.name}.methods lora: cannot merge into {tower.info.precision} weights "
                              "without re-quantising them (outputs would change); load the backbone in fp32 or bf16")

        for module in tower.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[ADAPTER_NAME])


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
