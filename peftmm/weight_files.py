"""Which backbone weight files may be read: safetensors only, never a pickle.

``from_pretrained(use_safetensors=True)`` is not enough on its own: transformers still follows a
config's ``transformers_weights`` or a shard index to other files. These checks run before
transformers reads any weight.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PeftmmError
from .hub_access import local_only
from .safe_load import load_json

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_refused(name: str, source: str, folder: str, what: str) -> PeftmmError:
    where = source if folder == source else f"{source!r} ({folder})"
    return PeftmmError(f"cannot load the {name} backbone {where}: only safetensors weights are loaded "
                       f"(model.safetensors, or shards named in model.safetensors.index.json), never pickle files "
                       f"such as pytorch_model.bin, which can run code when read; {what}. Convert it to safetensors "
                       "(transformers' save_pretrained writes model.safetensors)")


def check_safetensors_only(name: str, source: str, folder: str, config, tower_config) -> None:
    """Refuse, before transformers reads any weight, every way a backbone could point it at a
    pickle despite ``use_safetensors=True``: no safetensors file in a local folder, a config naming
    another weights file (``transformers_weights``), or a safetensors index listing .bin shards."""
    for conf in (config, tower_config):
        explicit = getattr(conf, "transformers_weights", None)
        if explicit is not None and not str(explicit).endswith(_SAFE_SUFFIXES):
            raise pickle_refused(name, source, folder, f"its config names the weights file {explicit!r}")
    path = Path(folder)
    index = None
    if path.is_dir():
        if not (path / SAFE_WEIGHTS).is_file() and not (path / SAFE_INDEX).is_file():
            pickles = sorted(f.name for f in path.iterdir() if f.name.endswith(_PICKLE_SUFFIXES))
            raise pickle_refused(name, source, folder, f"this folder has {', '.join(pickles) or 'no weights file'} "
                                  "and no model.safetensors")
        index = path / SAFE_INDEX if (path / SAFE_INDEX).is_file() else None
    else:  # a hub id: its index, if the repo has one (transformers would fetch it anyway)
        from transformers.utils import cached_file

        try:
            found = cached_file(folder, SAFE_INDEX, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False, local_files_only=local_only(folder))
        except OSError:
            found = None
        index = Path(found) if found else None
    if index is not None:
        try:
            shards = load_json(index.read_bytes(), str(index))["weight_map"].values()
        except (OSError, PeftmmError, KeyError, TypeError, AttributeError):
            raise pickle_refused(name, source, folder, f"{SAFE_INDEX} has no readable weight_map") from None
        bad = sorted({str(s) for s in shards if not str(s).endswith(".safetensors")})
        if bad:
            raise pickle_refused(name, source, folder, f"{SAFE_INDEX} names the shards {', '.join(bad[:3])}")
