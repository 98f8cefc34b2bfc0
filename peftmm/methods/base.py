"""The interface every parameter-efficient method implements, and target matching.

A method is injected into one tower (a frozen backbone). It owns the parameters it adds,
recognised by name, so saving, loading and counting are the same for every method.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import PeftmmError

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class Method:
    """Base of LoRA, bottleneck adapters, prefix tuning and full fine-tuning."""

    registry_name: str          # set by METHODS.register
    Config: type                # the method's recipe settings (a dataclass)
    mergeable = False           # can fold into the frozen weights for inference

    def __init__(self, config):
        self.config = config

    def inject(self, tower) -> None:
        raise NotImplementedError

    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter of the tower's model (by name) was added by this method."""
        raise NotImplementedError

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
        if _PLAIN_NAME.match(pattern):
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
