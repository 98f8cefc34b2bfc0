"""Model soups and merges across tasks, with `peftmm merge`, against the bundles merged.

    .venv/bin/python bench/soups.py                                 # bench/method_table.yaml's soups: section
    .venv/bin/python bench/soups.py --epochs 1 --max-train-samples 256   # smaller than the spec's sizes

Seeds (issue 21, point 5): the seed bundles of one (task, method) of the method table,
``peftmm merge --method linear`` with equal weights, then ``peftmm eval`` of the soup and of each
seed on the same test split; ``merge: [linear, cat]`` adds a ``cat`` soup, the exact mean of the
seeds' LoRA updates (``linear`` combines the A's and the B's apart). Seeds trained from scratch
start from different random heads and adapters; a soup with ``start: {seed: N}`` averages runs
that share their start instead (as model soups do): each seed continues from seed N's bundle
(``init_from``) at the same size, so only the data order, augmentation and dropout differ
between them. Seeds the method table has not trained yet are trained first, by
bench/method_table.py's own runner into its runs folder at the task's size (so the two scripts
share runs).

Across tasks: two runs of different tasks that ``peftmm merge`` accepts together (trained here,
same runner), merged with TIES or DARE (``--method``, ``--density``, optional ``--weights``)
once with each bundle first. A merged bundle keeps its first source's recipe, so each order is
evaluated by ``peftmm eval`` on its first bundle's task, against that bundle alone.

Resumable: merged bundles and evaluations are kept under RUNS/soups/ and reused. Writes
bench/results/soups.json; the docs block is bench/readme_tables.py's ``soups``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import method_table as mt  # noqa: E402
from emoji_tasks import rel  # noqa: E402

from peftmm.errors import PeftmmError  # noqa: E402
from peftmm.io import atomic_write_text  # noqa: E402

ROOT, RESULTS = mt.ROOT, mt.RESULTS
SEED_KEYS, RUN_KEYS = {"task", "method"}, {"recipe", "tower", "methods", "set"}   # a seed soup may add start, merge
ACROSS_KEYS = {"name", "method", "density", "seed", "metrics", "runs", "weights", "size"}
MERGE_METHODS = ("ties", "dare_linear", "dare_ties", "linear")


def validate_soups(spec: dict, where: str) -> dict:
    """The ``soups:`` section: seed soups name (task, method) pairs of the spec's tasks; merges
    across tasks name two runs, a merge method and a density in (0, 1]."""
    soups = spec.get("soups")
    mt._keys(soups, {"seeds", "across_tasks"}, set(), "soups", where)
    for i, soup in enumerate(soups.get("seeds", [])):
        key = f"soups.seeds.{i}"
        mt._keys(soup, SEED_KEYS | {"start", "merge"}, SEED_KEYS, key, where)
        if not isinstance(soup.get("merge", []), list) or set(soup.get("merge", [])) - {"linear", "cat"}:
            raise mt.SpecError(f"{key}.merge: a list of linear and cat (the methods a soup needs no density "
                               f"for), got {soup['merge']!r}", where)
        if soup["method"] not in spec["tasks"].get(soup["task"], {}).get("methods", {}):
            raise mt.SpecError(f"{key}: no method {soup['method']!r} in tasks.{soup['task']} of the spec", where)
        if "start" in soup:
            mt._keys(soup["start"], {"seed"}, {"seed"}, f"{key}.start", where)
            if not isinstance(soup["start"]["seed"], int) or isinstance(soup["start"]["seed"], bool):
                raise mt.SpecError(f"{key}.start.seed: the seed whose bundle every run starts from, a whole "
                                   f"number, got {soup['start']['seed']!r}", where)
    for i, merge in enumerate(soups.get("across_tasks", [])):
        key = f"soups.across_tasks.{i}"
        mt._keys(merge, ACROSS_KEYS, ACROSS_KEYS - {"weights", "size"}, key, where)
        if not isinstance(merge["name"], str) or not mt.NAME.fullmatch(merge["name"]):
            raise mt.SpecError(f"{key}.name: lower-case letters, digits, '-' and '+'", where)
        if not isinstance(merge["seed"], int) or isinstance(merge["seed"], bool):
            raise mt.SpecError(f"{key}.seed: the seed of both runs, a whole number, got {merge['seed']!r}", where)
        if merge["method"] not in MERGE_METHODS:
            raise mt.SpecError(f"{key}.method: one of {', '.join(MERGE_METHODS)}, got {merge['method']!r}", where)
        if not isinstance(merge["density"], (int, float)) or not 0 < merge["density"] <= 1:
            raise mt.SpecError(f"{key}.density: must be in (0, 1], got {merge['density']!r}", where)
        if not isinstance(merge["runs"], dict) or len(merge["runs"]) != 2:
            raise mt.SpecError(f"{key}.runs: must name exactly two runs {{NAME: {{recipe, set}}}}", where)
        if "weights" in merge and (not isinstance(merge["weights"], list) or len(merge["weights"]) != 2):
            raise mt.SpecError(f"{key}.weights: one weight per run (two), got {merge['weights']!r}", where)
        # each run is a task of one method, checked as the method table checks its tasks
        mt.validate_spec({"tasks": _pair_tasks(merge)}, f"{where}: {key}")
    return soups


def _pair_tasks(merge: dict) -> dict:
    """The two runs of an ``across_tasks`` merge as method-table tasks (``NAME-RUN``) of one
    method each, ``as-given``, at the merge's size."""
    tasks = {}
    for name, run in merge["runs"].items():
        if not isinstance(run, dict):
            tasks[f"{merge['name']}-{name}"] = run   # validate_spec names it
            continue
        task = {k: run[k] for k in ("recipe", "tower") if k in run} | {"metrics": merge.get("metrics")}
        task |= {"size": merge["size"]} if "size" in merge else {}
        tasks[f"{merge['name']}-{name}"] = task | {
            "methods": {"as-given": {k: run[k] for k in ("methods", "set") if k in run}}}
    return tasks


# -- subprocesses: peftmm merge, peftmm eval, and eval on another run's data ---------------------
def _json_of(cmd: list[str]) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise PeftmmError(f"{' '.join(cmd[1:])} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout[result.stdout.index("{"):])


def merge(out: Path, bundles: list[Path], method: str, density: float | None = None,
          weights: list[float] | None = None) -> Path:
    """``peftmm merge OUT BUNDLE...``; an existing merged bundle is reused."""
    if not (out / "adapter_model.safetensors").is_file():
        cmd = [sys.executable, "-m", "peftmm", "merge", str(out), *map(str, bundles), "--method", method]
        cmd += ["--density", str(density)] if density is not None else []
        cmd += ["--weights", ",".join(map(str, weights))] if weights else []
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise PeftmmError(f"{' '.join(cmd[1:])} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return out


def evaluate(bundle: Path, cache: Path) -> dict:
    """``peftmm eval BUNDLE --split test``, cached in ``cache`` by the bundle's path."""
    key = rel(bundle)
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in done:
        done[key] = _json_of([sys.executable, "-m", "peftmm", "eval", str(bundle), "--split", "test"])
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(done, indent=2) + "\n")
    return done[key]


# -- the two kinds of merge -------------------------------------------------------------------
def _trained(runs_dir: Path, spec: dict, t: str, m: str, seed: int, size: list[str]) -> dict:
    row = mt.run_one(runs_dir, spec, t, m, seed, size)
    if row is None:
        raise PeftmmError(f"{t} / {m} / seed {seed}: training failed; see its train.log under {rel(runs_dir)}")
    return row


def _from_start(spec: dict, t: str, m: str, bundle: Path, start_seed: int) -> tuple[dict, str]:
    """The spec with method ``M-from-sN``: method M, every run starting from ``bundle``."""
    name = f"{m}-from-s{start_seed}"
    task = spec["tasks"][t]
    method = {**task["methods"][m], "set": [*task["methods"][m].get("set", []), f"init_from={bundle}"]}
    return {**spec, "tasks": {**spec["tasks"], t: {**task, "methods": {**task["methods"], name: method}}}}, name


def seed_soup(spec: dict, soup: dict, seeds: list[int], given: dict, runs_dir_given: str | None) -> dict:
    t, m = soup["task"], soup["method"]
    size = mt.run_size(spec["tasks"][t], given)
    runs_dir = mt.runs_folder(runs_dir_given, size)
    keys = spec["tasks"][t]["metrics"]
    start = None
    if "start" in soup:
        base = _trained(runs_dir, spec, t, m, soup["start"]["seed"], size)
        spec, m = _from_start(spec, t, m, ROOT / base["run_dir"] / "bundle", soup["start"]["seed"])
        start = {"seed": base["seed"], "bundle": base["run_dir"] + "/bundle"}
    rows = [_trained(runs_dir, spec, t, m, seed, size) for seed in seeds]
    bundles = [ROOT / r["run_dir"] / "bundle" for r in rows]
    folder = runs_dir / "soups" / f"{t}-{m}-s{'-'.join(map(str, seeds))}"
    merged = {how: merge(folder / ("bundle" if how == "linear" else f"bundle-{how}"), bundles, how)
              for how in soup.get("merge", ["linear"])}
    cache = folder / "evaluations.json"
    if start:
        start["test"] = evaluate(ROOT / start["bundle"], cache)
    members = [{"seed": r["seed"], "bundle": r["run_dir"] + "/bundle", "test": evaluate(b, cache)}
               for r, b in zip(rows, bundles)]
    return {"task": t, "method": soup["method"], "start": start, "metrics": keys,
            "beyond_method": rows[0]["beyond_method"],
            "members": members, "merged": {how: rel(path) for how, path in merged.items()},
            "soups": {how: evaluate(path, cache) for how, path in merged.items()},
            "seed_mean": {k: statistics.fmean(s["test"][k] for s in members) for k in keys
                          if all(k in s["test"] for s in members)}}


def _largest_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two bundles' tensors (same names required)."""
    from safetensors.torch import load_file

    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    if set(left) != set(right):
        raise PeftmmError(f"{rel(a)} and {rel(b)} hold different tensors: {sorted(set(left) ^ set(right))[:3]}")
    return max(((left[k].float() - right[k].float()).abs().max().item() for k in left if left[k].numel()),
               default=0.0)


def across_tasks(merge_spec: dict, given: dict, runs_dir_given: str | None) -> dict:
    """Merge two tasks' bundles, once with each first: a merged bundle keeps its first source's
    recipe, so each order is the merge as the task of its first bundle (its prompt, its data) and
    ``peftmm eval`` measures that task. The two orders' tensors are compared: with equal weights
    the combination does not depend on the order."""
    name, seed = merge_spec["name"], merge_spec["seed"]
    names = list(merge_spec["runs"])
    spec = {"tasks": _pair_tasks(merge_spec)}
    size = mt.run_size(spec["tasks"][f"{name}-{names[0]}"], given)
    runs_dir = mt.runs_folder(runs_dir_given, size)
    rows = {n: _trained(runs_dir, spec, f"{name}-{n}", "as-given", seed, size) for n in names}
    bundles = {n: ROOT / rows[n]["run_dir"] / "bundle" for n in names}
    folder = runs_dir / "soups" / f"{name}-s{seed}"
    cache = folder / "evaluations.json"
    merged, evaluations = {}, {}
    for n in names:
        order = [n, *(m for m in names if m != n)]
        weights = merge_spec.get("weights")
        merged[n] = merge(folder / f"{n}-first", [bundles[m] for m in order], merge_spec["method"],
                          merge_spec["density"], [weights[names.index(m)] for m in order] if weights else None)
        evaluations[f"{n} test"] = {f"{n} bundle": evaluate(bundles[n], cache),
                                    f"merged ({merge_spec['method']})": evaluate(merged[n], cache)}
    return {"name": name, "method": merge_spec["method"], "density": merge_spec["density"],
            "weights": merge_spec.get("weights"), "seed": seed, "tasks": names, "metrics": merge_spec["metrics"],
            "runs": {n: r["run_dir"] for n, r in rows.items()}, "merged": {n: rel(p) for n, p in merged.items()},
            "orders_largest_difference": _largest_difference(*merged.values()),
            "beyond_method": rows[names[0]]["beyond_method"], "evaluations": evaluations}


def chart(data: dict, path: Path) -> None:
    """One panel per merge (first metric, %): each seed, the seeds' mean and each soup; for a merge
    across tasks, each task's bundle against the merged one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    panels = []
    for soup in data["seeds"]:
        key = soup["metrics"][0]
        bars = ([("start", soup["start"]["test"][key])] if soup.get("start") else []) + \
            [(f"seed {m['seed']}", m["test"][key]) for m in soup["members"]] + \
            [("seed mean", soup["seed_mean"][key])] + [(f"soup {how}", v[key]) for how, v in soup["soups"].items()]
        start = f", from seed {soup['start']['seed']}" if soup.get("start") else ""
        panels.append((f"{soup['task']} / {soup['method']}{start}: {key}", bars))
    for merge in data["across_tasks"]:
        key = merge["metrics"][0]
        bars = [(f"{split.removesuffix(' test')}: {bundle.removesuffix(' bundle')}", metrics[key])
                for split, by_bundle in merge["evaluations"].items() for bundle, metrics in by_bundle.items()]
        panels.append((f"{merge['name']} ({merge['method']}): {key}", bars))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels):
        names = [n for n, _ in bars]
        colors = ["tab:orange" if n.startswith("soup") or "merged" in n else "tab:blue" for n in names]
        ax.bar(names, [100 * v for _, v in bars], color=colors)
        ax.set_title(title, fontsize=9)
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", fontsize=8)
    save_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(mt.SPEC))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the seeds a soup averages")
    parser.add_argument("--epochs", type=int, help="train.epochs of every run (default: the spec's size, "
                        "else the recipe's)")
    parser.add_argument("--max-train-samples", type=int, help="data.max_train_samples of every run")
    parser.add_argument("--max-eval-samples", type=int, help="data.max_eval_samples of every run")
    parser.add_argument("--runs-dir", help="default: the method table's, bench/results/runs/method-table/<size>")
    parser.add_argument("--only", choices=["seeds", "across_tasks"], help="one kind of merge only")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    try:
        spec_path = Path(args.spec).resolve()
        spec = mt.load_spec(spec_path)
        soups = validate_soups(spec, str(spec_path))
        given = {"epochs": args.epochs, "max_train_samples": args.max_train_samples,
                 "max_eval_samples": args.max_eval_samples}
        data = {"spec": rel(spec_path), "seeds": [], "across_tasks": []}
        if args.only != "across_tasks":
            data["seeds"] = [seed_soup(spec, s, args.seeds, given, args.runs_dir) for s in soups.get("seeds", [])]
        if args.only != "seeds":
            data["across_tasks"] = [across_tasks(m, given, args.runs_dir) for m in soups.get("across_tasks", [])]
    except PeftmmError as error:
        sys.exit(f"error: {error}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "soups.json", json.dumps(data, indent=2) + "\n")
    chart(data, out / "soups.png")
    print(json.dumps({s["task"] + "/" + s["method"]: {"soups": s["soups"], "seed_mean": s["seed_mean"]}
                      for s in data["seeds"]}, indent=2))


if __name__ == "__main__":
    main()
