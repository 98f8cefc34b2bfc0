"""One loader each for the structured text peftmm reads from users: YAML and JSON.

Recipes, bundle configs, safetensors headers, data files and HTTP request bodies all come
through here, so every one of them gets the same bounds:

- YAML is read with PyYAML's safe loader (no Python tags), and an alias (``*name``) may not
  expand the document past :data:`MAX_YAML_VALUES` values: a 1 KB "billion laughs" file would
  otherwise become a structure that anything walking it (a repr, a deepcopy, a JSON dump) never
  finishes.
- JSON may nest at most :data:`MAX_DEPTH` levels (deeper input makes Python's parser, and every
  recursive function after it, raise RecursionError) and integers may have at most
  :data:`MAX_INT_DIGITS` digits (Python refuses to parse past 4,300 with a ValueError).

A refused input raises the ``error`` class the caller names, with ``where``, so each caller keeps
its own error type (RecipeError for recipes, BundleError for bundles, DataError for data).
:func:`short_repr` shows a value in an error message without ever building its full repr.
"""

from __future__ import annotations

import json
import re
import reprlib
from itertools import accumulate

import yaml

from .errors import PeftmmError

MAX_DEPTH = 64             # no peftmm file nests deeper than ~6; safetensors headers ~3
MAX_INT_DIGITS = 64        # the largest integer peftmm stores (a byte offset, a seed) has ~20
MAX_YAML_VALUES = 100_000  # a recipe has ~100 values; alias expansion past this is an attack

# A JSON string (escapes included), and the characters that open or close a level.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LEVEL = {"[": 1, "{": 1, "]": -1, "}": -1}


class _Short(reprlib.Repr):
    """reprlib with tight limits, and big integers shown by size (their repr can raise)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 4, 4, 4
        self.maxstring, self.maxother, self.maxlong = 60, 60, 40

    def repr_int(self, value, level):
        if value.bit_length() > 128:
            return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
        return super().repr_int(value, level)


_SHORT = _Short()


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, built in bounded time and memory whatever
    the value holds (shared or self-referencing lists, huge strings or integers)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_depth(text: str) -> int:
    """How deep the brackets of a JSON text nest (strings skipped); linear, no recursion."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(_LEVEL[c] for c in brackets), default=0)


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are read)")
    return int(digits)


def utf8_text(raw: bytes, where: str, error: type[PeftmmError] = PeftmmError) -> str:
    """A file's bytes as text, or one error naming the line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} (save the file as UTF-8)",
                    where) from None


def load_json(data: str | bytes, where: str | None = None, error: type[PeftmmError] = PeftmmError,
              what: str = "not valid JSON"):
    """Parse JSON text within the bounds above; anything else raises ``error(f"{what}: ...")``."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise error(f"{what}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})", where) from None
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{what}: nested {depth} levels deep (at most {MAX_DEPTH} are read)", where)
    try:
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno}, column {e.colno}"
        raise error(f"{what}: {e.msg} ({at})", where) from None
    except (ValueError, RecursionError) as e:
        raise error(f"{what}: {e}", where) from None


def load_yaml(text: str, where: str | None = None, error: type[PeftmmError] = PeftmmError,
              what: str = "not valid YAML"):
    """``yaml.safe_load`` with alias expansion and nesting bounded."""
    loader = None
    try:
        loader = _BoundedLoader(text)   # its reader refuses control characters here already
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise error(f"{what}: nested too deeply", where) from None
        if node is None:
            return None
        _check_expansion(node, where, error, what)
        try:
            return loader.construct_document(node)
        except _TooManyDigits as e:
            mark = e.args[1]
            raise error(f"{what} at line {mark.line + 1}, column {mark.column + 1}: {e.args[0]}", where) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what}{at}: {getattr(e, 'problem', None) or e}", where) from None
    finally:
        if loader is not None:
            loader.dispose()


class _TooManyDigits(ValueError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing integers with more digits than any setting needs (Python's
    int() would raise a ValueError of its own past 4,300, or take quadratic time below it)."""

    def construct_yaml_int(self, node):
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise _TooManyDigits(f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are read)", node.start_mark)
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _check_expansion(root, where, error, what) -> None:
    """Count the values the document would hold with every alias expanded (memoised per node,
    so this is linear in the nodes written), refusing self-reference and excess."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise error(f"{what}: an alias refers to a value that contains it", where)
        if depth > MAX_DEPTH:
            raise error(f"{what}: nested more than {MAX_DEPTH} levels deep", where)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_YAML_VALUES:
            raise error(f"{what}: its aliases (*name) expand it past {MAX_YAML_VALUES:,} values", where)
        sizes[key] = total
        return total

    size(root, 0)
