"""Model cards for bundles: Hugging Face front matter plus what was trained and measured."""

from __future__ import annotations

import yaml

_DATASETS = {"easy-vqa": "easy-vqa (PyPI easy-vqa 1.0, MIT)"}


def model_card(config: dict, tensors: dict) -> str:
    recipe = config["recipe"]
    metrics = config.get("metrics", {})
    front = {
        "library_name": "peftmm",
        "base_model": [t["backbone"] for t in config["towers"].values()],
        "tags": ["peftmm", "multimodal", config["task"], *sorted({m["type"] for t in ("vision", "text")
                                                                  for m in recipe[t]["methods"]})],
        "datasets": [recipe["data"]["source"]],
        "metrics": sorted(k for k in metrics if k.startswith(("test_", "val_")) and not k.endswith("_loss")),
        "license": "apache-2.0",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {config['name']}", "",
             f"A peftmm adapter bundle for **{config['task']}**: only the small trained modules, "
             "to be loaded onto the frozen backbones below.", "", "## Backbones", "",
             "| tower | backbone | type | precision | methods | weight fingerprint |",
             "|---|---|---|---|---|---|"]
    for name, tower in config["towers"].items():
        methods = ", ".join(m["type"] for m in recipe[name]["methods"]) or "frozen"
        lines.append(f"| {name} | `{tower['backbone']}` | {tower['model_type']} | {tower['precision']} | "
                     f"{methods} | `{tower['fingerprint'][:16]}` |")
    n = sum(t.numel() for t in tensors.values())
    lines += ["", "## Training", "", f"- fusion: `{recipe['fusion']['type']}`",
              f"- data: {_DATASETS.get(recipe['data']['source'], recipe['data']['source'])}",
              f"- trainable tensors saved: {len(tensors)} ({n:,} parameters)",
              f"- epochs {recipe['train']['epochs']}, batch size {recipe['train']['batch_size']}, "
              f"lr {recipe['train']['lr']}, seed {recipe['train']['seed']}", ""]
    if metrics:
        lines += ["## Measured", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in metrics.items() if not isinstance(v, (dict, list))]
        lines.append("")
    lines += ["## Use", "", "```bash", f"peftmm predict {config['name']} --image IMAGE --question 'what shape is it?'",
              "```", ""]
    return "\n".join(lines)
