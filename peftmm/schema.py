"""Validate plain dicts (parsed YAML) against dataclasses, with errors that say where.

Every configurable piece of peftmm (recipe sections, methods, fusion modules) declares its
settings as a dataclass; ``field(metadata=...)`` adds bounds (``min``, ``max``, ``gt``) and
allowed values (``choices``). :func:`build` turns a dict into that dataclass or raises one
:class:`RecipeError` naming the key path, the bad value and what is allowed, with a
did-you-mean for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import RecipeError
from .safe_load import short_repr

_MISSING = dataclasses.MISSING

# Upper bounds for the sizes a recipe allocates with (field metadata ``max``), so a typo or a
# hostile --set is a plain error instead of an allocation traceback. The widest supported
# backbone (SmolLM2-1.7B in hub_configs/) is 2,048 wide; 16,384 leaves 8x room and keeps one
# square fp32 matrix of that width at 1 GiB.
MAX_WIDTH = 16_384
MAX_HEADS = 256
MAX_BATCH = 65_536


def build(cls: type, data: Any, path: str = "", where: str | None = None):
    """Instantiate dataclass ``cls`` from ``data``; ``path`` is the key path used in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{_label(path)} must be a mapping of settings, got {_show(data)}", where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(key[:200], list(fields), n=1) if isinstance(key, str) else None
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            raise RecipeError(f"unknown key {_join(path, key)!r}{did_you_mean} "
                              f"(allowed: {', '.join(fields)})", where)
    values = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            values[name] = check_value(_resolved_type(cls, name), data[name], key, where, f.metadata)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise RecipeError(f"missing required key {key!r}", where)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate:  # cross-field rules live on the dataclass itself
        try:
            validate()
        except ValueError as e:
            raise RecipeError(f"{_label(path)}: {e}", where) from None
    resolve_paths = getattr(obj, "resolve_paths", None)
    if resolve_paths:  # file paths in a recipe are relative to the recipe file (``where``)
        resolve_paths(where)
    return obj


def check_value(tp: Any, value: Any, key: str, where: str | None, meta: Any = None):
    meta = meta or {}
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return check_value(inner[0], value, key, where, meta)
        errors = []
        for option in inner:
            try:
                return check_value(option, value, key, where, meta)
            except RecipeError as e:
                errors.append(e.message)
        raise RecipeError(errors[0], where)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise RecipeError(f"{key} = {_show(value)} is not allowed; choose one of: "
                              f"{', '.join(map(str, choices))}", where)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key} must be a list, got {_show(value)}", where)
        (item_tp,) = get_args(tp) or (Any,)
        return [check_value(item_tp, v, f"{key}.{i}", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, got {_show(value)}", where)
        if not get_args(tp):
            return dict(value)
        key_tp, value_tp = get_args(tp)
        return {check_value(key_tp, k, f"{key} (a key)", where): check_value(value_tp, v, _join(key, k), where)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, where)
    if tp is Any:
        return value
    value = _coerce(tp, value, key, where)
    _check_bounds(value, key, where, meta)
    return value


def _coerce(tp: type, value: Any, key: str, where: str | None):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
        elif isinstance(value, str):  # YAML reads "1e-3" as a string; accept what a person means
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN would pass every bound (its comparisons are false)
                raise RecipeError(f"{key} must be a finite number, got {_show(value)}", where)
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"schema type {tp!r} for {key} is not supported")
    raise RecipeError(f"{key} must be {_type_name(tp)}, got {_show(value)}", where)


def _check_bounds(value, key, where, meta):
    choices = meta.get("choices")
    if choices is not None:
        choices = choices() if callable(choices) else choices
        if value not in choices:
            hint = difflib.get_close_matches(short_repr(value) if not isinstance(value, str) else value[:200],
                                             [str(c) for c in choices], n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"{key} = {_show(value)} is not allowed{did_you_mean}; choose one of: "
                              f"{', '.join(map(str, choices))}", where)
    if "min" in meta and value < meta["min"]:
        raise RecipeError(f"{key} = {_show(value)} is out of range: must be >= {meta['min']}", where)
    if "gt" in meta and value <= meta["gt"]:
        raise RecipeError(f"{key} = {_show(value)} is out of range: must be > {meta['gt']}", where)
    if "max" in meta and value > meta["max"]:
        raise RecipeError(f"{key} = {_show(value)} is out of range: must be <= {meta['max']}", where)


def to_dict(obj) -> Any:
    """A dataclass tree back to plain data (for JSON/YAML)."""
    if dataclasses.is_dataclass(obj):
        # Registry parts carry their ``type`` as a plain attribute (see Registry.config).
        head = {"type": obj.type} if "type" in vars(obj) else {}
        return head | {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _resolved_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _type_name(tp):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _join(path, key):
    key = key if isinstance(key, str) else short_repr(key)
    return f"{path}.{key}" if path else key


def _label(path):
    return repr(path) if path else "the recipe"


def _show(value):
    # never repr() the whole value: an aliased YAML structure or a huge integer has a repr that
    # takes unbounded time and memory (or raises) before it could be cut
    return short_repr(value)
