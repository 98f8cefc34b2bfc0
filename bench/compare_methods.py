"""Train several recipes on the same data and epochs and compare them side by side.

    .venv/bin/python bench/compare_methods.py                      # the five method recipes + default
    .venv/bin/python bench/compare_methods.py recipes/easy-vqa-prefix.yaml --set train.epochs=1
    .venv/bin/python bench/compare_methods.py --render             # redraw table and chart from the JSON

Each recipe runs in its own process (`peftmm train`), one after another, so timings are not
mixed. Writes bench/results/methods.json, methods.md (the docs/results.md table) and methods.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["easy-vqa-full", "easy-vqa-fusion-only", "easy-vqa-lora", "easy-vqa-adapter", "easy-vqa-prefix",
           "easy-vqa-mix"]


def train_cli(recipe, overrides: list[str], out: Path, *args: str) -> tuple[dict, float]:
    """`peftmm train RECIPE --output OUT [args]` in its own process: its final metrics and wall time."""
    cmd = [sys.executable, "-m", "peftmm", "train", str(recipe), "--output", str(out), "--no-progress", *args]
    for item in overrides:
        cmd += ["--set", item]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout[result.stdout.index("{"):]), wall


def run(recipe: Path, overrides: list[str], out: Path) -> dict:
    metrics, wall = train_cli(recipe, overrides, out)
    bundle = Path(metrics["bundle"])
    methods = json.loads((out / "bundle" / "peftmm_config.json").read_text())["recipe"]
    return {
        "recipe": recipe.stem,
        "vision_methods": "+".join(m["type"] for m in methods["vision"]["methods"]) or "frozen",
        "text_methods": "+".join(m["type"] for m in methods["text"]["methods"]) or "frozen",
        "trainable_params": metrics["trainable_params"], "trainable_share": metrics["trainable_share"],
        "adapter_bytes": (bundle / "adapter_model.safetensors").stat().st_size,
        "test_accuracy": metrics["test_accuracy"], "val_accuracy": metrics["val_accuracy"],
        "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1), "best_epoch": metrics["best_epoch"],
        "steps": metrics["steps"],
    }


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["recipe"].endswith("-full")), None)
    lines = ["| recipe | vision | text | trainable params | share | adapter bytes | test acc. | vs full | "
             "train loop | whole run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r['test_accuracy'] - full['test_accuracy']):+.2f} pt" if full else "n/a"
        lines.append(f"| {r['recipe']} | {r['vision_methods']} | {r['text_methods']} | {r['trainable_params']:,} | "
                     f"{100 * r['trainable_share']:.3f}% | {r['adapter_bytes']:,} | {100 * r['test_accuracy']:.2f}% | "
                     f"{delta} | {r['train_seconds']:.0f} s | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["recipe"].replace("easy-vqa-", "") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label, scale in [(axes[0], "test_accuracy", "test accuracy (%)", 100),
                                  (axes[1], "trainable_share", "trainable share (%, log)", 100),
                                  (axes[2], "train_seconds", "training time (s)", 1)]:
        ax.bar(names, [r[key] * scale for r in rows], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylim(min(r["test_accuracy"] for r in rows) * 100 - 1, 100)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe files (default: the method comparison set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every recipe")
    parser.add_argument("--out", default=str(ROOT / "bench/results"), help="results folder")
    parser.add_argument("--render", action="store_true", help="only redraw methods.md/png from methods.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        rows = json.loads((out / "methods.json").read_text())["results"]
        (out / "methods.md").write_text(table(rows))
        chart(rows, out / "methods.png")
        print(table(rows))
        return
    recipes = [Path(r) for r in args.recipes] or [ROOT / "recipes" / f"{n}.yaml" for n in DEFAULT]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe in recipes:
        print(f"training {recipe.stem} ...", file=sys.stderr, flush=True)
        rows.append(run(recipe, args.overrides, out / "runs" / recipe.stem))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.recipes and (out / "methods.json").exists():  # rerun of some recipes: keep the others' rows
        previous = json.loads((out / "methods.json").read_text())
        if previous["overrides"] == args.overrides:
            fresh = {r["recipe"]: r for r in rows}
            rows = [fresh.pop(r["recipe"], r) for r in previous["results"]] + list(fresh.values())
    (out / "methods.json").write_text(json.dumps({"overrides": args.overrides, "results": rows}, indent=2))
    (out / "methods.md").write_text(table(rows))
    chart(rows, out / "methods.png")
    print(table(rows))


if __name__ == "__main__":
    main()
