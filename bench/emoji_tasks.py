"""Train the emoji recipes over several seeds, collect their test numbers, and chart them.

    .venv/bin/python bench/emoji_tasks.py                          # 4 recipes x seeds 0 1 2, + the chain
    .venv/bin/python bench/emoji_tasks.py --recipes recipes/emoji-group.yaml --seeds 0
    .venv/bin/python bench/emoji_tasks.py --collect                # only read finished run dirs
    .venv/bin/python bench/emoji_tasks.py --render                 # only redraw the chart from the JSON

Each combination runs ``peftmm train RECIPE --set train.seed=S --output RUNS/<recipe>-s<S>`` in its
own process, one after another (timings are not mixed); a run directory that already holds a
finished run (its ``final`` metrics and bundle) is collected, not trained again, so runs can be
produced elsewhere (same command, same folder) and gathered here. A chain ``RECIPE:FROM`` trains
RECIPE with ``init_from`` the bundle of FROM's run of the same seed, into
RUNS/<recipe>-from-<from>-s<S>; the plain RECIPE runs are its from-scratch counterpart.

Per run: test metrics (every ``test_`` number of the run: for instruct recipes exact_match,
token_f1, out_of_vocabulary, answered), trainable parameters and share, bundle bytes, train-loop seconds and the
whole ``peftmm train`` process's wall time (measured here and kept in the run dir as
bench_wall.json; a run trained elsewhere has none, its train-loop time stands in and is marked).
Retrieval bundles also classify the test images into their Unicode groups zero-shot, through the
computation of ``peftmm predict --labels`` (Predictor.classify) batched over images.

Writes bench/results/emoji_tasks.json (runs + mean/std over seeds per recipe) and emoji_tasks.png;
bench/readme_tables.py renders the docs/results.md block from it and emoji_baselines.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_RECIPES = ["emoji-retrieval-projection", "emoji-retrieval-locked-text", "emoji-retrieval-memory",
                   "emoji-retrieval", "emoji-retrieval-adapters", "emoji-caption-plain",
                   "emoji-caption-greedy", "emoji-caption", "emoji-group", "emoji-group-subgroups",
                   "emoji-group-image-text"]
# Image-text alignment first (retrieval with vision adapters), then group classification
# starting from those vision adapters (recipes/emoji-group-chain.yaml is the same chain as a recipe).
DEFAULT_CHAINS = ["emoji-group:emoji-retrieval-adapters"]
TEMPLATE = "an emoji of {}"
RECENT_S = 600  # a metrics.jsonl written this recently may be a run still in progress elsewhere


def recipe_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else ROOT / "recipes" / f"{name}.yaml"


def rel(path) -> str | None:
    """A path as the JSON keeps it: relative to the repository when inside it (no machine paths)."""
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_name(stem: str, seed: int, chain_from: str | None = None) -> str:
    return f"{stem}-from-{chain_from}-s{seed}" if chain_from else f"{stem}-s{seed}"


def final_metrics(run_dir: Path) -> dict | None:
    """The run's ``final`` record, when the run finished (bundle written too)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or not (run_dir / "bundle" / "adapter_model.safetensors").is_file():
        return None
    for line in reversed(metrics.read_text().splitlines()):
        if line.startswith('{"final"'):
            return json.loads(line)["final"]
    return None


def train(recipe: Path, seed: int, overrides: list[str], run_dir: Path, init_from: Path | None) -> bool:
    cmd = [sys.executable, "-m", "peftmm", "train", str(recipe), "--output", str(run_dir), "--no-progress",
           "--set", f"train.seed={seed}"]
    for item in overrides + ([f"init_from={init_from}"] if init_from else []):
        cmd += ["--set", item]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:   # stderr can be long (warnings): a file, not memory
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-2000:]
        print(f"{run_dir.name} failed (exit {result.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return False
    (run_dir / "bench_wall.json").write_text(json.dumps({"wall_seconds": round(wall, 1), "command": cmd}) + "\n")
    return True


def _flatten(data, prefix="") -> dict:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def recipe_differences(run_dir: Path, recipe: Path, seed: int) -> dict:
    """Values of the run's recipe.yaml that differ from RECIPE at this seed (init_from aside):
    a run with overrides is not a run of the recipe, and the docs leave it out. Both sides go
    through the recipe parser, so settings added later with their defaults do not count as
    differences; neither does ``name``, which only labels the run."""
    import yaml

    from peftmm.recipe import from_dict, load

    ran = _flatten(from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text())).to_dict())
    expected = _flatten(load(recipe, [f"train.seed={seed}"]).to_dict())
    return {k: ran.get(k) for k in sorted(set(ran) | set(expected))
            if k not in ("init_from", "name") and ran.get(k) != expected.get(k)}


def zero_shot(run_dir: Path, template: str, batch_images: int = 32) -> dict:
    """Accuracy and macro-F1 of the test images' Unicode groups, one prompt per group.

    Exactly Predictor.classify's computation, batched: every (image, prompt) pair goes through
    the Batcher (each distinct image and prompt encoded once) and the model; an image's scores
    are its image half against the prompts' text halves. Cached in the run dir per template.
    """
    cache = run_dir / "zero_shot.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if template in done:
        return done[template]
    import torch

    from peftmm.data import load_splits
    from peftmm.predict import Predictor
    from peftmm.tasks.labels import macro_f1
    from peftmm.tasks.retrieval import split_embeddings
    from peftmm.tensors import to_device

    predictor = Predictor.load(run_dir, device="cpu")
    splits = load_splits(predictor.recipe.data)
    test = splits.test
    groups = sorted({e["group"] for split in (splits.train, splits.val, test) for e in split})
    prompts = [template.format(g) for g in groups]
    predicted = []
    with torch.no_grad():
        for start in range(0, len(test), batch_images):
            chunk = test[start: start + batch_images]
            pairs = [{"image": str(e["image"]), "text": p} for e in chunk for p in prompts]
            batch = to_device(predictor.batcher(pairs), predictor.device)
            images, texts = split_embeddings(predictor.model(batch).float())
            images = images.view(len(chunk), len(prompts), -1)[:, 0]
            texts = texts.view(len(chunk), len(prompts), -1)
            predicted += [predictor.model.task.logits(images[i: i + 1], texts[i])[0].argmax().item()
                          for i in range(len(chunk))]
    # Guard that the batching changes nothing: the first images one by one through classify.
    for e, p in zip(test[:3], predicted):
        if predictor.classify(e["image"], groups, template)["answer"] != groups[p]:
            raise SystemExit(f"{run_dir.name}: batched zero-shot disagrees with Predictor.classify on {e['image']}")
    targets = torch.tensor([groups.index(e["group"]) for e in test])
    predicted = torch.tensor(predicted)
    result = {"accuracy": (predicted == targets).float().mean().item(),
              "macro_f1": macro_f1(predicted, targets, len(groups)), "images": len(test), "labels": groups}
    cache.write_text(json.dumps(done | {template: result}, indent=2) + "\n")
    return result


def collect(run_dir: Path, recipe: Path, seed: int, chain_from: str | None, template: str) -> dict | None:
    final = final_metrics(run_dir)
    if final is None:
        return None
    import yaml

    ran = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    wall_file = run_dir / "bench_wall.json"
    wall = json.loads(wall_file.read_text())["wall_seconds"] if wall_file.is_file() else None
    row = {
        "label": f"{recipe.stem} <- {chain_from}" if chain_from else recipe.stem,
        "recipe": recipe.stem, "seed": seed, "run_dir": rel(run_dir),
        "task": ran["task"]["type"], "init_from": rel(ran.get("init_from")), "chain_from": chain_from,
        "test": {k[5:]: v for k, v in final.items() if k.startswith("test_")},
        "best_epoch": final.get("best_epoch"), "steps": final.get("steps"),
        "trainable_params": final["trainable_params"], "total_params": final["total_params"],
        "trainable_share": final["trainable_share"],
        "adapter_bytes": (run_dir / "bundle" / "adapter_model.safetensors").stat().st_size,
        "train_seconds": final["train_seconds"],
        # No wall time measured around the process: the train loop's own time stands in, marked.
        "wall_seconds": wall if wall is not None else final["train_seconds"],
        "wall_measured": wall is not None,
        "differs_from_recipe": recipe_differences(run_dir, recipe, seed),
    }
    if row["task"] == "classification":   # a fixed prompt: the image alone decides (tasks/classification.py)
        row["reads"] = "image" if ran["task"].get("prompt") is not None else "image and text"
    if row["task"] == "retrieval":
        row["zero_shot"] = {"template": template, **zero_shot(run_dir, template)}
    return row


AGGREGATED = ("trainable_params", "trainable_share", "adapter_bytes", "train_seconds", "wall_seconds")


def aggregate(rows: list[dict]) -> dict:
    """Mean and sample std over seeds per label (std null with one seed); runs that differ from
    their recipe are grouped apart and flagged, so they never mix with true recipe runs."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["label"] + (" (modified)" if r["differs_from_recipe"] else "")
        groups.setdefault(key, []).append(r)
    out = {}
    for key, runs in groups.items():
        values: dict[str, list[float]] = {}
        for r in runs:
            items = [(f"test_{k}", v) for k, v in r["test"].items()] + [(k, r[k]) for k in AGGREGATED]
            items += [(f"zero_shot_{k}", r["zero_shot"][k]) for k in ("accuracy", "macro_f1") if "zero_shot" in r]
            for k, v in items:
                if isinstance(v, (int, float)):
                    values.setdefault(k, []).append(float(v))
        out[key] = {"label": runs[0]["label"], "recipe": runs[0]["recipe"], "task": runs[0]["task"],
                    "chain_from": runs[0]["chain_from"], "reads": runs[0].get("reads"),
                    "as_recipe": not runs[0]["differs_from_recipe"],
                    "seeds": sorted(r["seed"] for r in runs), "wall_measured": all(r["wall_measured"] for r in runs),
                    "metrics": {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                                    "n": len(v)} for k, v in values.items()}}
    return out


def _order(a: dict) -> tuple:
    return (DEFAULT_RECIPES.index(a["recipe"]) if a["recipe"] in DEFAULT_RECIPES else 99, a["chain_from"] or "",
            a["label"], not a["as_recipe"])


def chart(data: dict, baselines: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    agg = data["aggregates"]
    panels = [("retrieval", "retrieval: mean of R@1/5/10, both ways (%)", "test_mean_recall"),
              ("captioning", "captioning: unigram F1 (%)", "test_unigram_f1"),
              ("classification", "group classification: test accuracy (%)", "test_accuracy")]
    if any(a["task"] == "instruct" for a in agg.values()):   # generated answers, scored as task_metrics.py says
        panels.append(("instruct", "instruct: exact match (%)", "test_exact_match"))
    fig, axes = plt.subplots(1, len(panels), figsize=(14 / 3 * len(panels), 4.2))
    for ax, (task, title, key) in zip(axes, panels):
        bars = []  # (name, mean, std, colour)
        for a in sorted(agg.values(), key=_order):
            m, name = a["metrics"], a["label"] + ("" if a["as_recipe"] else "\n(modified)")
            if a["task"] == task and key in m:
                bars.append((name, m[key]["mean"], m[key]["std"], "tab:blue"))
            if task == "classification" and "zero_shot_accuracy" in m:
                zs = m["zero_shot_accuracy"]
                bars.append((f"zero-shot\n{name}", zs["mean"], zs["std"], "tab:cyan"))
        if baselines and task == "retrieval":
            chance = baselines["retrieval_chance"]
            bars.append(("chance", sum(v for k, v in chance.items() if "_r" in k) / 6, None, "tab:gray"))
        if baselines and task == "captioning":
            nn = baselines["nearest_neighbour_captioning"]
            bars += [("nearest\nneighbour", nn["unigram_f1"], None, "tab:gray"),
                     ("best train\ncaption (oracle)", nn["oracle_best_train_caption_unigram_f1"], None, "lightgray")]
        if baselines and task == "classification":
            bars += [("majority", baselines["majority_class"]["accuracy"], None, "tab:gray"),
                     ("linear probe", baselines["linear_probe"]["accuracy"], None, "tab:gray")]
        names = [b[0].replace(" <- ", "\n<- ") for b in bars]
        ax.bar(names, [100 * b[1] for b in bars], color=[b[3] for b in bars])
        spread = [(n, 100 * b[1], 100 * b[2]) for n, b in zip(names, bars) if b[2] is not None]
        if spread:  # std over seeds, where there are two or more
            ax.errorbar([x[0] for x in spread], [x[1] for x in spread], yerr=[x[2] for x in spread], fmt="none",
                        ecolor="black", capsize=3)
        ax.set_title(title, fontsize=10)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", help=f"recipe files or names (default: {' '.join(DEFAULT_RECIPES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--chains", nargs="*", help="RECIPE:FROM pairs (default with default recipes: "
                                                    f"{' '.join(DEFAULT_CHAINS)}; none with --recipes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    parser.add_argument("--template", default=TEMPLATE, help="zero-shot prompt, {} = the group name")
    parser.add_argument("--runs-dir", default=str(RESULTS / "runs" / "emoji"), help="where run dirs live")
    parser.add_argument("--out", default=str(RESULTS), help="folder for emoji_tasks.json and .png")
    parser.add_argument("--baselines", default=str(RESULTS / "emoji_baselines.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads here (zero-shot evaluation)")
    parser.add_argument("--collect", action="store_true", help="only collect finished run dirs, never train")
    parser.add_argument("--render", action="store_true", help="only redraw the chart from the JSON")
    args = parser.parse_args()
    out, runs_dir = Path(args.out), Path(args.runs_dir).resolve()
    json_path, png_path = out / "emoji_tasks.json", out / "emoji_tasks.png"
    baselines = json.loads(Path(args.baselines).read_text()) if Path(args.baselines).is_file() else None
    if args.render:
        chart(json.loads(json_path.read_text()), baselines, png_path)
        return
    import torch

    torch.set_num_threads(args.threads)
    recipes = [recipe_path(r) for r in (args.recipes or DEFAULT_RECIPES)]
    chains = args.chains if args.chains is not None else ([] if args.recipes else DEFAULT_CHAINS)
    combos = [(r, s, None) for r in recipes for s in args.seeds]
    combos += [(recipe_path(c.split(":")[0]), s, recipe_path(c.split(":")[1]).stem) for c in chains for s in args.seeds]

    rows, failed = [], []
    for recipe, seed, chain_from in combos:
        run_dir = runs_dir / run_name(recipe.stem, seed, chain_from)
        if not args.collect and final_metrics(run_dir) is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and time.time() - metrics.stat().st_mtime < RECENT_S:
                print(f"{run_dir.name}: written to in the last {RECENT_S} s, maybe running elsewhere; skipped",
                      file=sys.stderr)
                continue
            init_from = None
            if chain_from:
                init_from = runs_dir / run_name(chain_from, seed) / "bundle"
                if final_metrics(init_from.parent) is None:
                    print(f"{run_dir.name}: {init_from.parent.name} has not finished; skipped", file=sys.stderr)
                    continue
            print(f"training {run_dir.name} ...", file=sys.stderr, flush=True)
            if not train(recipe, seed, args.overrides, run_dir, init_from):
                failed.append(run_dir.name)
                continue
        row = collect(run_dir, recipe, seed, chain_from, args.template)
        if row is None:
            print(f"{run_dir.name}: no finished run", file=sys.stderr)
            continue
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("label", "seed", "test", "wall_seconds")}), file=sys.stderr, flush=True)

    # Keep rows of other combinations from an earlier JSON over the same runs dir.
    if json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous.get("runs_dir") == rel(runs_dir) and previous.get("template") == args.template:
            fresh = {(r["label"], r["seed"]) for r in rows}
            rows = [r for r in previous["runs"] if (r["label"], r["seed"]) not in fresh
                    and final_metrics(ROOT / r["run_dir"]) is not None] + rows
    rows.sort(key=lambda r: (r["label"], r["seed"]))
    data = {"runs_dir": rel(runs_dir), "template": args.template, "runs": rows, "aggregates": aggregate(rows)}
    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    chart(data, baselines, png_path)
    print(json.dumps({k: {m: round(v["mean"], 4) for m, v in a["metrics"].items() if m.startswith(("test_", "zero"))}
                      for k, a in data["aggregates"].items()}, indent=2))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
