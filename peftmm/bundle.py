"""The on-disk adapter format.

A bundle is a folder that rebuilds its trained modules on freshly loaded frozen backbones:

- ``adapter_model.safetensors``: the trainable tensors only (``vision.`` / ``text.`` /
  ``fusion.`` / ``head.`` keys); its header metadata holds the format version and the sha256
  of ``adapter_config.json``, so a config edited or swapped after saving is detected.
- ``adapter_config.json``: the recipe that built the model, the label set, and per tower the
  backbone id, model type, precision and weight fingerprint.
- ``README.md``: a model card (Hugging Face front matter) with the measured metrics.

Only safetensors is ever read: no pickle from a user-supplied file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from . import __version__
from .errors import BundleError
from .io import atomic_directory

FORMAT_VERSION = 1
WEIGHTS, CONFIG, CARD = "adapter_model.safetensors", "adapter_config.json", "README.md"


def bundle_config(model, recipe: dict, metrics: dict | None = None) -> dict:
    """``recipe`` is the saved recipe as data (from ``model.export``), not the training one."""
    towers = {}
    for name, tower in model.towers.items():
        info = tower.info
        towers[name] = {"backbone": info.source, "model_type": info.model_type, "precision": info.precision,
                        "fingerprint": info.fingerprint, "hidden_size": info.hidden_size}
    return {
        "format": "peftmm", "format_version": FORMAT_VERSION, "peftmm_version": __version__,
        "name": recipe["name"], "task": recipe["task"]["type"], "labels": model.task.labels,
        "towers": towers, "recipe": recipe, "metrics": metrics or {},
    }


def save_bundle(model, recipe, path: str | Path, metrics: dict | None = None, overwrite: bool = True,
                card: str | None = None) -> Path:
    """Write a bundle folder atomically: readers see the old bundle or the new one, never a mix."""
    path = Path(path)
    tensors, saved_recipe = model.export(recipe)  # methods fold training-only structure here
    config = bundle_config(model, saved_recipe, metrics)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": "peftmm", "format_version": str(FORMAT_VERSION),
                "config_sha256": hashlib.sha256(config_bytes).hexdigest()}
    from .card import model_card

    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / WEIGHTS).write_bytes(save_tensors(tensors, metadata=metadata))
        (tmp / CONFIG).write_bytes(config_bytes)
        (tmp / CARD).write_text(card or model_card(config, tensors))
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise BundleError(f"not an adapter bundle: {CONFIG} is missing", str(path))
    try:
        config = json.loads((path / CONFIG).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{CONFIG} is not valid JSON ({e})", str(path)) from None
    if not isinstance(config, dict) or config.get("format") != "peftmm":
        raise BundleError(f"{CONFIG} is not a peftmm adapter config", str(path))
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"bundle format version {version!r} is newer than this peftmm reads "
                          f"({FORMAT_VERSION}); upgrade peftmm", str(path))
    return config


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the adapter tensors after checking the header against the config on disk."""
    path = Path(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"{WEIGHTS} is missing", str(path))
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{WEIGHTS} is corrupt or truncated ({e})", str(path)) from None
    expected = metadata.get("config_sha256")
    actual = hashlib.sha256((path / CONFIG).read_bytes()).hexdigest()
    if expected != actual:
        raise BundleError(f"{CONFIG} does not match {WEIGHTS} (config sha256 {actual[:12]}, "
                          f"weights were saved with {str(expected)[:12]})", str(path))
    return tensors


def load_bundle(path: str | Path, device="cpu", backbones: dict[str, str] | None = None):
    """Rebuild a bundle's model on freshly loaded frozen backbones. Returns (model, config).

    ``backbones`` may point a tower at another copy of the same weights (a local folder for a
    hub id); the fingerprint check makes sure they are the same weights.
    """
    from . import recipe as recipes
    from .model import MultimodalModel

    path = Path(path)
    config = read_config(path)
    tensors = read_tensors(path)
    data = config["recipe"]
    for tower, source in (backbones or {}).items():
        data[tower]["backbone"] = source
    recipe = recipes.from_dict(data, source=str(path / CONFIG))
    model = MultimodalModel.build(recipe, config["labels"], device=device)
    for name, tower in model.towers.items():
        saved = config["towers"][name]["fingerprint"]
        if tower.info.fingerprint != saved:
            raise BundleError(f"the {name} backbone {tower.info.source!r} has weight fingerprint "
                              f"{tower.info.fingerprint[:12]}, but this adapter was trained on "
                              f"{saved[:12]}: it belongs to other weights", str(path))
    model.load_trainable_state_dict(tensors, where=str(path / WEIGHTS))
    model.eval()
    return model, recipe, config
