"""The interface every parameter-efficient method implements, slots, and target matching.

A method is injected into one tower (a frozen backbone). It owns the parameters it adds,
recognised by name, so saving, loading and counting are the same for every method.

Every injected module lives in a named *slot*. A model trained on its own uses one slot,
``default``; the multi-adapter runtime (runtime.py) injects each registered bundle under a slot
of its own into shared towers and switches bundles by changing which slots are active. Parameter
names carry the slot (``...lora_A.<slot>.weight``); bundles always store them under ``default``,
so a bundle loads into any slot.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import PeftmmError

PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
DEFAULT_SLOT = "default"
NO_SLOT = "__base__"  # a row of a mixed batch that runs the bare backbone (peft's name for it)


class ActiveSlots:
    """Which slots act in one tower's forward pass; every injected module of the tower reads it.

    Switching is an in-place change of one small list (peft's LoRA layers hold this very list as
    their active adapters), so it costs the same whatever the number of layers or adapters, and
    moves no weights. ``rows`` names a slot per input row for a mixed batch (None otherwise).
    """

    def __init__(self):
        self.names: list[str] = [DEFAULT_SLOT]
        self.rows: list[str] | None = None

    def activate(self, slot: str | None) -> None:
        self.names[:] = [slot] if slot else []


class Method:
    """Base of LoRA, bottleneck adapters, prefix tuning and full fine-tuning."""

    registry_name: str          # set by METHODS.register
    Config: type                # the method's recipe settings (a dataclass)
    mergeable = False           # can fold into the frozen weights for inference
    mixed_batches = False       # rows of one forward pass may each use another slot
    slot_fragments: tuple[str, ...] = ()  # parameter-name pieces that the slot name follows

    def __init__(self, config, slot: str = DEFAULT_SLOT):
        self.config = config
        self.slot = slot

    @classmethod
    def check_precision(cls, config, precision: str, key: str, where: str | None = None) -> None:
        """Refuse (RecipeError naming ``key``) settings that cannot work on a tower loaded at
        ``precision``: called when the recipe loads, before any backbone does."""

    def learning_rate(self, parameter_name: str, lr: float) -> float:
        """The rate one of this method's parameters trains at, given the run's ``lr``."""
        return lr

    @classmethod
    def concatenated(cls, config, count: int):
        """The config of ``count`` trained copies of ``config`` held side by side (a ``cat``
        merge). Only low-rank factors concatenate; every other method's tensors are weighted
        sums of the same shapes, so its config stays as it is."""
        return config

    def inject(self, tower) -> None:
        raise NotImplementedError

    def remove(self, tower) -> None:
        """Take this method's modules (its slot only) out of the tower again."""
        raise PeftmmError(f"{self.registry_name} cannot be removed from a shared backbone")

    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter of the tower's model (by name) was added by this method."""
        name = f".{parameter_name}"
        return any(f"{fragment}{self.slot}." in name for fragment in self.slot_fragments)

    def canonical_name(self, parameter_name: str) -> str:
        """The parameter's name as a bundle stores it: in the ``default`` slot, and without the
        ``base_layer`` steps that wrappers (of this slot or another) put into module paths, so
        the name does not depend on what else was injected into the tower, or in which order."""
        name = f".{parameter_name}".replace(".base_layer.", ".")
        for fragment in self.slot_fragments:
            name = name.replace(f"{fragment}{self.slot}.", f"{fragment}{DEFAULT_SLOT}.")
        return name[1:]

    def merge(self, tower) -> None:
        raise PeftmmError(f"{self.registry_name} cannot be merged into the backbone weights")

    def export(self, tower, state: dict) -> tuple[dict, object]:
        """What a bundle stores for this method: its tensors and the config that rebuilds them.

        ``state`` holds this method's trained tensors, named relative to ``tower.model``. A method
        that trains through extra structure it does not need afterwards (prefix tuning's MLP)
        folds it here, returning other tensors and a config that builds exactly those.
        """
        return state, self.config


def match_targets(tower, patterns: list[str], kinds=(nn.Linear, nn.Conv2d), key: str = "targets") -> list[str]:
    """Resolve target patterns to module names inside one tower.

    A plain dotted name matches as a suffix on a dot boundary (``query`` matches
    ``encoder.layer.0.attention.self.query``); anything else is a regular expression matched
    against the whole name. Every pattern must match at least one module.
    """
    names = tower.module_names(kinds)
    matched: list[str] = []
    for pattern in patterns:
        if PLAIN_NAME.match(pattern):
            hits = [n for n in names if n == pattern or n.endswith("." + pattern)]
        else:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise PeftmmError(f"{tower.name}.methods {key}: {pattern!r} is not a valid pattern ({e})") from None
            hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            suffixes = sorted({n.split(".")[-1] for n in names})
            raise PeftmmError(f"{tower.name} tower {key}: {pattern!r} matches no module of "
                              f"{tower.info.model_type}; module names there end in: {', '.join(suffixes)} "
                              f"(e.g. {names[0] if names else 'none'})")
        matched += [h for h in hits if h not in matched]
    return matched
