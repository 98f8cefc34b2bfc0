"""A bundle's measured numbers: trainable share, test metrics, and the adapter file's size next to the
frozen backbones' weights. Writes them as JSON for the README's default-recipe table
(bench/readme_tables.py renders it) and prints that table.

    .venv/bin/python bench/bundle_report.py adapters/easy-vqa-lora    # -> bench/results/default_bundle.json
    .venv/bin/python bench/bundle_report.py BUNDLE --out other.json
    .venv/bin/peftmm eval adapters/easy-vqa-instruct --full-split > full.json   # the whole test split
    .venv/bin/python bench/bundle_report.py adapters/easy-vqa-instruct --whole-split full.json \
        --out bench/results/instruct_bundle.json

``--whole-split`` records what ``peftmm eval --full-split`` printed for the bundle (a training run
may score only the first ``data.max_eval_samples`` test examples).

The test metrics are the task's (bench/task_metrics.py): accuracy for VQA; exact match, token F1,
out-of-vocabulary answers and answers generated for instruct.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from readme_tables import RESULTS, bundle_table
from task_metrics import reported

from peftmm.backbones import resolve_source
from peftmm.bundle import WEIGHTS, read_config
from peftmm.io import atomic_write_text

# with the task's reported test metrics and its primary validation metric (task_metrics.py)
KEYS = ("trainable_params", "total_params", "trainable_share", "best_epoch", "train_seconds", "steps")


def backbone_bytes(source: str) -> int:
    folder = Path(resolve_source(source))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def report(bundle: Path) -> dict:
    config = read_config(bundle)
    task, m = config["task"], config["metrics"]
    return {"bundle": bundle.name, "name": config["name"], "task": task, "source": config["recipe"]["data"]["source"],
            "metrics": {k: m[k] for k in KEYS} | reported(task, m) | reported(task, m, "val"),
            "test_examples": m.get("test_examples"),
            "adapter_bytes": (bundle / WEIGHTS).stat().st_size,
            "backbones": {name: {"source": t["backbone"], "bytes": backbone_bytes(t["backbone"])}
                          for name, t in config["towers"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--out", type=Path, default=RESULTS / "default_bundle.json")
    parser.add_argument("--whole-split", type=Path, help="JSON printed by `peftmm eval BUNDLE --full-split`")
    args = parser.parse_args()
    data = report(Path(args.bundle))
    if args.whole_split:
        printed = args.whole_split.read_text()
        data["whole_test_split"] = json.loads(printed[printed.index("{"):])
    atomic_write_text(args.out, json.dumps(data, indent=2) + "\n")
    print(bundle_table(data))


if __name__ == "__main__":
    main()
