"""The on-disk adapter format.

A bundle is a folder that rebuilds its trained modules on freshly loaded frozen backbones:

- ``adapter_model.safetensors``: the trainable tensors only (``vision.`` / ``text.`` /
  ``fusion.`` / ``head.`` keys); its header metadata holds the format version and the sha256
  of ``peftmm_config.json``, so a config edited or swapped after saving is detected.
- ``peftmm_config.json``: the recipe that built the model, the label set, and per tower the
  backbone id, model type, precision and weight fingerprint. Format 1 called it
  ``adapter_config.json``, the name transformers and Hub tools take as the mark of a PEFT
  adapter (which a bundle is not); such bundles still load, with a note, and ``peftmm
  convert-bundle`` renames the file (its bytes, and so the weights' checksum, unchanged).
- ``README.md``: a model card (Hugging Face front matter) with the measured metrics.

Only safetensors is ever read: no pickle from a user-supplied file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from . import __version__
from . import recipe as recipes
from .backbones import TOWERS, architectures
from .bundle_files import WEIGHTS, check_finite, member, read_header  # noqa: F401  (public here too)
from .card import model_card
from .errors import BundleError
from .hub_bundles import HUB_SCHEME, pull
from .io import atomic_directory
from .methods.base import DEFAULT_SLOT
from .model import MultimodalModel
from .safe_load import load_json, short_repr
from .tasks.base import MEMORY  # the prefix of tensors a task built from data (Task.memory_tensors)

FORMAT_VERSION = 2   # 2: the config is peftmm_config.json (1: adapter_config.json)
CONFIG, CARD = "peftmm_config.json", "README.md"   # and WEIGHTS (bundle_files.py)
LEGACY_CONFIG = "adapter_config.json"   # format 1's name for CONFIG
_noted: set[str] = set()
REQUIRED_KEYS = ("name", "task", "labels", "towers", "recipe")

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_adapter_name(name: str) -> str:
    """Adapter names become folder names under adapters/ and slot names inside shared backbones
    (where a '.' would split a module path): letters, digits, '-' and '_' only."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise BundleError(f"adapter name {name!r} is not allowed: use 1 to 64 letters, digits, '-' or '_', "
                          "starting with a letter or digit")
    return name


def bundle_config(model, recipe: dict, metrics: dict | None = None, precision: dict | None = None) -> dict:
    """``recipe`` is the saved recipe as data (from ``model.export``), not the training one.
    ``precision``: what the run trained and validated under (precision.record); inference on
    CUDA runs under it (precision.inference_plan). Left out when unknown."""
    towers = {}
    for name, tower in model.towers.items():
        info = tower.info
        towers[name] = {"backbone": info.source, "model_type": info.model_type, "precision": info.precision,
                        "fingerprint": info.fingerprint, "hidden_size": info.hidden_size}
    return {
        "format": "peftmm", "format_version": FORMAT_VERSION, "peftmm_version": __version__,
        "name": recipe["name"], "task": recipe["task"]["type"], "labels": model.task.labels,
        "towers": towers, "recipe": recipe, "metrics": metrics or {},
    } | ({"precision": precision} if precision else {})


def save_bundle(model, recipe, path: str | Path, metrics: dict | None = None, overwrite: bool = True,
                card: str | None = None, precision: dict | None = None, extra: dict | None = None) -> Path:
    """Write a bundle folder atomically: readers see the old bundle or the new one, never a mix.
    ``extra``: more keys for the config (a merged bundle's ``merge`` record)."""
    path = Path(path)
    tensors, saved_recipe = model.export(recipe)  # methods fold training-only structure here
    config = bundle_config(model, saved_recipe, metrics, precision) | (extra or {})
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    check_finite(tensors, str(path))
    metadata = {"format": "peftmm", "format_version": str(FORMAT_VERSION),
                "config_sha256": hashlib.sha256(config_bytes).hexdigest()}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / WEIGHTS).write_bytes(save_tensors(tensors, metadata=metadata))
        (tmp / CONFIG).write_bytes(config_bytes)
        (tmp / CARD).write_text(card or model_card(config, tensors))
    return path


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` holds a bundle's config, in this layout or format 1's."""
    return (Path(path) / CONFIG).is_file() or (Path(path) / LEGACY_CONFIG).is_file()


def config_name(path: str | Path) -> str:
    """The file name of the bundle's config: CONFIG, or format 1's where only that is there."""
    path = Path(path)
    return LEGACY_CONFIG if not (path / CONFIG).is_file() and (path / LEGACY_CONFIG).is_file() else CONFIG


def _note_legacy(path: Path) -> None:
    """One line per bundle and process: a format-1 bundle loads, and how to move it on."""
    if str(path) not in _noted:
        _noted.add(str(path))
        print(f"peftmm: {path}: a bundle in the format-1 layout ({LEGACY_CONFIG}); it loads as it is, and "
              f"`peftmm convert-bundle {path}` renames that file to {CONFIG}", file=sys.stderr)


def config_path(path: str | Path) -> Path:
    return Path(path) / config_name(path)


def resolve_bundle(path: str | Path) -> Path:
    """A bundle folder, a run directory (its ``bundle/``), a name under ./adapters/, or a Hub
    repository ``hf://OWNER/NAME[@REVISION]`` (downloaded to the Hugging Face cache: hub_bundles.py)."""
    if isinstance(path, str) and path.startswith(HUB_SCHEME):
        folder = pull(path, [WEIGHTS, CONFIG, LEGACY_CONFIG, CARD])
        if not is_bundle(folder):
            raise BundleError(f"the repository holds no peftmm bundle ({CONFIG} is missing)", path)
        read_config(folder)    # checked as a local bundle is, before anything loads
        read_tensors(folder)
        return folder
    path = Path(path)
    for candidate in (path, path / "bundle", Path("adapters") / path):
        if is_bundle(candidate):
            return candidate
    raise BundleError(f"no adapter bundle here (expected {CONFIG} in it, in its bundle/, "
                      "or a bundle of that name under ./adapters)", str(path))


def read_config(path: str | Path) -> dict:
    path = Path(path)
    name = config_name(path)   # the messages below name the file read
    if not (path / name).is_file():
        raise BundleError(f"not an adapter bundle: {name} is missing", str(path))
    config = load_json(member(path, name).read_bytes(), str(path), BundleError, f"{name} is not valid JSON")
    if not isinstance(config, dict) or config.get("format") != "peftmm":
        raise BundleError(f"{name} is not a peftmm adapter config", str(path))
    if name == LEGACY_CONFIG:
        _note_legacy(path)
    config["format_version"] = format_version(config.get("format_version"), path, name)
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise BundleError(f"{name} lacks the key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(k) for k in missing)}", str(path))
    expected_types = {"name": str, "task": str, "labels": list, "towers": dict, "recipe": dict}
    for key, kind in expected_types.items():
        if not isinstance(config[key], kind):
            raise BundleError(f"{name}: {key!r} must be a {kind.__name__}, "
                              f"got {type(config[key]).__name__}", str(path))
    if not all(isinstance(label, str) for label in config["labels"]):
        raise BundleError(f"{name}: 'labels' must be a list of strings", str(path))
    seen: set[str] = set()
    twice = next((label for label in config["labels"] if label in seen or seen.add(label)), None)
    if twice is not None:
        raise BundleError(f"{name}: label {short_repr(twice)} is listed more than once in 'labels'", str(path))
    for tower in TOWERS:
        if not isinstance(config["towers"].get(tower), dict):
            raise BundleError(f"{name}: towers lacks the {tower!r} tower", str(path))
        for key in ("backbone", "fingerprint", "precision"):
            if not isinstance(config["towers"][tower].get(key), str):
                raise BundleError(f"{name}: towers.{tower} lacks its {key!r} (a string)", str(path))
        if not isinstance(config["recipe"].get(tower), dict):
            raise BundleError(f"{name}: recipe lacks the {tower!r} section", str(path))
    recorded = config.get("precision")
    if recorded is not None and (not isinstance(recorded, dict)
                                 or recorded.get("mixed_precision") not in ("no", "bf16", "fp16")):
        raise BundleError(f"{name}: 'precision' must be an object whose mixed_precision is no, bf16 or fp16, "
                          f"got {recorded!r}", str(path))
    if "metrics" in config and not isinstance(config["metrics"], dict):
        raise BundleError(f"{name}: 'metrics' must be a mapping", str(path))
    recipe_task = config["recipe"].get("task", {"type": "vqa"})  # the recipe's default task
    recipe_task = recipe_task.get("type") if isinstance(recipe_task, dict) else recipe_task
    if recipe_task != config["task"]:
        raise BundleError(f"{name}: 'task' is {short_repr(config['task'])} but its recipe's task.type is "
                          f"{short_repr(recipe_task)}", str(path))
    return config


def format_version(version, path: Path, name: str = CONFIG) -> int:
    """The config's ``format_version`` as an int: 1.0 is 1 (a JSON writer may add the point);
    anything but a positive whole number is refused, and one newer than this peftmm reads."""
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{name}: format_version {short_repr(version)} is not a version: it must be a "
                          f"positive whole number (this peftmm reads up to {FORMAT_VERSION})", str(path))
    if version > FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is newer than this peftmm reads "
                          f"({FORMAT_VERSION}); upgrade peftmm", str(path))
    return version


def _check_checksum(path: Path, header: dict) -> None:
    name = config_name(path)
    expected = header.get("__metadata__", {}).get("config_sha256")
    actual = hashlib.sha256(member(path, name).read_bytes()).hexdigest()
    if expected != actual:
        raise BundleError(f"{name} does not match {WEIGHTS} (config sha256 {actual[:12]}, "
                          f"weights were saved with {str(expected)[:12]})", str(path))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the adapter tensors after checking the header against the config on disk."""
    path = Path(path)
    header = read_header(path)
    if not is_bundle(path):
        raise BundleError(f"not an adapter bundle: {CONFIG} is missing", str(path))
    _check_checksum(path, header)
    try:
        with safe_open(str(member(path, WEIGHTS)), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{WEIGHTS} is corrupt or truncated ({e})", str(path)) from None
    check_finite(tensors, str(path / WEIGHTS))
    return tensors


def _methods(data, model_type) -> list[dict]:
    """A tower's methods as saved, type first; LoRA's unset targets show the architecture's defaults."""
    methods = data.get("methods", []) if isinstance(data, dict) else []
    methods = methods if isinstance(methods, list) else []
    methods = [{"type": m.get("type"), **{k: v for k, v in m.items() if k != "type"}} if isinstance(m, dict)
               else {"type": str(m)} for m in methods]
    for method in methods:
        if method["type"] == "lora" and method.get("targets") is None:
            defaults = architectures().get(model_type, {}).get("lora_targets") if isinstance(model_type, str) else None
            if defaults:
                method["targets"], method["default_targets"] = list(defaults), True
    return methods


def bundle_summary(path: str | Path) -> dict:
    """What a bundle holds, read from its config and the safetensors header only.

    No backbone is loaded and no tensor is read; the checks are those of :func:`read_config`,
    :func:`read_header` and the config checksum, so a summary is also a cheap integrity check
    (shapes against a rebuilt model are checked only by :func:`load_bundle`).
    """
    path = Path(path)
    config = read_config(path)
    header = read_header(path)
    _check_checksum(path, header)
    groups = {"vision": 0, "text": 0, "fusion": 0, "head": 0, MEMORY: 0}
    total = tensors = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = math.prod(entry["shape"])
        tensors += 1
        prefix = name.split(".", 1)[0]
        if prefix in groups:
            groups[prefix] += count
        if prefix != MEMORY:   # built from the training data, not trained
            total += count
    recipe = config["recipe"]
    towers = {}
    for tower in TOWERS:
        info = config["towers"][tower]
        towers[tower] = {key: info.get(key) for key in ("backbone", "model_type", "precision", "fingerprint",
                                                         "hidden_size")}
        towers[tower]["methods"] = _methods(recipe[tower], info.get("model_type"))
        towers[tower]["trainable_params"] = groups[tower]
    files = {name: member(path, name).stat().st_size for name in (WEIGHTS, config_name(path), CARD)
             if (path / name).is_file()}
    fusion = recipe.get("fusion") if isinstance(recipe.get("fusion"), dict) else {}
    head = recipe.get("task") if isinstance(recipe.get("task"), dict) else {}
    return {
        "path": str(path), "name": config["name"], "task": config["task"], "labels": len(config["labels"]),
        "format_version": config["format_version"], "peftmm_version": config.get("peftmm_version"),
        "towers": towers,
        "fusion": {**fusion, "trainable_params": groups["fusion"]},
        "head": {**{k: v for k, v in head.items() if k != "type"}, "trainable_params": groups["head"]},
        "trainable_params": total, "tensors": tensors, "memory_values": groups[MEMORY],
        "files": files, "total_bytes": sum(files.values()),
        "metrics": config.get("metrics", {}),
    }


def load_bundle(path: str | Path, device="cpu", backbones: dict[str, str] | None = None,
                towers: dict | None = None, slot: str | None = None):
    """Rebuild a bundle's model on freshly loaded frozen backbones. Returns (model, recipe, config).

    ``backbones`` may point a tower at another copy of the same weights (a local folder for a
    hub id); the fingerprint check makes sure they are the same weights. ``towers`` passes
    backbones that are already loaded (shared by the multi-adapter runtime), into which the
    bundle's modules go under ``slot``; on any error nothing of the bundle stays in them.
    """
    path = Path(path)
    config = read_config(path)
    tensors = read_tensors(path)
    data = config["recipe"]
    for tower, source in (backbones or {}).items():
        data[tower]["backbone"] = source
    recipe = recipes.from_dict(data, source=str(config_path(path)))
    check_fingerprints(config, towers or {}, path)
    model = MultimodalModel.build(recipe, config["labels"], device=device, towers=towers, slot=slot or DEFAULT_SLOT)
    try:
        check_fingerprints(config, model.towers, path)
        _load_memory(model, tensors, config, path)
        model.load_trainable_state_dict(tensors, where=str(path / WEIGHTS))
    except BaseException:
        model.remove_methods()
        raise
    model.eval()
    return model, recipe, config


def _load_memory(model, tensors: dict[str, torch.Tensor], config: dict, path: Path) -> None:
    """Hand the ``memory.*`` tensors to the task (and out of ``tensors``)."""
    memory = {k.split(".", 1)[1]: tensors.pop(k) for k in [k for k in tensors if k.split(".", 1)[0] == MEMORY]}
    try:
        model.task.load_memory(memory)
    except KeyError as e:
        raise BundleError(f"the {config['task']} task needs tensor {e.args[0]}, which this bundle lacks",
                          str(path / WEIGHTS)) from None
    if memory and not model.task.memory_tensors():
        raise BundleError(f"unexpected memory tensors {sorted(memory)[:3]} for a model that keeps none",
                          str(path / WEIGHTS))


def check_fingerprints(config: dict, towers: dict, path: Path, context: str = "") -> None:
    """BundleError when one of ``towers`` (name -> loaded tower) holds other weights than the
    bundle at ``path`` (its ``config``) was trained on; ``context`` begins the message."""
    for name, tower in towers.items():
        saved = config["towers"][name]["fingerprint"]
        if tower.info.fingerprint != saved:
            raise BundleError(f"{context}the {name} backbone {tower.info.source!r} has weight fingerprint "
                              f"{tower.info.fingerprint[:12]}, but this adapter was trained on "
                              f"{saved[:12]}: it belongs to other weights", str(path))


def initialise_from(model, path: str | Path) -> dict:
    """Copy an earlier bundle's trained tensors into ``model`` wherever name and shape agree.

    Both backbones must be the weights the bundle was trained on (fingerprints), since its
    modules and fusion were fitted to their features. Returns what was loaded and skipped.
    """
    path = Path(path)
    config = read_config(path)
    tensors = read_tensors(path)
    check_fingerprints(config, model.towers, path, context="init_from: ")
    # A fusion or head is reused only when it is the same kind (same answers, for a head): equal
    # names and shapes across different kinds would be a coincidence, not a trained part.
    reusable = {"vision", "text"}
    if config["recipe"]["fusion"]["type"] == model.fusion.registry_name:
        reusable.add("fusion")
    if model.task.reuses_head(config["task"], config["labels"]):
        reusable.add("head")
    target = model.trainable_state_dict()
    loaded = [k for k, v in tensors.items() if k.split(".", 1)[0] in reusable and k in target
              and tuple(target[k].shape) == tuple(v.shape)]
    if not loaded:
        raise BundleError("init_from: none of this bundle's tensors fits the new model (no shared "
                          "method, fusion or head with the same names and shapes)", str(path))
    with torch.no_grad():
        for key in loaded:
            target[key].copy_(tensors[key].to(target[key].device, target[key].dtype))
    parts = sorted({k.split(".", 1)[0] for k in loaded})
    return {"bundle": str(path), "loaded": len(loaded), "skipped": len(tensors) - len(loaded), "parts": parts}
