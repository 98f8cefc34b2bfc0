"""Train several recipes on the same data and epochs and compare them side by side.

    .venv/bin/python bench/compare_methods.py                      # the five method recipes + default
    .venv/bin/python bench/compare_methods.py recipes/easy-vqa-prefix.yaml --set train.epochs=1
    .venv/bin/python bench/compare_methods.py --render             # redraw table and chart from the JSON

Each recipe runs in its own process (`peftmm train`), one after another, so timings are not
mixed. Writes bench/results/methods.json, methods.md (the docs/results.md table) and methods.png.
Each row keeps its task's reported test metrics (bench/task_metrics.py: accuracy for VQA; exact
match, token F1 and out-of-vocabulary answers for instruct), its primary one compared across rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_metrics import metric_name, primary, reported, show  # noqa: E402

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
    task = methods["task"]["type"]
    return {
        "recipe": recipe.stem, "task": task, "metric": f"test_{primary(task)}",
        "vision_methods": "+".join(m["type"] for m in methods["vision"]["methods"]) or "frozen",
        "text_methods": "+".join(m["type"] for m in methods["text"]["methods"]) or "frozen",
        "trainable_params": metrics["trainable_params"], "trainable_share": metrics["trainable_share"],
        "adapter_bytes": (bundle / "adapter_model.safetensors").stat().st_size,
        **reported(task, metrics), **reported(task, metrics, "val"),
        "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1), "best_epoch": metrics["best_epoch"],
        "steps": metrics["steps"],
    }


def _metric(row: dict) -> str:
    return row.get("metric", "test_accuracy")   # rows written before the key existed: VQA accuracy


def _score(row: dict, others: list[str]) -> str:
    """The primary test metric, named when the rows do not all share it, and the task's other ones."""
    key = _metric(row)
    text = show(key, row[key]) if not others else f"{metric_name(key)} {show(key, row[key])}"
    extra = [f"{metric_name(k)} {show(k, v)}" for k, v in row.items() if k.startswith("test_") and k != key]
    return text + (f" ({', '.join(extra)})" if extra else "")


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["recipe"].endswith("-full")), None)
    mixed = sorted({_metric(r) for r in rows} - {"test_accuracy"})
    score = "test metric" if mixed else "test acc."
    lines = [f"| recipe | vision | text | trainable params | share | adapter bytes | {score} | vs full | train loop "
             "| whole run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = full is not None and _metric(full) == _metric(r)
        delta = f"{100 * (r[_metric(r)] - full[_metric(r)]):+.2f} pt" if same else "n/a"
        lines.append(f"| {r['recipe']} | {r['vision_methods']} | {r['text_methods']} | {r['trainable_params']:,} | "
                     f"{100 * r['trainable_share']:.3f}% | {r['adapter_bytes']:,} | {_score(r, mixed)} | "
                     f"{delta} | {r['train_seconds']:.0f} s | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    names = [r["recipe"].replace("easy-vqa-", "") for r in rows]
    metrics = sorted({_metric(r) for r in rows})
    scores = [100 * r[_metric(r)] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, values, label in [(axes[0], scores, f"test {' / '.join(metric_name(m) for m in metrics)} (%)"),
                              (axes[1], [100 * r["trainable_share"] for r in rows], "trainable share (%, log)"),
                              (axes[2], [r["train_seconds"] for r in rows], "training time (s)")]:
        ax.bar(names, values, color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylim(max(min(scores) - 1, 0), 100)
    axes[1].set_yscale("log")
    save_figure(fig, path)


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
