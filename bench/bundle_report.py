"""Print a bundle's measured numbers as a markdown table: trainable share, accuracy, and the
adapter file's size next to the frozen backbones' weights.

    .venv/bin/python bench/bundle_report.py adapters/easy-vqa-lora [--main-log runs/main.log]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peftmm.backbones import resolve_source
from peftmm.bundle import WEIGHTS, read_config


def backbone_bytes(source: str) -> int:
    folder = Path(resolve_source(source))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    config = read_config(bundle)
    m = config["metrics"]
    adapter = (bundle / WEIGHTS).stat().st_size
    backbones = {name: backbone_bytes(t["backbone"]) for name, t in config["towers"].items()}
    rows = [
        ("trainable parameters", f"{m['trainable_params']:,} of {m['total_params']:,} ({100 * m['trainable_share']:.3f}%)"),
        ("easy-VQA test accuracy", f"{100 * m['test_accuracy']:.2f}%"),
        ("validation accuracy (best epoch)", f"{100 * m['val_accuracy']:.2f}% (epoch {m['best_epoch']})"),
        ("training time (train loop only)", f"{m['train_seconds']:.0f} s, {m['steps']} steps"),
        ("adapter file", f"{adapter:,} bytes"),
        *[(f"{name} backbone weights ({config['towers'][name]['backbone']}, fp32 safetensors)", f"{size:,} bytes")
          for name, size in backbones.items()],
        ("adapter / backbones", f"{100 * adapter / sum(backbones.values()):.2f}%"),
    ]
    print(f"| {config['name']} | measured |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
