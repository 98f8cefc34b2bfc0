"""One registry type for every family of interchangeable parts (methods, fusion, tasks, data).

A part registers itself with ``@REGISTRY.register("name")`` and declares its settings as a
nested ``Config`` dataclass; recipes select it by ``type:`` and the rest of the mapping is
validated against that dataclass.
"""

from __future__ import annotations

import difflib
from typing import Any

from . import schema
from .errors import RecipeError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._parts: dict[str, type] = {}

    def register(self, name: str):
        def decorator(cls):
            if name in self._parts:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.registry_name = name
            self._parts[name] = cls
            return cls
        return decorator

    def names(self) -> list[str]:
        return sorted(self._parts)

    def get(self, name: str, key: str = "type", where: str | None = None) -> type:
        if not isinstance(name, str) or name not in self._parts:
            hint = difflib.get_close_matches(str(name), self.names(), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"{key} = {name!r} is not a known {self.kind}{did_you_mean}; "
                              f"choose one of: {', '.join(self.names())}", where)
        return self._parts[name]

    def config(self, data: Any, path: str, where: str | None = None):
        """Validate ``{type: NAME, **settings}`` and return NAME's Config instance."""
        if isinstance(data, str):
            data = {"type": data}
        if not isinstance(data, dict) or "type" not in data:
            raise RecipeError(f"{path} must be a mapping with a 'type' key "
                              f"(one of: {', '.join(self.names())}), got {data!r}", where)
        settings = dict(data)
        name = settings.pop("type")
        part = self.get(name, f"{path}.type", where)
        config = schema.build(part.Config, settings, path, where)
        config.type = name
        return config
