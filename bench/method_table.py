"""The method table: each method and LoRA variant on tasks where methods differ, over seeds.

    .venv/bin/python bench/method_table.py                          # bench/method_table.yaml, seeds 0 1 2
    .venv/bin/python bench/method_table.py --tasks emoji-group --methods lora dora --seeds 0
    .venv/bin/python bench/method_table.py --epochs 1 --max-train-samples 256    # smaller than the spec's sizes
    .venv/bin/python bench/method_table.py --check                  # parse every run's recipe, train nothing
    .venv/bin/python bench/method_table.py --render                 # redraw the chart from the JSON

The tasks and methods are data (bench/method_table.yaml): per task a recipe, the tower the
methods go into, the run size (``size:``, e.g. fewer epochs than the recipe: the table's caption
says so), and each method as the list that replaces that tower's ``methods`` (plus any further
``--set`` it needs). Every run is ``peftmm train RECIPE --set ... --set train.seed=S``
in its own process, one after another; the process's wall time and its peak resident memory
(the kernel's high-water mark for it, from wait4) are measured around it.

Resumable: a run whose RUNS/<task>/<method>-s<seed>/result.json exists is read, not trained
again; a run that was killed after a checkpoint continues with ``peftmm train --resume``. The
run size (the spec's, or --epochs, --max-train-samples, --max-eval-samples for every task) picks
its own runs folder, so a reduced table never mixes with a full one, and is recorded per run
(``differs_from_recipe``) and in the table's caption. Tasks can be trained by separate calls
(``--tasks``, at the same time): each call writes the table of every finished run of the spec.
Writes bench/results/method_table.json and method_table.png; the docs block is
bench/readme_tables.py's ``method-table`` (rendered by bench/method_tables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emoji_tasks import final_metrics, recipe_differences, rel  # noqa: E402

from peftmm.errors import PeftmmError  # noqa: E402
from peftmm.io import atomic_write_text  # noqa: E402
from peftmm.safe_load import load_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SPEC = ROOT / "bench" / "method_table.yaml"
TASK_KEYS = {"recipe", "tower", "metrics", "methods"}   # and optionally size
# a task's run size (``size:``): the recipe keys it sets, and the tag each takes in the runs folder's name
SIZE_KEYS = {"epochs": ("train.epochs", "epochs"), "max_train_samples": ("data.max_train_samples", "train"),
             "max_eval_samples": ("data.max_eval_samples", "eval")}
METHOD_KEYS = {"methods", "set"}
NAME = re.compile(r"[a-z0-9][a-z0-9+-]*")   # task and method names become folder names
AGGREGATED = ("trainable_params", "trainable_share", "adapter_bytes", "train_seconds", "wall_seconds",
              "peak_rss_bytes")


class SpecError(PeftmmError):
    """A method-table spec (bench/method_table.yaml) that does not validate."""


# -- the spec ---------------------------------------------------------------------------------
def load_spec(path: Path = SPEC) -> dict:
    data = load_yaml(path.read_text(), str(path), SpecError)
    validate_spec(data, str(path))
    return data


def _keys(value, allowed: set[str], required: set[str], key: str, where: str) -> None:
    if not isinstance(value, dict):
        raise SpecError(f"{key}: must be a mapping with {', '.join(sorted(allowed))}, got {type(value).__name__}",
                        where)
    if set(value) - allowed:
        raise SpecError(f"{key}: unknown key(s) {', '.join(sorted(set(value) - allowed))}; "
                        f"allowed: {', '.join(sorted(allowed))}", where)
    if required - set(value):
        raise SpecError(f"{key}: missing {', '.join(sorted(required - set(value)))}", where)


def _overrides(items, key: str, where: str) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(s, str) and "=" in s for s in items):
        raise SpecError(f"{key}: must be a list of KEY=VALUE recipe overrides, got {items!r}", where)
    return items


def validate_spec(data, where: str) -> None:
    """The structure of the spec, each key checked; the recipes the runs make are checked by
    ``check_recipes`` (that needs peftmm's recipe parser and the methods it knows)."""
    _keys(data, {"tasks", "soups"}, {"tasks"}, "the spec", where)
    if not isinstance(data["tasks"], dict) or not data["tasks"]:
        raise SpecError("tasks: must map task names to {recipe, tower, metrics, methods}", where)
    for name, task in data["tasks"].items():
        key = f"tasks.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise SpecError(f"{key}: a task name is lower-case letters, digits, '-' and '+'", where)
        _keys(task, TASK_KEYS | {"size"}, TASK_KEYS, key, where)
        _keys(task.get("size", {}), set(SIZE_KEYS), set(), f"{key}.size", where)
        for size_key, value in task.get("size", {}).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"{key}.size.{size_key}: must be a whole number >= 1, got {value!r}", where)
        if not isinstance(task["recipe"], str) or not (ROOT / task["recipe"]).is_file():
            raise SpecError(f"{key}.recipe: no recipe file {task['recipe']!r} (paths are relative to the "
                            "repository root)", where)
        if task["tower"] not in ("vision", "text"):
            raise SpecError(f"{key}.tower: must be vision or text, got {task['tower']!r}", where)
        if not isinstance(task["metrics"], list) or not task["metrics"] or \
                not all(isinstance(m, str) for m in task["metrics"]):
            raise SpecError(f"{key}.metrics: must be a non-empty list of test metric names", where)
        if not isinstance(task["methods"], dict) or not task["methods"]:
            raise SpecError(f"{key}.methods: must map method names to {{methods: [...], set: [...]}}", where)
        for method_name, method in task["methods"].items():
            mkey = f"{key}.methods.{method_name}"
            if not isinstance(method_name, str) or not NAME.fullmatch(method_name):
                raise SpecError(f"{mkey}: a method name is lower-case letters, digits, '-' and '+'", where)
            _keys(method, METHOD_KEYS, {"methods"}, mkey, where)
            if not isinstance(method["methods"], list) or \
                    not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in method["methods"]):
                raise SpecError(f"{mkey}.methods: must be a list of {{type: ..., ...}} ([] leaves the tower "
                                "frozen)", where)
            for item in _overrides(method.get("set", []), f"{mkey}.set", where):
                if item.split("=", 1)[0].strip() == f"{task['tower']}.methods":
                    raise SpecError(f"{mkey}.set: {item.split('=', 1)[0]} is what `methods:` sets", where)


def method_overrides(task: dict, method: dict) -> list[str]:
    """The recipe overrides of one method: JSON is YAML, so the list goes through ``--set`` whole."""
    return [f"{task['tower']}.methods={json.dumps(method['methods'])}", *method.get("set", [])]


def method_keys(task: dict, method: dict) -> set[str]:
    """The recipe keys the method itself sets (a row differs from its recipe there by design)."""
    return {f"{task['tower']}.methods"} | {item.split("=", 1)[0].strip() for item in method.get("set", [])}


def run_size(task: dict, given: dict) -> list[str]:
    """The run-size overrides of one task: its spec's ``size:``, each key replaced where the
    command line gives one (``given``: SIZE_KEYS to a number or None)."""
    size = {**task.get("size", {}), **{k: v for k, v in given.items() if v}}
    return [f"{recipe_key}={size[k]}" for k, (recipe_key, _) in SIZE_KEYS.items() if size.get(k)]


def size_tag(size: list[str]) -> str:
    """The runs folder of one run size: ``recipe`` for the recipes as written."""
    tags = {recipe_key: tag for recipe_key, tag in SIZE_KEYS.values()}
    return "-".join(tags[s.split("=")[0]] + s.split("=")[1] for s in size) or "recipe"


def runs_folder(given: str | None, size: list[str]) -> Path:
    """Where a task's runs live: --runs-dir, else one folder per run size, so a reduced run never
    mixes with a full one."""
    return Path(given or RESULTS / "runs" / "method-table" / size_tag(size)).resolve()


def selected(spec: dict, tasks: list[str] | None, methods: list[str] | None) -> list[tuple[str, str]]:
    """(task, method) pairs in the spec's order; names that are not in the spec are an error."""
    known_tasks, known_methods = set(spec["tasks"]), {m for t in spec["tasks"].values() for m in t["methods"]}
    for given, known, what in ((tasks, known_tasks, "--tasks"), (methods, known_methods, "--methods")):
        if given and set(given) - known:
            raise SpecError(f"{what}: unknown {', '.join(sorted(set(given) - known))}; the spec has "
                            f"{', '.join(sorted(known))}")
    return [(t, m) for t, task in spec["tasks"].items() if not tasks or t in tasks
            for m in task["methods"] if not methods or m in methods]


def check_recipes(spec: dict, pairs, given: dict) -> list[str]:
    """Every run's recipe through peftmm's own parser (unknown methods and options fail here,
    before hours of training): the errors, one line each."""
    from peftmm.recipe import load

    errors = []
    for t, m in pairs:
        task = spec["tasks"][t]
        try:
            load(ROOT / task["recipe"], [*method_overrides(task, task["methods"][m]), *run_size(task, given)])
        except PeftmmError as error:
            errors.append(f"{t} / {m}: {error}")
    return errors


# -- one run ----------------------------------------------------------------------------------
def run_path(runs_dir: Path, task: str, method: str, seed: int) -> Path:
    return runs_dir / task / f"{method}-s{seed}"


def train(recipe: Path, overrides: list[str], run_dir: Path, resume: bool) -> dict | None:
    """``peftmm train`` in its own process; its wall time and peak RSS, or None when it failed."""
    cmd = [sys.executable, "-m", "peftmm", "train", "--no-progress"]
    cmd += ["--resume", str(run_dir)] if resume else [str(recipe), "--output", str(run_dir)]
    if not resume:
        for item in overrides:
            cmd += ["--set", item]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:   # stderr can be long (warnings): a file, not memory
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)   # the child's own rusage: its max RSS
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (run_dir / "train.log").read_text()[-2000:]
        print(f"{run_dir} failed (exit {code}):\n{tail}", file=sys.stderr, flush=True)
        return None
    # ru_maxrss is KiB on Linux. A resumed run's peak and time cover only the part after the resume.
    measured = {"wall_seconds": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "resumed": resume}
    atomic_write_text(run_dir / "bench_run.json", json.dumps({**measured, "command": cmd[1:]}) + "\n")
    return measured


def collect(run_dir: Path, task_name: str, method_name: str, seed: int, task: dict, overrides: list[str]) -> dict:
    """The row of one finished run (its ``final`` metrics, bundle and measurements)."""
    final = final_metrics(run_dir)
    measured = json.loads((run_dir / "bench_run.json").read_text())
    recipe = ROOT / task["recipe"]
    differs = recipe_differences(run_dir, recipe, seed)
    own = method_keys(task, task["methods"][method_name])
    return {
        "task": task_name, "method": method_name, "seed": seed, "run_dir": rel(run_dir), "recipe": task["recipe"],
        "overrides": overrides, "test": {k[5:]: v for k, v in final.items() if k.startswith("test_")},
        "trainable_params": final["trainable_params"], "total_params": final["total_params"],
        "trainable_share": final["trainable_share"],
        "adapter_bytes": (run_dir / "bundle" / "adapter_model.safetensors").stat().st_size,
        "train_seconds": final["train_seconds"], "steps": final.get("steps"), "best_epoch": final.get("best_epoch"),
        "wall_seconds": measured["wall_seconds"], "peak_rss_bytes": measured["peak_rss_bytes"],
        "resumed": measured["resumed"],
        # everything the run's recipe has that the recipe file (at this seed) has not, and of it
        # what the method does not set itself: the run-size options, shown in the caption
        "differs_from_recipe": differs, "beyond_method": {k: v for k, v in differs.items() if k not in own},
    }


def run_one(runs_dir: Path, spec: dict, t: str, m: str, seed: int, size: list[str]) -> dict | None:
    """The row of one (task, method, seed): read when its result.json exists, else trained (or
    continued from its checkpoint) and collected. None when training failed."""
    task = spec["tasks"][t]
    overrides = [*method_overrides(task, task["methods"][m]), *size, f"train.seed={seed}"]
    run_dir = run_path(runs_dir, t, m, seed)
    result, request = run_dir / "result.json", run_dir / "bench_request.json"
    for path in (result, request):   # a run of other settings in this folder is never reused
        if path.is_file() and json.loads(path.read_text())["overrides"] != overrides:
            raise SpecError(f"was made with {json.loads(path.read_text())['overrides']}, this run asks for "
                            f"{overrides}: delete {rel(run_dir)} or give another --runs-dir", rel(path))
    if result.is_file():
        return json.loads(result.read_text())
    if final_metrics(run_dir) is None or not (run_dir / "bench_run.json").is_file():
        resume = (run_dir / "checkpoints" / "latest.json").is_file() and request.is_file()
        if not resume and request.is_file():   # an earlier try of this very run that failed early: start over
            shutil.rmtree(run_dir)
        elif not resume and run_dir.exists() and any(run_dir.iterdir()):
            raise SpecError("holds files that are not a run of this script; delete it to train again", rel(run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(request, json.dumps({"overrides": overrides}) + "\n")
        print(f"training {t} / {m} / seed {seed}{' (resumed)' if resume else ''} ...", file=sys.stderr, flush=True)
        if train(ROOT / task["recipe"], overrides, run_dir, resume) is None:
            return None
    row = collect(run_dir, t, m, seed, task, overrides)
    atomic_write_text(result, json.dumps(row, indent=2) + "\n")
    return row


# -- the table --------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(rows: list[dict], spec: dict) -> list[dict]:
    """Mean and sample std over seeds per (task, method), in the spec's order (std null with one seed)."""
    out = []
    for t, task in spec["tasks"].items():
        for m, method in task["methods"].items():
            runs = sorted((r for r in rows if r["task"] == t and r["method"] == m), key=lambda r: r["seed"])
            if not runs:
                continue
            values: dict[str, list[float]] = {}
            for r in runs:
                for k, v in [*r["test"].items(), *((k, r[k]) for k in AGGREGATED)]:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        values.setdefault(k, []).append(float(v))
            beyond = [r["beyond_method"] for r in runs]
            if any(b != beyond[0] for b in beyond):
                raise SpecError(f"{t} / {m}: the seeds' runs differ from the recipe in different ways: {beyond}")
            out.append({"task": t, "method": m, "recipe": task["recipe"], "tower": task["tower"],
                        "methods": method["methods"], "set": method.get("set", []), "beyond_method": beyond[0],
                        "seeds": [r["seed"] for r in runs], "resumed": any(r["resumed"] for r in runs),
                        "metrics": {k: _stats(v) for k, v in values.items()}})
    return out


def chart(data: dict, path: Path) -> None:
    """Per task: the first metric's mean ± std over seeds, and the trainable share (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    tasks = [t for t in data["tasks"] if any(a["task"] == t for a in data["aggregates"])]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)), squeeze=False)
    for (left, right), t in zip(axes, tasks):
        rows = [a for a in data["aggregates"] if a["task"] == t]
        names, metric = [a["method"] for a in rows], data["tasks"][t]["metrics"][0]
        means = [100 * a["metrics"].get(metric, {}).get("mean", float("nan")) for a in rows]
        stds = [a["metrics"].get(metric, {}).get("std") for a in rows]
        # error bars only where there are two seeds or more (NaN draws none: one seed has no spread)
        spread = any(s is not None for s in stds)
        left.bar(names, means, yerr=[100 * s if s is not None else float("nan") for s in stds] if spread else None,
                 capsize=3, color="tab:blue")
        left.set_title(f"{t}: test {metric.replace('_', ' ')} (%), mean ± std over seeds", fontsize=10)
        shares = [100 * a["metrics"]["trainable_share"]["mean"] for a in rows]
        right.bar(names, shares, color="tab:orange")
        wide = max(shares) > 10 * min(shares) > 0   # full fine-tuning next to adapters: a log scale
        if wide:
            right.set_yscale("log")
        right.set_title(f"{t}: trainable share (%{', log' if wide else ''})", fontsize=10)
        for ax in (left, right):
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    save_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(SPEC), help="tasks and methods (YAML)")
    parser.add_argument("--tasks", nargs="+", help="only these tasks of the spec")
    parser.add_argument("--methods", nargs="+", help="only these methods of the spec")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="train.epochs of every run (default: the spec's size, "
                        "else the recipe's)")
    parser.add_argument("--max-train-samples", type=int, help="data.max_train_samples of every run")
    parser.add_argument("--max-eval-samples", type=int, help="data.max_eval_samples of every run")
    parser.add_argument("--runs-dir", help="where run dirs live (default bench/results/runs/method-table/<size>)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for method_table.json and .png")
    parser.add_argument("--check", action="store_true", help="only parse every selected run's recipe")
    parser.add_argument("--render", action="store_true", help="only redraw the chart from the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    json_path, png_path = out / "method_table.json", out / "method_table.png"
    try:
        if args.render:
            chart(json.loads(json_path.read_text()), png_path)
            return
        spec_path = Path(args.spec).resolve()
        spec = load_spec(spec_path)
        pairs = selected(spec, args.tasks, args.methods)
        given = {"epochs": args.epochs, "max_train_samples": args.max_train_samples,
                 "max_eval_samples": args.max_eval_samples}
        errors = check_recipes(spec, pairs, given)
        if errors or args.check:
            print("\n".join(errors) or f"{len(pairs)} method recipes parse", file=sys.stderr)
            sys.exit(1 if errors else 0)
        sizes = {t: run_size(task, given) for t, task in spec["tasks"].items()}
        folders = {t: runs_folder(args.runs_dir, sizes[t]) for t in spec["tasks"]}
        failed = []
        for t, m in pairs:
            for seed in args.seeds:
                if run_one(folders[t], spec, t, m, seed, sizes[t]) is None:
                    failed.append(f"{t}/{m}/s{seed}")
        # the table holds every finished run of the spec at its size, not only this call's
        rows = [json.loads(p.read_text()) for t, m in selected(spec, None, None)
                for p in sorted((folders[t] / t).glob(f"{m}-s*/result.json"))
                if re.fullmatch(rf"{re.escape(m)}-s\d+", p.parent.name)]
    except PeftmmError as error:
        sys.exit(f"error: {error}")
    data = {"spec": rel(spec_path),
            "tasks": {t: {**{k: task[k] for k in ("recipe", "tower", "metrics")}, "size": sizes[t],
                          "runs_dir": rel(folders[t])} for t, task in spec["tasks"].items()},
            "runs": rows, "aggregates": aggregate(rows, spec)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
    chart(data, png_path)
    for a in data["aggregates"]:
        shown = {k: round(a["metrics"][k]["mean"], 4) for k in spec["tasks"][a["task"]]["metrics"] if k in a["metrics"]}
        print(f"{a['task']:16} {a['method']:18} seeds {a['seeds']} {shown}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
