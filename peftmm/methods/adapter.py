"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) inside one frozen tower.

An adapter is a small residual MLP on a sub-layer's output, ``x + up(act(down(norm(x))))``.
Houlsby placement puts one after the attention output projection and one after the
feed-forward output of every transformer block (before the block's own residual add and
layer norm); Pfeiffer placement only the feed-forward one. On a CNN there are no such
sub-layers: one adapter follows each block or stage and acts on the channels of its
``[B, C, H, W]`` output. Where the adapters go is data, per model type, in
architectures.json (``adapter_attention``, ``adapter_ffn``, ``adapter_stage``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import PeftmmError
from ..schema import MAX_WIDTH
from . import METHODS
from .base import Method, match_targets

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PARAMETER_FRAGMENT = ".peftmm_adapter."


class Bottleneck(nn.Module):
    """down-projection, non-linearity, up-projection; the caller adds the residual."""

    def __init__(self, width: int, hidden: int, non_linearity: str, layer_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.down = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(hidden, width)
        # A zero up-projection makes an untrained adapter an exact identity, so training
        # starts from the backbone's own function (Houlsby's near-identity initialisation).
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.norm(x))))


class AdapterLayer(nn.Module):
    """A frozen sub-layer (``base_layer``) followed by the bottleneck adapters of its slots.

    The adapters keep fp32 weights whatever the backbone's precision: the sub-layer output is
    cast to fp32 for the bottleneck, and only the (small) update is cast back, so the residual
    add happens in the backbone's dtype exactly as it would without an adapter. Which adapter
    acts is the tower's ActiveSlots (see methods/base.py), read on every call.
    """

    def __init__(self, base_layer: nn.Module, channel_dim: int, slots):
        super().__init__()
        self.base_layer = base_layer
        self.peftmm_adapter = nn.ModuleDict()
        self.channel_dim = channel_dim  # -1 for [..., D] tokens, 1 for [B, C, H, W] feature maps
        self.slots = slots

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        rows = self.slots.rows
        if rows is None:
            for slot in self.slots.names:
                if slot in self.peftmm_adapter:
                    out = out + self._delta(self.peftmm_adapter[slot], out)
            return out
        # A mixed batch: each row gets its own slot's adapter (rows of other slots: none).
        delta = torch.zeros_like(out)
        for slot in set(rows):
            if slot in self.peftmm_adapter:
                index = torch.tensor([i for i, r in enumerate(rows) if r == slot], device=out.device)
                delta[index] = self._delta(self.peftmm_adapter[slot], out[index])
        return out + delta

    def _delta(self, adapter: Bottleneck, out: torch.Tensor) -> torch.Tensor:
        x = out.movedim(self.channel_dim, -1)
        return adapter(x.to(adapter.down.weight.dtype)).to(out.dtype).movedim(-1, self.channel_dim)

    def __getattr__(self, name: str):
        # Model code around a sub-layer sometimes reads its attributes (weight.dtype, conv
        # geometry for TF-style padding); answer for the wrapped layer, as peft's wrappers do.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


@METHODS.register("adapter")
class Adapter(Method):
    mergeable = False  # the non-linearity keeps it out of the frozen weights
    mixed_batches = True
    slot_fragments = (PARAMETER_FRAGMENT,)

    @dataclass
    class Config:
        placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
        # hidden units = width // factor
        reduction_factor: int = field(default=16, metadata={"min": 1, "max": MAX_WIDTH})
        non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
        layer_norm: bool = False           # a LayerNorm before the down-projection
        targets: list[str] | None = None   # None: the architecture's placement (architectures.json)

        def validate(self) -> None:
            if self.targets is not None and not self.targets:
                raise ValueError("targets is empty; name at least one module, or leave it unset "
                                 "for the architecture's placement")

    def inject(self, tower) -> None:
        names = match_targets(tower, self._patterns(tower), kinds=(nn.Module,), key="adapter targets")
        outputs = _probe_outputs(tower, names)
        rf = self.config.reduction_factor
        # Check every target before changing the model, so a bad recipe leaves the tower intact.
        for name in names:
            if name not in outputs:
                raise PeftmmError(f"{tower.name}.methods adapter: {name} does not run in a forward pass "
                                  "of the tower, so an adapter there would never act")
            if not torch.is_tensor(outputs[name][0]) or len(outputs[name]) != 1:
                raise PeftmmError(f"{tower.name}.methods adapter: {name} returns "
                                  f"{type(outputs[name][0]).__name__}, not one tensor; target a module "
                                  "whose output is a [B, N, D] or [B, C, H, W] tensor")
            width = outputs[name][0].shape[_channel_dim(outputs[name][0])]
            if width // rf < 1:
                raise PeftmmError(f"{tower.name}.methods adapter: reduction_factor {rf} leaves no hidden units "
                                  f"for width {width} (at {name}); use a reduction_factor of at most {width}")
        # Innermost first: wrapping a module changes the names of everything inside it.
        for name in sorted(names, key=lambda n: n.count("."), reverse=True):
            out = outputs[name][0]
            channel_dim = _channel_dim(out)
            width = out.shape[channel_dim]
            adapter = Bottleneck(width, width // rf, self.config.non_linearity, self.config.layer_norm)
            layer = tower.model.get_submodule(name)
            if not isinstance(layer, AdapterLayer):  # another slot may have wrapped it already
                layer = AdapterLayer(layer, channel_dim, tower.slots)
                parent_name, _, child = name.rpartition(".")
                setattr(tower.model.get_submodule(parent_name), child, layer)
            layer.peftmm_adapter[self.slot] = adapter.to(out.device)
        self.target_modules = names

    def remove(self, tower) -> None:
        for name, layer in reversed(list(tower.model.named_modules())):  # inner wrappers first
            if isinstance(layer, AdapterLayer) and self.slot in layer.peftmm_adapter:
                del layer.peftmm_adapter[self.slot]
                if not len(layer.peftmm_adapter):  # the last slot gone: unwrap the sub-layer
                    parent_name, _, child = name.rpartition(".")
                    setattr(tower.model.get_submodule(parent_name), child, layer.base_layer)

    def _patterns(self, tower) -> list[str]:
        if self.config.targets:
            return self.config.targets
        arch, placement = tower.arch, self.config.placement
        if "adapter_stage" in arch:  # a CNN: no attention or feed-forward sub-layers
            if placement == "houlsby":
                raise PeftmmError(f"{tower.name}.methods adapter: placement houlsby adds adapters after "
                                  f"attention sub-layers and {tower.info.model_type} has none; use placement: "
                                  "pfeiffer (one adapter after each block or stage) or set targets")
            return [arch["adapter_stage"]]
        keys = ("adapter_attention", "adapter_ffn") if placement == "houlsby" else ("adapter_ffn",)
        if not all(k in arch for k in keys):
            raise PeftmmError(f"{tower.name}.methods adapter: no {placement} placement is known for "
                              f"{tower.info.model_type}; set targets: [...] in the recipe")
        return [arch[k] for k in keys]


def _channel_dim(output: torch.Tensor) -> int:
    return 1 if output.dim() == 4 else -1  # feature maps are channels-first; tokens end in D


@torch.no_grad()
def _probe_outputs(tower, names: list[str]) -> dict[str, tuple]:
    """One tiny forward pass recording what each target returns (its output width and device
    are known for every architecture this way, CNN blocks included)."""
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(module, args, output) -> None:  # returning None leaves the output alone
            seen.setdefault(name, output if isinstance(output, tuple) else (output,))
        return hook

    hooks = [tower.model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        tower(**tower.probe_inputs())
    finally:
        for hook in hooks:
            hook.remove()
    return seen
