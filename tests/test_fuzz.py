"""Property-based tests (hypothesis): whatever a recipe, a --set string or a damaged bundle holds,
peftmm answers with its own error type, never another exception and never a hang.

- Recipe parser: random recipes grown from the recipe schema itself (every section, method,
  fusion and task with their real keys and types, valid-looking and junk values mixed, plus
  unknown keys) through ``recipe.from_dict``; random YAML text through ``recipe.load``; random
  ``--set`` strings through ``apply_override``. Each returns a Recipe or raises RecipeError; a
  Recipe that validates survives ``to_dict`` -> ``from_dict`` unchanged and holds no NaN/inf.
- Bundle reader: a good tiny bundle's ``adapter_model.safetensors`` truncated at random offsets,
  with random bytes of its header replaced, with a random header length, and with header entries
  edited as JSON (dtype, shape, offsets, names, metadata; the length kept right), plus the one
  edit that keeps every size (F32 -> I32); its ``adapter_config.json`` edited at random (text and JSON
  level, with and without re-signing the checksum). ``read_header`` / ``bundle_summary`` /
  ``load_bundle`` either succeed with tensors identical to the saved ones or raise BundleError
  (a re-signed config whose recipe no longer validates or builds may also raise the
  RecipeError / PeftmmError that names the bundle's adapter_config.json); a failed load leaves
  nothing in the shared backbones. The same config edits through ``Runtime.register``: the
  bundle is registered whole or refused, the runtime's adapters and backbones unchanged.

Every example runs under an alarm, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import types
import typing
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import pytest
import tiny
import torch
from helpers import build, perturb
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from peftmm.bundle import CONFIG, WEIGHTS, bundle_summary, load_bundle, read_header, read_tensors, save_bundle
from peftmm.errors import BundleError, PeftmmError, RecipeError
from peftmm.fusion import FUSIONS
from peftmm.methods import METHODS
from peftmm.recipe import DataSpec, Recipe, TowerSpec, TrainSpec, apply_override, from_dict
from peftmm.recipe import load as load_recipe
from peftmm.tasks import TASKS

# PEFTMM_FUZZ_EXAMPLES raises the budget for a longer hunt (150 keeps the file well under a minute)
FUZZ = settings(max_examples=int(os.environ.get("PEFTMM_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
SECONDS_PER_EXAMPLE = 20  # far above the slowest (a bundle rebuilt on its backbones, ~0.2 s)


@contextlib.contextmanager
def no_hang(seconds: int = SECONDS_PER_EXAMPLE):
    def timeout(*_):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# Recipes grown from the schema

SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
BACKBONES = st.sampled_from(["mobilenet-v2", "minilm-l6", "./nowhere", "org/model"]) | st.text(max_size=10)
REGISTRIES = {"task": TASKS, "fusion": FUSIONS}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def value_for(tp, name: str = "") -> st.SearchStrategy:
    """A value a person might write for a setting of type ``tp`` (or, now and then, anything)."""
    if name == "backbone":
        return BACKBONES
    if name == "methods":
        return st.lists(registry_section(METHODS), max_size=3) | JUNK
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of([st.none() if o is type(None) else value_for(o, name) for o in get_args(tp)])
    if origin is Literal:
        return st.sampled_from(get_args(tp)) | st.text(max_size=8)
    if origin is list:
        (item,) = get_args(tp) or (typing.Any,)
        return st.lists(value_for(item), max_size=3) | JUNK
    if dataclasses.is_dataclass(tp):
        return section(tp)
    if tp is bool:
        return st.booleans() | JUNK
    if tp is int:
        return st.integers(-5, 5000) | st.integers() | JUNK
    if tp is float:
        return st.floats() | st.floats(0, 1) | st.sampled_from(["1e-3", "nan", ".inf", "x"]) | JUNK
    if tp is str:
        return st.text(max_size=12) | JUNK
    return JUNK


@st.composite
def section(draw, cls, skip=()) -> dict:
    """Some of ``cls``'s keys with values for their types, and sometimes a key it does not have."""
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    chosen = draw(st.lists(st.sampled_from(fields), unique_by=lambda f: f.name, max_size=len(fields))) if fields else []
    data = {}
    for f in chosen:
        if f.name in REGISTRIES:
            data[f.name] = draw(registry_section(REGISTRIES[f.name]) | JUNK)
        else:
            data[f.name] = draw(value_for(hints[f.name], f.name))
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(max_size=8))] = draw(JUNK)
    return data


@st.composite
def registry_section(draw, registry) -> dict | str:
    name = draw(st.sampled_from(registry.names()) | st.text(max_size=8) | JUNK)
    part = registry._parts.get(name) if isinstance(name, str) else None
    settings_ = draw(section(part.Config)) if part is not None else draw(st.dictionaries(st.text(max_size=6), JUNK,
                                                                                         max_size=2))
    if draw(st.integers(0, 9)) == 0:
        return name  # the short form: type name only
    return {"type": name, **settings_}


@st.composite
def recipes(draw) -> dict:
    data = {}
    for tower in ("vision", "text"):
        if draw(st.integers(0, 19)):  # a required section is rarely left out
            data[tower] = {"backbone": draw(BACKBONES), **draw(section(TowerSpec, skip=("backbone",)))}
    data.update(draw(section(Recipe, skip=("vision", "text"))))
    for name, cls in (("data", DataSpec), ("train", TrainSpec)):
        if name not in data and draw(st.booleans()):
            data[name] = draw(section(cls))
    return data


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def check_recipe(make) -> None:
    try:
        with no_hang():
            recipe = make()
    except RecipeError:
        return
    assert isinstance(recipe, Recipe)
    data = recipe.to_dict()
    assert _finite(data), data
    again = from_dict(data, source=recipe.source)
    assert again.to_dict() == data


@FUZZ
@given(recipes())
@example({"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"}, "train": {"lr": "nan"}})
@example({"vision": {"backbone": "m"}, "text": {"backbone": "t"}, "task": {"type": ["vqa"]}})
@example({"vision": {"backbone": "m"}, "text": {"backbone": "t"}, "train": {"lr": 10**400}})
@example({"vision": {"backbone": "m"}, "text": {"backbone": "t", "methods": [{"type": {"a": 1}}]}})
def test_random_recipes_validate_or_raise_recipe_errors(data):
    check_recipe(lambda: from_dict(data, source="fuzz.yaml"))


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
@example("vision: {backbone: x\n")
@example("vision: !!python/object/apply:os.system ['true']\n")
@example("? [a, b]\n: 1\n")
def test_random_yaml_files_load_or_raise_recipe_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "recipe.yaml"
    path.write_text(text, errors="surrogateescape")
    check_recipe(lambda: load_recipe(path))


def _key_paths() -> list[str]:
    """Every key path the schema knows (methods/fusion/task settings included), for --set."""
    paths = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp = _hints(cls)[f.name]
            paths.append(prefix + f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
    walk(Recipe, "")
    for registry, where in ((METHODS, "text.methods.0."), (METHODS, "vision.methods.1."), (FUSIONS, "fusion."),
                            (TASKS, "task.")):
        for part in registry._parts.values():
            paths += [where + f.name for f in dataclasses.fields(part.Config)]
        paths.append(where + "type")
    return sorted(set(paths))


KEYS = _key_paths()
BASE = {"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6", "methods": [{"type": "lora"}]}}
VALUES = (st.text(max_size=16) | JUNK.map(lambda v: json.dumps(v, allow_nan=True))
          | st.sampled_from(["[", "{a: ", "!!python/object:os.system ls", "&a [*a]", "*x", "'", "1e400", ".nan",
                             "~", "- a", "x: y", "!!binary AAAA", "%", "@"]))
PATHS = (st.sampled_from(KEYS) | st.lists(st.sampled_from(KEYS) | st.text(max_size=5), min_size=1, max_size=4)
         .map(".".join))


@FUZZ
@given(st.lists(st.tuples(PATHS, VALUES).map("=".join) | st.text(max_size=30), min_size=1, max_size=3))
@example(["train.lr=["])
@example(["train.epochs=!!python/object:os.system ls"])
@example(["task.type=[vqa]"])
@example(["fusion={type: [1]}"])
@example(["train.lr=.nan"])
@example(["train.lr=1" + "0" * 400])
def test_random_set_strings_apply_or_raise_recipe_errors(overrides):
    check_recipe(lambda: from_dict(BASE, source="fuzz.yaml", overrides=overrides))


@FUZZ
@given(st.text(max_size=40), JUNK)
def test_apply_override_on_any_data_raises_only_recipe_errors(item, data):
    try:
        with no_hang():
            apply_override(data, item, "fuzz.yaml")
    except RecipeError:
        pass


# JSON-looking text: brackets, digits and quotes mixed, runs of them repeated (deep nests, long numbers)
JSONISH = st.lists(st.sampled_from(['[', ']', '{', '}', '"', '\\', ':', ',', '1', '9' * 80, '-', 'e', '.', 'true',
                                    'null', 'NaN', ' ', '\n', '"a"', '[' * 200, ']' * 200, '\xff']),
                   max_size=40).map("".join)


@FUZZ
@given(JSONISH | st.text(max_size=60))
def test_random_json_text_loads_within_bounds_or_raises_peftmm_errors(text):
    """Whatever the text, the JSON loader returns a value no deeper than its bound and without
    over-long integers, or raises its caller's error type; never RecursionError or ValueError."""
    from peftmm.safe_load import MAX_DEPTH, MAX_INT_DIGITS, json_depth, load_json

    with no_hang():
        try:
            value = load_json(text.encode("utf-8", "surrogatepass"), "fuzz.json", BundleError)
        except BundleError:
            return
    assert json_depth(json.dumps(value)) <= MAX_DEPTH
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, int):
            assert len(str(abs(item))) <= MAX_INT_DIGITS
        stack.extend(item.values() if isinstance(item, dict) else item if isinstance(item, list) else [])


# ---------------------------------------------------------------------------------------------
# Bundles: a good tiny one, damaged at random

@pytest.fixture(scope="module")
def good_bundle(tiny_models, tmp_path_factory):
    """A tiny bundle (adapters in the vision tower, LoRA in the text tower), its tensors and
    bytes, and its backbones loaded once (load_bundle builds on them, as the runtime does)."""
    recipe, model, _ = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                         vision_methods=[{"type": "adapter", "reduction_factor": 4}],
                                         text_methods=[{"type": "lora", "r": 2}]))
    perturb(model, scale=0.01)  # every trainable tensor non-trivial, so a wrong load shows
    path = save_bundle(model, recipe, tmp_path_factory.mktemp("fuzz-bundle") / "good")
    towers = dict(model.towers.items())
    model.remove_methods()
    return Good(path=path, weights=(path / WEIGHTS).read_bytes(), config=(path / CONFIG).read_bytes(),
                tensors=load_file(path / WEIGHTS), towers=towers)


class Good(dict):
    def __repr__(self):  # hypothesis prints a failing example's arguments: not the whole bundle
        return f"<good bundle {self['path']}>"


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(a[k], b[k]) for k in a)


def _tower_sizes(towers) -> dict:
    return {name: sum(p.numel() for p in tower.parameters()) for name, tower in towers.items()}


class Workspace:
    """One bundle folder rewritten for every example (a fresh folder each time would be slow)."""

    def __init__(self, good, root: Path):
        self.good, self.path = good, root / "bundle"
        shutil.copytree(good["path"], self.path)

    def write(self, weights: bytes | None = None, config: bytes | None = None) -> Path:
        (self.path / WEIGHTS).write_bytes(self.good["weights"] if weights is None else weights)
        (self.path / CONFIG).write_bytes(self.good["config"] if config is None else config)
        return self.path


def check_bundle(good, path: Path, allow_config_errors: bool = False) -> str:
    """The property: every reader succeeds with the saved tensors or raises BundleError; and a
    failed load_bundle leaves nothing in the shared towers. Returns what happened."""
    towers = good["towers"]
    before = _tower_sizes(towers)
    outcome = "ok"
    with no_hang():
        for read in (read_header, bundle_summary):
            try:
                read(path)
            except BundleError:
                outcome = "refused"
        try:
            tensors = read_tensors(path)
        except BundleError:
            tensors, outcome = None, "refused"
        try:
            model, _, _ = load_bundle(path, towers=towers)
        except BundleError:
            model, outcome = None, "refused"
        except PeftmmError as e:  # a re-signed config describing a model that cannot be built says so,
            assert allow_config_errors and e.where == str(path / CONFIG), repr(e)   # naming the file
            model, outcome = None, "config refused"
    if model is None:
        assert _tower_sizes(towers) == before, "a failed load left modules in the shared towers"
    else:
        loaded = {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()}
        model.remove_methods()
        assert _tower_sizes(towers) == before, "remove_methods left modules in the shared towers"
        assert tensors is not None and _same_tensors(tensors, good["tensors"]), "loaded changed tensors"
        assert loaded.keys() == good["tensors"].keys() and all(
            torch.equal(loaded[k], good["tensors"][k].to(loaded[k].dtype)) for k in loaded), "loaded other values"
        return "loaded"
    if tensors is not None and not _same_tensors(tensors, good["tensors"]):
        return "refused"  # read_tensors gives what the file holds; load_bundle refused it
    return outcome


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@st.composite
def damaged_weights(draw, data: bytes) -> bytes:
    """Truncation, replaced header bytes, another header length, or a header edited as JSON."""
    length = _header_length(data)
    kind = draw(st.sampled_from(["truncate", "header-bytes", "header-length", "header-json"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "header-bytes":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, 8 + length - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "header-length":
        new = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, length - 64), length + 64)
                   | st.integers(0, len(data) + 16))
        return struct.pack("<Q", new) + data[8:]
    header = json.loads(data[8:8 + length])
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    edit = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop", "metadata", "junk"]))
    if edit == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                                               "F8_E4M3", "U32", "C64", "x"]) | JUNK)
    elif edit == "shape":
        entry["shape"] = draw(st.lists(st.integers(-2, 300), max_size=3) | JUNK)
    elif edit == "offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-1, len(data)), min_size=2, max_size=2) | JUNK)
    elif edit == "rename":
        header[draw(st.text(max_size=20))] = header.pop(name)
    elif edit == "drop":
        header.pop(name)
    elif edit == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.sampled_from(["format", "format_version", "config_sha256"])
                                                      | st.text(max_size=5), JUNK, max_size=3) | JUNK)
    else:
        header[name] = draw(JUNK)
    raw = json.dumps(header, allow_nan=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:]


@FUZZ
@given(st.data())
def test_damaged_weights_load_identically_or_raise_bundle_errors(good_bundle, tmp_path_factory, data):
    work = Workspace(good_bundle, tmp_path_factory.mktemp("w"))
    weights = data.draw(damaged_weights(good_bundle["weights"]))
    event(check_bundle(good_bundle, work.write(weights=weights)))


def test_a_dtype_swapped_in_the_header_is_refused(good_bundle, tmp_path):
    """F32 -> I32 keeps every size: the bytes would load reinterpreted as integers."""
    data = good_bundle["weights"]
    length = _header_length(data)
    header = data[8:8 + length].replace(b'"F32"', b'"I32"', 1)
    work = Workspace(good_bundle, tmp_path)
    assert check_bundle(good_bundle, work.write(weights=data[:8] + header + data[8 + length:])) == "refused"


def _resign(weights: bytes, config: bytes) -> bytes:
    """The weights with the checksum of ``config`` in their header (as if saved with it)."""
    length = _header_length(weights)
    header = json.loads(weights[8:8 + length])
    header["__metadata__"]["config_sha256"] = hashlib.sha256(config).hexdigest()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + weights[8 + length:]


def _paths(value, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def edited_configs(draw, config: bytes) -> tuple[bytes, bool]:
    """(new adapter_config.json, whether to re-sign the weights for it)."""
    if draw(st.integers(0, 3)) == 0:  # text-level damage
        out = bytearray(config)
        if draw(st.booleans()):
            return bytes(out[:draw(st.integers(0, len(out) - 1))]), draw(st.booleans())
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out), draw(st.booleans())
    data = json.loads(config)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        node = data
        for part in path[:-1]:
            node = node[part]
        if draw(st.integers(0, 2)) == 0:
            node.pop(path[-1]) if isinstance(node, dict) else node.pop(path[-1])
        else:
            node[path[-1]] = draw(JUNK | st.sampled_from(["lora", "adapter", "prefix", "full", "vqa", "retrieval",
                                                          "projector", 99, [], {}]))
    return json.dumps(data, allow_nan=True).encode(), draw(st.integers(0, 4)) > 0


@FUZZ
@given(st.data())
def test_edited_configs_load_identically_or_raise_bundle_errors(good_bundle, tmp_path_factory, data):
    work = Workspace(good_bundle, tmp_path_factory.mktemp("c"))
    config, resign = data.draw(edited_configs(good_bundle["config"]))
    weights = _resign(good_bundle["weights"], config) if resign else None
    event(("re-signed: " if resign else "") + check_bundle(good_bundle, work.write(weights=weights, config=config),
                                                         allow_config_errors=resign))


@pytest.fixture(scope="module")
def serving(good_bundle, tmp_path_factory):
    """A Runtime serving the good bundle: edited copies must be refused without changing it."""
    from peftmm.runtime import Runtime

    root = tmp_path_factory.mktemp("serving")
    shutil.copytree(good_bundle["path"], root / "good")
    runtime = Runtime(device="cpu", root=root)
    runtime.register("good")
    return root, runtime


@settings(FUZZ, max_examples=max(20, FUZZ.max_examples // 3))
@given(st.data())
def test_edited_configs_register_whole_or_not_at_all(good_bundle, serving, data):
    """Runtime.register reads the config before load_bundle does: the same edits, through it."""
    root, runtime = serving
    config, resign = data.draw(edited_configs(good_bundle["config"]))
    path = root / "edited"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(good_bundle["path"], path)
    (path / CONFIG).write_bytes(config)
    if resign:
        (path / WEIGHTS).write_bytes(_resign(good_bundle["weights"], config))
    before = (runtime.names(), _tower_sizes(runtime._towers), runtime.backbones())
    try:
        with no_hang():
            runtime.register("edited")
    except BundleError:
        outcome = "refused"
    except PeftmmError as e:
        assert resign and e.where == str(path / CONFIG), repr(e)
        outcome = "config refused"
    else:
        runtime.unregister("edited")
        outcome = "registered"
    assert (runtime.names(), _tower_sizes(runtime._towers), runtime.backbones()) == before
    event(("re-signed: " if resign else "") + outcome)
