"""Prefix tuning (Li & Liang, 2021): learned keys and values prepended in each attention layer.

Every transformers model peftmm supports computes attention through one function looked up by
name in transformers' AttentionInterface. Prefix tuning registers its own, ``peftmm_prefix``,
and switches the tower's model to it. It behaves exactly like sdpa, except that for an attention
module carrying a ``peftmm_prefix`` submodule it first prepends that module's keys and values
and widens the attention mask with columns every query may attend to; other modules (layers
left out) get plain sdpa, the implementation these models load with. Working inside the
attention call, rather than on the inputs, is what keeps padding and causal masks right for
encoders and decoders alike: the model builds its mask for the real tokens, and only the
prefix columns are added here.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PeftmmError
from . import METHODS
from .base import DEFAULT_SLOT, Method

ATTENTION = "peftmm_prefix"
INIT_STD = 0.02  # plain prefixes start as small random keys/values, like transformers' own initialisers


class PrefixKV(nn.Module):
    """The prefix of one attention layer: keys and values shaped [kv_heads, length, head_dim].

    With ``reparam_hidden`` they come out of a small MLP over a learned embedding, which Li & Liang
    found optimises more stably than the prefixes themselves; :meth:`Prefix.export` folds it away,
    so a saved bundle only ever holds plain prefixes.
    """

    def __init__(self, kv_heads: int, length: int, head_dim: int, reparam_hidden: int | None = None):
        super().__init__()
        self.shape = (kv_heads, length, head_dim)
        if reparam_hidden is None:
            self.key = nn.Parameter(torch.randn(self.shape) * INIT_STD)
            self.value = nn.Parameter(torch.randn(self.shape) * INIT_STD)
        else:
            self.embedding = nn.Parameter(torch.randn(length, reparam_hidden))
            self.mlp = nn.Sequential(nn.Linear(reparam_hidden, reparam_hidden), nn.Tanh(),
                                     nn.Linear(reparam_hidden, 2 * kv_heads * head_dim))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "mlp"):
            return self.key, self.value
        kv_heads, length, head_dim = self.shape
        both = self.mlp(self.embedding).view(length, 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        return both[0], both[1]


_calls: list | None = None  # while _attention_layers runs: (module, key shape) per attention call


@contextmanager
def _recording():
    global _calls
    _calls = []
    try:
        yield _calls
    finally:
        _calls = None


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, with the active slot's prefix in ``module.peftmm_prefix`` (if any) prepended to
    keys, values and mask.

    query/key/value are [B, heads, T, head_dim]; attention_mask is None, a bool mask
    [B, 1, Tq, Tk] (True = attend) from ``sdpa_mask``, or an additive float mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _calls is not None:
        _calls.append((module, key.shape))
    prefix = _active_prefix(module)
    if prefix is not None:
        key, value, attention_mask = _prepend(prefix, module, query, key, value, attention_mask,
                                              kwargs.get("is_causal"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _active_prefix(module) -> PrefixKV | None:
    prefixes = getattr(module, "peftmm_prefix", None)
    if prefixes is None:
        return None
    slots = module.peftmm_slots
    if slots.rows is not None and any(slot in prefixes for slot in set(slots.rows)):
        # prefixes of different slots differ in length: rows cannot share one key tensor
        raise RuntimeError("prefix tuning cannot serve a mixed-slot batch; run one slot at a time")
    return next((prefixes[slot] for slot in slots.names if slot in prefixes), None)


def _prepend(prefix, module, query, key, value, attention_mask, is_causal):
    prefix_key, prefix_value = prefix()
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    key = torch.cat([prefix_key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    # With no mask a causal model relies on sdpa's is_causal, which would now align the triangle
    # with the prefix (and sdpa crops keys longer than the queries, dropping the last tokens):
    # spell the causal mask out. The same conditions as sdpa's decide whether it is causal.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = attention_mask[None, None]
    if attention_mask is not None:  # prefix columns: always visible (True, or 0 in an additive mask)
        visible = attention_mask.new_full((*attention_mask.shape[:-1], prefix_key.shape[1]),
                                          attention_mask.dtype == torch.bool)
        attention_mask = torch.cat([visible, attention_mask], dim=-1)
    return key, value, attention_mask


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, prefix_attention)
    # Without a mask builder of the same name, transformers silently passes no mask at all.
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@METHODS.register("prefix")
class Prefix(Method):
    slot_fragments = (".peftmm_prefix.",)
    @dataclass
    class Config:
        length: int = field(default=10, metadata={"min": 1, "max": 1024})   # prefix tokens per layer
        reparam: bool = True                 # train through an MLP (Li & Liang); folded away when saved
        reparam_hidden: int = field(default=128, metadata={"min": 1, "max": 8192})
        layers: list[int] | None = None      # attention layers by depth, from 0; None: all of them

        def validate(self):
            if self.layers is not None:
                if not self.layers:
                    raise ValueError("layers is empty; leave it unset to prefix every attention layer")
                if min(self.layers) < 0 or len(set(self.layers)) < len(self.layers):
                    raise ValueError(f"layers = {self.layers} must list distinct layer numbers from 0")

    def inject(self, tower) -> None:
        where = f"{tower.name}.methods prefix"
        model = tower.model
        if not tower.arch.get("attention", True):
            raise PeftmmError(f"{where}: {tower.info.model_type} has no attention layers; prefix tuning "
                              "needs attention (use adapter or lora)")
        if not getattr(model, "_supports_sdpa", False):
            raise PeftmmError(f"{where}: prefix tuning computes attention with sdpa, which "
                              f"{type(model).__name__} does not support")
        _register()
        model.set_attn_implementation(ATTENTION)
        found = _attention_layers(tower)
        if not found:
            raise PeftmmError(f"{where}: {tower.info.model_type} computes no attention through transformers' "
                              "AttentionInterface, so there is nothing to prefix")
        chosen = self.config.layers if self.config.layers is not None else range(len(found))
        if max(chosen) >= len(found):
            raise PeftmmError(f"{where} layers: {max(chosen)} is out of range; {tower.info.model_type} "
                              f"has {len(found)} attention layers (0 to {len(found) - 1})")
        device = next(model.parameters()).device
        hidden = self.config.reparam_hidden if self.config.reparam else None
        self.layers = []  # (module name, attention module), for export
        for index in chosen:
            name, module, (kv_heads, head_dim) = found[index]
            if not hasattr(module, "peftmm_prefix"):
                module.peftmm_prefix = nn.ModuleDict()
                module.peftmm_slots = tower.slots
            module.peftmm_prefix[self.slot] = PrefixKV(kv_heads, self.config.length, head_dim, hidden).to(device)
            self.layers.append((name, module))

    def remove(self, tower) -> None:
        for _, module in self.layers:
            if self.slot in module.peftmm_prefix:
                del module.peftmm_prefix[self.slot]

    def export(self, tower, state):
        """Fold the MLP: the bundle stores each layer's keys/values and a recipe without reparam."""
        if not self.config.reparam:
            return state, self.config
        folded = {}
        with torch.no_grad():
            for name, module in self.layers:
                key, value = module.peftmm_prefix[self.slot]()
                folded[f"{name}.peftmm_prefix.{DEFAULT_SLOT}.key"] = key.detach().clone()
                folded[f"{name}.peftmm_prefix.{DEFAULT_SLOT}.value"] = value.detach().clone()
        return folded, dataclasses.replace(self.config, reparam=False)


@torch.no_grad()
def _attention_layers(tower) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    """Every module that calls the attention function, in depth order, with (kv_heads, head_dim).

    One tiny forward pass finds them whatever the architecture, and reads the key/value head
    count (fewer than the query heads under grouped-query attention) from the keys themselves.
    """
    names = {id(module): name for name, module in tower.model.named_modules()}
    with _recording() as calls:
        tower(**tower.probe_inputs())
    found, seen = [], set()
    for module, shape in calls:
        if id(module) not in seen:
            seen.add(id(module))
            found.append((names[id(module)], module, (shape[1], shape[3])))
    return found
