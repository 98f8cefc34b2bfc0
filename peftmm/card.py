"""Model cards for bundles: Hugging Face front matter plus what was trained and measured.

The front matter is what the Hub reads: ``base_model`` as Hub ids (a zoo name becomes its
upstream model's id, zoo.hub_id; a local folder, or a zoo model with no Hub model, is left
out), ``base_model_relation: adapter``, ``datasets`` as Hub ids where the data has one (a
``data.source: hf`` Hub data set), and ``model-index`` with the measured test metrics.
"""

from __future__ import annotations

import os

import yaml

from .hub_bundles import REPO_ID
from .tasks import TASKS
from .tasks.base import MEMORY
from .zoo import hub_id, is_zoo_name

_DATASETS = {
    "easy-vqa": "easy-vqa (PyPI easy-vqa 1.0, MIT)",
    # A bundle trained on the emoji renders carries their licence and attribution (CC BY-SA 4.0).
    "emoji": ("emoji: OpenMoji 17.0 renders with Unicode emoji names and groups. All emojis designed by "
              "OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0 "
              "(https://creativecommons.org/licenses/by-sa/4.0/)"),
    "files": "the user's own image/text files",
    "llava": "the user's own conversations about images (LLaVA JSON)",
    "messages": "the user's own conversations about images (chat messages JSONL)",
}


def model_card(config: dict, tensors: dict, training: dict | None = None) -> str:
    """The README of a bundle. ``training`` (see :func:`curve_summary`) adds a training-curve section."""
    recipe = config["recipe"]
    metrics = config.get("metrics", {})
    task = TASKS.get(config["task"], "task")
    front = front_matter(config)
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
    trained = {k: t for k, t in tensors.items() if k.split(".", 1)[0] != MEMORY}
    n = sum(t.numel() for t in trained.values())
    lines += ["", "## Training", "", f"- fusion: `{recipe['fusion']['type']}`",
              f"- data: {_DATASETS.get(recipe['data']['source'], recipe['data']['source'])}",
              f"- trainable tensors saved: {len(trained)} ({n:,} parameters)",
              f"- epochs {recipe['train']['epochs']}, batch size {recipe['train']['batch_size']}, "
              f"lr {recipe['train']['lr']}, seed {recipe['train']['seed']}", ""]
    memory = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".", 1)[0] == MEMORY}
    described = task.describe_memory(recipe["task"], memory) if memory else None
    if described:   # captioning's caption memory, retrieval's pair memory
        lines[-1:] = [f"- {described}", ""]
    if isinstance(config.get("merge"), dict):   # peftmm merge: what went in, and how
        lines += merge_lines(config["merge"])
    if training and training.get("epochs"):
        metric = training["metric"]
        curve = ", ".join(f"{v:.4f}" for v in training["values"])
        lines += ["## Training curve", "",
                  f"- epochs run: {training['epochs']}",
                  f"- best {metric}: {training['best']:.4f} at epoch {training['best_epoch']}",
                  f"- {metric} per epoch: {curve}"]
        if training.get("final_loss") is not None:
            lines.append(f"- last training loss: {training['final_loss']:.4f}")
        lines.append("")
    if metrics:
        lines += ["## Measured", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in metrics.items() if not isinstance(v, (dict, list))]
        lines.append("")
    arguments = task.predict_arguments(recipe["task"])
    lines += ["## Use", "", "```bash", f"peftmm predict {config['name']} --image IMAGE{arguments}", "```", ""]
    return "\n".join(lines)


def merge_lines(merge: dict) -> list[str]:
    """The card's section on a merged bundle: its sources with their weights, and the method."""
    density = f", density {merge['density']}" if merge.get("density") is not None else ""
    seed = f", seed {merge['seed']}" if merge.get("seed") is not None else ""
    lines = ["## Merged", "", f"Made by `peftmm merge --method {merge.get('method')}`{density}{seed} from:", "",
             "| bundle | weight | weights sha256 |", "|---|---|---|"]
    for source, weight in zip(merge.get("sources", []), merge.get("weights", [])):
        lines.append(f"| {source.get('name')} | {weight} | `{str(source.get('weights_sha256'))[:16]}` |")
    return lines + [""]


def front_matter(config: dict) -> dict:
    """The Hugging Face front matter of a bundle's card (see the module docstring)."""
    recipe = config["recipe"]
    metrics = config.get("metrics", {})
    task = TASKS.get(config["task"], "task")
    front = {"library_name": "peftmm"}
    if task.pipeline_tag:
        front["pipeline_tag"] = task.pipeline_tag
    bases = list(dict.fromkeys(b for b in (hub_base(t["backbone"]) for t in config["towers"].values()) if b))
    if bases:
        front |= {"base_model": bases, "base_model_relation": "adapter"}
    dataset = hub_dataset(recipe["data"])
    front |= {
        "tags": ["peftmm", "multimodal", config["task"], *sorted({m["type"] for t in ("vision", "text")
                                                                  for m in recipe[t]["methods"]})],
        **({"datasets": [dataset]} if dataset else {}),
        # Hugging Face metric ids ("accuracy"), not the split-prefixed keys of the Measured table
        "metrics": sorted({k.split("_", 1)[1] for k, v in metrics.items()  # not counts (test_images)
                           if k.startswith(("test_", "val_")) and not k.endswith("_loss") and isinstance(v, float)}),
        "license": "apache-2.0",
    }
    index = model_index(config, task.pipeline_tag, dataset)
    if index:
        front["model-index"] = index
    return front


def with_front_matter(card: str, config: dict) -> str:
    """``card`` with its front matter written afresh from ``config`` (the rest kept): what
    ``peftmm push`` uploads, so a card written by an older peftmm names Hub ids too."""
    body = card.split("---", 2)[2].lstrip("\n") if card.startswith("---") and card.count("---") >= 2 else card
    return "\n".join(["---", yaml.safe_dump(front_matter(config), sort_keys=False).strip(), "---", "", body])


def hub_base(backbone: str) -> str | None:
    """A tower's backbone as a Hub model id, or None (a local folder, a zoo model with no Hub model)."""
    if is_zoo_name(backbone):
        return hub_id(backbone)
    if os.path.isabs(backbone) or backbone.startswith(".") or not REPO_ID.fullmatch(backbone):
        return None
    return backbone


def hub_dataset(data: dict) -> str | None:
    """The data set's Hub id: only a ``data.source: hf`` Hub data set has one."""
    path = data.get("path")
    if data.get("source") != "hf" or not isinstance(path, str) or os.path.isabs(path) or not REPO_ID.fullmatch(path):
        return None
    return path


def model_index(config: dict, pipeline_tag: str | None, dataset: str | None) -> list[dict] | None:
    """The Hub's ``model-index``: the test metrics, on the data set they were measured on."""
    metrics = config.get("metrics", {})
    measured = [{"type": k.split("_", 1)[1], "name": f"test {k.split('_', 1)[1]}", "value": round(v, 6)}
                for k, v in metrics.items()
                if k.startswith("test_") and not k.endswith("_loss") and isinstance(v, float)]
    if not measured:
        return None
    source = config["recipe"]["data"].get("source", "data")
    return [{"name": config["name"],
             "results": [{"task": {"type": pipeline_tag or config["task"], "name": config["task"]},
                          "dataset": {"name": dataset or source, "type": dataset or source, "split": "test"},
                          "metrics": measured}]}]


def curve_summary(records: list[dict], metric: str | None = None) -> dict | None:
    """Summarise a run's ``metrics.jsonl`` records: a validation metric per epoch and its best.

    ``metric`` is the task's primary metric (``accuracy``); by default the first validation
    metric logged. Returns None when the records hold no validation entry.
    """
    evals = [r for r in records if isinstance(r, dict) and "epoch" in r
             and any(k.startswith("val_") and k != "val_loss" for k in r)]
    if not evals:
        return None
    metric = f"val_{metric}" if metric else next(k for k in evals[0] if k.startswith("val_") and k != "val_loss")
    evals = [r for r in evals if isinstance(r.get(metric), (int, float))]
    if not evals:
        return None
    best = max(evals, key=lambda r: r[metric])
    losses = [r["loss"] for r in records if isinstance(r, dict) and "step" in r
              and isinstance(r.get("loss"), (int, float))]
    return {"metric": metric, "epochs": len(evals), "values": [r[metric] for r in evals],
            "best": best[metric], "best_epoch": best["epoch"], "final_loss": losses[-1] if losses else None}
