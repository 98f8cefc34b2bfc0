"""Parameter-efficient methods, one module each, registered by name in METHODS."""

from __future__ import annotations

from ..errors import RecipeError
from ..registry import Registry
from .base import DEFAULT_SLOT

METHODS = Registry("method")


def build_method(config, slot: str = DEFAULT_SLOT):
    return METHODS.get(config.type)(config, slot)


def check_method_combination(configs, path: str, where: str | None = None) -> None:
    """Methods stack in one tower, once each; full fine-tuning leaves nothing to add to."""
    names = [c.type for c in configs]
    for name in set(names):
        if names.count(name) > 1:
            raise RecipeError(f"{path}: {name!r} is listed {names.count(name)} times; "
                              "use one entry per method with all its targets", where)
    if "full" in names and len(names) > 1:
        raise RecipeError(f"{path}: 'full' trains the whole tower and cannot be combined with "
                          f"{', '.join(n for n in names if n != 'full')}", where)


from . import adapter, full, lora, peft_tuner, prefix  # noqa: E402,F401  (each registers itself)
