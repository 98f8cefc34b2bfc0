"""LoRA in and out of vanilla peft: one tower's LoRA as a peft adapter folder, and back.

A peft LoRA folder is ``adapter_config.json`` (peft's own format) plus
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (and DoRA's
``...lora_magnitude_vector``). The variants travel as peft's own settings: ``use_dora``,
``use_rslora``, and ``rank_pattern`` / ``alpha_pattern`` keyed by exact module names. peftmm
injects LoRA with peft itself, under the adapter name ``default``, and names its tensors
``<tower>.<module>.lora_A.default.weight`` relative to the tower's transformers model, so the
conversion is a renaming; the module names are read from the tensors, never re-resolved from
patterns, so both sides act on exactly the same layers.

An export names its base as ``AutoPeftModel.from_pretrained(folder)`` resolves it: the tower's
upstream Hub id (a zoo name's ``hub_id``, or the hub id the recipe named), or the local folder
given as ``base_path`` (``--base-path``); ``auto_mapping`` names the tower's transformers class.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from .backbones import TOWERS, load_tower
from .bundle import WEIGHTS, bundle_config, config_path, read_config, read_tensors, save_bundle
from .card import hub_base, model_card
from .errors import BundleError
from .io import atomic_directory
from .methods import METHODS
from .methods.base import PLAIN_NAME  # what recipe targets read as a suffix, not a regex
from .methods.lora import lora_layout
from .model import MultimodalModel
from .recipe import from_dict
from .safe_load import load_json, short_repr

PEFT_PREFIX = "base_model.model."
_BUNDLE_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>A|B|magnitude_vector)\.default\.weight")
_PEFT_KEY = re.compile(re.escape(PEFT_PREFIX) + r"(?P<module>.+)\.lora_(?:(?P<ab>[AB])\.weight|magnitude_vector)")
_PEFT_PART = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude_vector": "lora_magnitude_vector"}
# peft settings peftmm follows (or that only say how the folder was made); any other setting
# that differs from peft's default changes what the adapter computes, so an import refuses it.
_UNDERSTOOD = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
               "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
               "layers_to_transform", "layers_pattern", "megatron_core", "qalora_group_size", "eva_config",
               "use_dora", "use_rslora", "rank_pattern", "alpha_pattern"}
_PLAIN_INITS = (True, False, "gaussian", "eva")  # initialisations that leave the base weights alone


def export_peft(bundle_path, tower: str, out_dir, overwrite: bool = False, allow_partial: bool = False,
                base_path: str | None = None) -> Path:
    """Write ``tower``'s LoRA as a folder ``peft.PeftModel.from_pretrained`` loads onto that backbone
    (and ``AutoPeftModel.from_pretrained`` alone, finding the base by Hub id or ``base_path``)."""
    from peft import LoraConfig
    from safetensors.torch import save as save_tensors

    bundle_path, out_dir = Path(bundle_path), Path(out_dir)
    _check_tower(tower, bundle_path)
    _check_free(out_dir, overwrite)
    config, tensors = read_config(bundle_path), read_tensors(bundle_path)
    methods = config["recipe"][tower]["methods"]
    lora = next((m for m in methods if m.get("type") == "lora"), None)
    if lora is None:
        raise BundleError(f"the {tower} tower has no LoRA to export (its methods: "
                          f"{', '.join(m.get('type', '?') for m in methods) or 'none'})", str(bundle_path))
    others = [m["type"] for m in methods if m is not lora]
    if others and not allow_partial:
        raise BundleError(f"the {tower} tower also has {', '.join(others)}: a peft LoRA folder carries only "
                          "the LoRA part, so outputs would differ from peftmm's; pass allow_partial=True "
                          "(--allow-partial) to export the LoRA part anyway", str(bundle_path))
    out_tensors, ranks = {}, {}
    for key, tensor in tensors.items():
        match = _BUNDLE_KEY.fullmatch(key[len(tower) + 1:]) if key.startswith(f"{tower}.") else None
        if match:
            module = match["module"]
            # A module wrapped by a bottleneck adapter has its LoRA on the layer inside it
            # (methods/lora.py); in the plain backbone that layer has the adapter's name.
            if module.endswith(".base_layer") and any(k.startswith(f"{tower}.{module[:-11]}.peftmm_adapter.")
                                                      for k in tensors):
                module = module[:-11]
            out_tensors[f"{PEFT_PREFIX}{module}.{_PEFT_PART[match['ab']]}"] = tensor.contiguous()
            if match["ab"] == "A":
                ranks[module] = tensor.shape[0]
    info = config["towers"][tower]
    if base_path is not None and not Path(base_path).is_dir():
        raise BundleError(f"--base-path {base_path}: no such folder (the {tower} backbone, saved with "
                          "save_pretrained)", str(bundle_path))
    base = str(Path(base_path).absolute()) if base_path is not None else hub_base(info["backbone"]) or info["backbone"]
    spec = config["recipe"][tower]
    probe = load_tower(tower, spec["backbone"], spec.get("precision", "fp32"))
    model_class = type(probe.model)
    settings = METHODS.config(lora, f"{tower}.methods", str(config_path(bundle_path)))
    # the recipe's patterns, resolved in the plain backbone as LoRA resolved them in the tower
    _, rank_of, alpha_of = lora_layout(probe, settings)
    del probe
    wrong = [f"{m} (rank {r}, the config says {rank_of.get(m, settings.r)})" for m, r in sorted(ranks.items())
             if r != rank_of.get(m, settings.r)]
    if wrong:
        raise BundleError(f"the {tower} LoRA tensors do not have the ranks its config gives: {_few(wrong)}",
                          str(bundle_path))
    modules = sorted(ranks)
    alpha = settings.alpha
    peft_config = LoraConfig(r=settings.r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                             lora_dropout=settings.dropout, target_modules=modules, bias="none", task_type=None,
                             use_dora=settings.use_dora, use_rslora=settings.use_rslora,
                             rank_pattern={re.escape(m): r for m, r in rank_of.items() if m in ranks},
                             alpha_pattern={re.escape(m): a for m, a in alpha_of.items() if m in ranks},
                             base_model_name_or_path=base, inference_mode=True)
    # what AutoPeftModel instantiates the base with (peft writes it only for models it wrapped itself)
    peft_config.auto_mapping = {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        peft_config.save_pretrained(str(tmp))
        (tmp / WEIGHTS).write_bytes(save_tensors(out_tensors, metadata={"format": "pt"}))
        (tmp / "README.md").write_text(
            f"# LoRA of the {tower} tower of peftmm bundle `{config['name']}`\n\n"
            f"For `{info['backbone']}` ({info['model_type']}, weights `{info['fingerprint'][:16]}`), which peftmm "
            f"loaded at {info['precision']}: load it the same way, then `PeftModel.from_pretrained(model, folder)`."
            + (f" Only the LoRA part: the tower also has {', '.join(others)}.\n" if others else "\n"))
    return out_dir


def import_peft(peft_dir, bundle_path, tower: str, out_dir, overwrite: bool = False) -> Path:
    """Write a new bundle: ``bundle_path`` with ``tower``'s LoRA replaced (or added) by a peft one."""
    peft_dir, bundle_path, out_dir = Path(peft_dir), Path(bundle_path), Path(out_dir)
    _check_tower(tower, bundle_path)
    _check_free(out_dir, overwrite)
    peft = _read_peft_config(peft_dir)
    pairs = _read_peft_tensors(peft_dir)
    config, old = read_config(bundle_path), read_tensors(bundle_path)
    data = copy.deepcopy(config["recipe"])
    spec = data[tower]

    # The plain backbone tells which layers exist; a task model's adapter (e.g. for
    # LlamaForCausalLM) names them below its base_model_prefix ("model."), which is dropped.
    probe = load_tower(tower, spec["backbone"], spec.get("precision", "fp32"))
    known = probe.module_names()
    prefix = getattr(probe.model, "base_model_prefix", "") + "."
    # peft matched rank_pattern / alpha_pattern against the names as the adapter has them
    rank_of = {m: _pattern_value(peft.get("rank_pattern"), m, peft["r"]) for m in pairs}
    alpha_of = {m: float(_pattern_value(peft.get("alpha_pattern"), m, peft["lora_alpha"])) for m in pairs}
    if not set(pairs) <= set(known) and all(m.startswith(prefix) and m[len(prefix):] in known for m in pairs):
        pairs, rank_of, alpha_of = ({m[len(prefix):]: v for m, v in d.items()} for d in (pairs, rank_of, alpha_of))
    missing = sorted(set(pairs) - set(known))
    if missing:
        raise BundleError(f"the peft adapter has LoRA on {len(missing)} module(s) the {tower} backbone "
                          f"{spec['backbone']!r} does not have as Linear/Conv2d layers: {_few(missing)}", str(peft_dir))
    # Exact names: a plain name where it matches nothing else as a suffix, else an escaped regex.
    target = {m: m if PLAIN_NAME.match(m) and not any(n.endswith("." + m) for n in known) else re.escape(m)
              for m in sorted(pairs)}
    del probe
    dora = bool(peft.get("use_dora"))
    odd = [m for m, parts in pairs.items() if ("magnitude_vector" in parts) != dora]
    if odd:
        raise BundleError(f"use_dora is {str(dora).lower()} but {_few(odd)} {'lack' if dora else 'carry'} "
                          "lora_magnitude_vector tensors", str(peft_dir))

    lora = {"type": "lora", "r": peft["r"], "alpha": float(peft["lora_alpha"]),
            "dropout": float(peft.get("lora_dropout", 0.0)), "targets": list(target.values()),
            "use_dora": dora, "use_rslora": bool(peft.get("use_rslora")),
            "rank_pattern": {target[m]: r for m, r in rank_of.items() if r != peft["r"]},
            "alpha_pattern": {target[m]: a for m, a in alpha_of.items() if a != float(peft["lora_alpha"])}}
    methods = spec["methods"]  # the LoRA entry is replaced in place, or added last
    at = next((i for i, m in enumerate(methods) if m.get("type") == "lora"), len(methods))
    methods[at:at + 1] = [lora]
    recipe = from_dict(data, source=str(config_path(bundle_path)))
    model = MultimodalModel.build(recipe, config["labels"])
    for name, built in model.towers.items():
        if built.info.fingerprint != config["towers"][name]["fingerprint"]:
            raise BundleError(f"the {name} backbone {built.info.source!r} is no longer the weights this bundle "
                              "was trained on (fingerprint changed)", str(bundle_path))

    expected = model.trainable_state_dict()
    state = {k: v for k, v in old.items()
             if not (k.startswith(f"{tower}.") and re.search(r"\.lora_(A|B|magnitude_vector)\.", k))}
    for module, ab in pairs.items():
        for part, tensor in ab.items():
            # a module under a bottleneck adapter holds its LoRA on the layer inside (methods/lora.py)
            key = next((k for k in (f"{tower}.{module}.lora_{part}.default.weight",
                                    f"{tower}.{module}.base_layer.lora_{part}.default.weight") if k in expected), None)
            if key is None:
                raise BundleError(f"{module} takes no LoRA in this bundle's {tower} tower", str(peft_dir))
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise BundleError(f"{module}.lora_{part} has shape {tuple(tensor.shape)}, the {tower} backbone "
                                  f"needs {tuple(expected[key].shape)} at r = {rank_of[module]}", str(peft_dir))
            state[key] = tensor
    model.load_trainable_state_dict(state, where=str(bundle_path / WEIGHTS))

    # The old metrics measured the replaced LoRA, so they go; the config says where this came from.
    metrics = {"imported_from_peft": {"tower": tower, "peft_dir": str(peft_dir.resolve()),
                                      "base_model_name_or_path": peft.get("base_model_name_or_path"),
                                      "source_bundle": str(bundle_path.resolve()), "modules": len(pairs)}}
    tensors, saved = model.export(recipe)
    card = model_card(bundle_config(model, saved, {}), tensors) + (
        f"\n## Imported\n\nThe {tower} tower's LoRA ({len(pairs)} modules, r = {peft['r']}) was imported from the "
        f"peft adapter `{peft_dir.name}`; the rest comes from bundle `{config['name']}`. Not evaluated since.\n")
    return save_bundle(model, recipe, out_dir, metrics=metrics, overwrite=overwrite, card=card)


def _check_tower(tower: str, where: Path) -> None:
    if tower not in TOWERS:
        raise BundleError(f"no tower named {tower!r}; a bundle has the towers {', '.join(TOWERS)}", str(where))


def _check_free(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise BundleError("already exists; choose another output or overwrite it (--force)", str(out_dir))


def _read_peft_config(peft_dir: Path) -> dict:
    from peft import LoraConfig

    path = peft_dir / "adapter_config.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError("not a peft adapter folder: adapter_config.json is missing", str(peft_dir)) from None
    peft = load_json(raw, str(peft_dir), BundleError, "adapter_config.json is not valid JSON")
    if not isinstance(peft, dict) or peft.get("peft_type") != "LORA":
        kind = peft.get("peft_type") if isinstance(peft, dict) else None
        raise BundleError(f"peft_type is {kind!r}: only LORA adapters can be imported", str(path))
    if not isinstance(peft.get("r"), int) or not isinstance(peft.get("lora_alpha"), (int, float)):
        raise BundleError("r and lora_alpha must be numbers", str(path))
    for key, kind, what in (("rank_pattern", int, "ranks"), ("alpha_pattern", (int, float), "numbers")):
        pattern = peft.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and isinstance(v, kind)
                                                    and not isinstance(v, bool) and v > 0 for k, v in pattern.items()):
            raise BundleError(f"{key} must map module patterns to {what} > 0, got {short_repr(pattern)}", str(path))
    defaults = json.loads(json.dumps(LoraConfig().to_dict(), default=str))
    for key, value in peft.items():
        if key == "init_lora_weights":
            if value not in _PLAIN_INITS:
                raise BundleError(f"init_lora_weights = {value!r} is not supported: that initialisation changes "
                                  "the base weights, so this adapter needs a modified backbone", str(path))
        elif key not in _UNDERSTOOD and value != defaults.get(key) and (key in defaults or value):
            raise BundleError(f"{key} = {json.dumps(value)} is not supported: peftmm imports plain LoRA "
                              "(r, lora_alpha, lora_dropout on Linear/Conv2d layers) only", str(path))
    return peft


def _read_peft_tensors(peft_dir: Path) -> dict[str, dict]:
    """{module: {"A": tensor, "B": tensor}} from adapter_model.safetensors (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = peft_dir / WEIGHTS
    if not path.is_file():
        bins = "adapter_model.bin exists, but " if (peft_dir / "adapter_model.bin").exists() else ""
        raise BundleError(f"{WEIGHTS} is missing; {bins}only safetensors is read (a .bin is a pickle "
                          "that can run code); re-save the adapter with safe_serialization=True", str(peft_dir))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{WEIGHTS} is corrupt or truncated ({e})", str(peft_dir)) from None
    pairs: dict[str, dict] = {}
    strange = []
    for key, tensor in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if match:
            pairs.setdefault(match["module"], {})[match["ab"] or "magnitude_vector"] = tensor
        else:
            strange.append(key)
    strange += [f"{m} (no lora_{'B' if 'A' in ab else 'A'})" for m, ab in pairs.items() if not {"A", "B"} <= set(ab)]
    if strange or not pairs:
        raise BundleError(f"tensors that are not plain LoRA pairs: {_few(strange) if strange else 'no LoRA tensors'}",
                          str(path))
    return pairs


def _pattern_value(pattern, module: str, default):
    """What peft's rank_pattern / alpha_pattern gives ``module`` (peft's own matching rule)."""
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    key = get_pattern_key(list(pattern), module)
    return pattern.get(key, default)


def _few(items: list[str]) -> str:
    return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
