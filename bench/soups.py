"""Model soups and merges across tasks, with `peftmm merge`, against the bundles merged.

    .venv/bin/python bench/soups.py                                 # bench/method_table.yaml's soups: section
    .venv/bin/python bench/soups.py --epochs 1 --max-train-samples 256   # over a reduced method table's runs

Seeds (issue 21, point 5): the seed bundles of one (task, method) of the method table,
``peftmm merge --method linear`` with equal weights, then ``peftmm eval`` of the soup and of each
seed on the same test split. Seeds the method table has not trained yet are trained first, by
bench/method_table.py's own runner into its runs folder (so the two scripts share runs).

Across tasks: two runs of recipes that differ in their data (trained here, same runner), merged
with TIES or DARE (``--method``, ``--density``, optional ``--weights``); the merged bundle and
both inputs are each evaluated on both runs' test splits. A bundle evaluated on the other run's
data goes through ``--eval-on``: exactly ``peftmm eval``'s computation (predict.evaluate_bundle),
with the data section of the other run's recipe.

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
SEED_KEYS, ACROSS_KEYS, RUN_KEYS = {"task", "method"}, {"name", "method", "density", "seed", "runs", "weights"}, \
    {"recipe", "set"}
MERGE_METHODS = ("ties", "dare_linear", "dare_ties", "linear")


def validate_soups(spec: dict, where: str) -> dict:
    """The ``soups:`` section: seed soups name (task, method) pairs of the spec's tasks; merges
    across tasks name two runs, a merge method and a density in (0, 1]."""
    soups = spec.get("soups")
    mt._keys(soups, {"seeds", "across_tasks"}, set(), "soups", where)
    for i, soup in enumerate(soups.get("seeds", [])):
        key = f"soups.seeds.{i}"
        mt._keys(soup, SEED_KEYS, SEED_KEYS, key, where)
        if soup["method"] not in spec["tasks"].get(soup["task"], {}).get("methods", {}):
            raise mt.SpecError(f"{key}: no method {soup['method']!r} in tasks.{soup['task']} of the spec", where)
    for i, merge in enumerate(soups.get("across_tasks", [])):
        key = f"soups.across_tasks.{i}"
        mt._keys(merge, ACROSS_KEYS, ACROSS_KEYS - {"weights"}, key, where)
        if not isinstance(merge["name"], str) or not mt.NAME.fullmatch(merge["name"]):
            raise mt.SpecError(f"{key}.name: lower-case letters, digits, '-' and '+'", where)
        if merge["method"] not in MERGE_METHODS:
            raise mt.SpecError(f"{key}.method: one of {', '.join(MERGE_METHODS)}, got {merge['method']!r}", where)
        if not isinstance(merge["density"], (int, float)) or not 0 < merge["density"] <= 1:
            raise mt.SpecError(f"{key}.density: must be in (0, 1], got {merge['density']!r}", where)
        if not isinstance(merge["runs"], dict) or len(merge["runs"]) != 2:
            raise mt.SpecError(f"{key}.runs: must name exactly two runs {{NAME: {{recipe, set}}}}", where)
        if "weights" in merge and (not isinstance(merge["weights"], list) or len(merge["weights"]) != 2):
            raise mt.SpecError(f"{key}.weights: one weight per run (two), got {merge['weights']!r}", where)
        for name, run in merge["runs"].items():
            mt._keys(run, RUN_KEYS, {"recipe"}, f"{key}.runs.{name}", where)
            if not mt.NAME.fullmatch(str(name)) or not (ROOT / run["recipe"]).is_file():
                raise mt.SpecError(f"{key}.runs.{name}: a lower-case name and an existing recipe file", where)
            mt._overrides(run.get("set", []), f"{key}.runs.{name}.set", where)
    return soups


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


def evaluate(bundle: Path, data_of: Path | None, cache: Path) -> dict:
    """Test metrics of ``bundle``: by ``peftmm eval``, or on the data of run dir ``data_of``; cached."""
    key = f"{rel(bundle)} on {rel(data_of) if data_of else 'its own data'}"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in done:
        cmd = [sys.executable, "-m", "peftmm", "eval", str(bundle), "--split", "test"] if data_of is None else \
            [sys.executable, str(Path(__file__).resolve()), "--eval-on", str(bundle), str(data_of)]
        done[key] = _json_of(cmd)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(done, indent=2) + "\n")
    return done[key]


def eval_on(bundle: str, run_dir: str) -> dict:
    """predict.evaluate_bundle with the data section of ``run_dir``'s recipe instead of the bundle's."""
    from peftmm.data import load_splits
    from peftmm.evaluation import evaluate as evaluate_examples
    from peftmm.predict import Predictor
    from peftmm.recipe import load

    predictor = Predictor.load(bundle)
    examples = load_splits(load(Path(run_dir) / "recipe.yaml").data)["test"]
    with predictor.precision():
        return evaluate_examples(predictor.model, examples, predictor.batcher, 256, predictor.device,
                                 progress=False, desc="test") | {"examples": len(examples)}


# -- the two kinds of merge -------------------------------------------------------------------
def seed_soup(spec: dict, soup: dict, seeds: list[int], runs_dir: Path, size: list[str]) -> dict:
    t, m = soup["task"], soup["method"]
    rows = [mt.run_one(runs_dir, spec, t, m, seed, size) for seed in seeds]
    if any(r is None for r in rows):
        raise PeftmmError(f"{t} / {m}: a seed's training failed; see its train.log under {rel(runs_dir)}")
    bundles = [ROOT / r["run_dir"] / "bundle" for r in rows]
    folder = runs_dir / "soups" / f"{t}-{m}-s{'-'.join(map(str, seeds))}"
    merged = merge(folder / "bundle", bundles, "linear")
    cache = folder / "evaluations.json"
    members = [{"seed": r["seed"], "bundle": r["run_dir"] + "/bundle", "test": evaluate(b, None, cache)}
               for r, b in zip(rows, bundles)]
    keys = spec["tasks"][t]["metrics"]
    return {"task": t, "method": m, "metrics": keys, "beyond_method": rows[0]["beyond_method"],
            "members": members, "merged": rel(merged), "soup": evaluate(merged, None, cache),
            "seed_mean": {k: statistics.fmean(s["test"][k] for s in members) for k in keys
                          if all(k in s["test"] for s in members)}}


def _train_named(runs_dir: Path, name: str, run: dict, seed: int, size: list[str]) -> Path:
    """A run of one recipe and overrides through the method table's runner (a task of one method)."""
    # the recipe's own vision methods, given back to it unchanged: the run differs by `set` only
    recipe = mt.load_yaml((ROOT / run["recipe"]).read_text(), run["recipe"], mt.SpecError)
    methods = (recipe.get("vision") or {}).get("methods", [])
    task = {"recipe": run["recipe"], "tower": "vision", "metrics": [],
            "methods": {"as-recipe": {"methods": methods, "set": run.get("set", [])}}}
    row = mt.run_one(runs_dir, {"tasks": {name: task}}, name, "as-recipe", seed, size)
    if row is None:
        raise PeftmmError(f"{name}: training failed; see its train.log under {rel(runs_dir / name)}")
    return ROOT / row["run_dir"]


def across_tasks(merge_spec: dict, runs_dir: Path, size: list[str], metrics: list[str]) -> dict:
    names = list(merge_spec["runs"])
    run_dirs = {n: _train_named(runs_dir, f"{merge_spec['name']}-{n}", merge_spec["runs"][n], merge_spec["seed"],
                                size) for n in names}
    folder = runs_dir / "soups" / f"{merge_spec['name']}-s{merge_spec['seed']}"
    merged = merge(folder / "bundle", [run_dirs[n] / "bundle" for n in names], merge_spec["method"],
                   merge_spec["density"], merge_spec.get("weights"))
    cache = folder / "evaluations.json"
    bundles = {**{n: run_dirs[n] / "bundle" for n in names}, f"merged ({merge_spec['method']})": merged}
    evaluations = {f"{n} test": {label: evaluate(b, run_dirs[n], cache) for label, b in bundles.items()}
                   for n in names}
    return {"name": merge_spec["name"], "method": merge_spec["method"], "density": merge_spec["density"],
            "weights": merge_spec.get("weights"), "seed": merge_spec["seed"], "tasks": names,
            "runs": {n: rel(d) for n, d in run_dirs.items()}, "merged": rel(merged), "metrics": metrics,
            "evaluations": evaluations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(mt.SPEC))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the seeds a soup averages")
    parser.add_argument("--epochs", type=int, help="train.epochs of every run (default: the recipe's)")
    parser.add_argument("--max-train-samples", type=int, help="data.max_train_samples of every run")
    parser.add_argument("--runs-dir", help="default: the method table's, bench/results/runs/method-table/<size>")
    parser.add_argument("--only", choices=["seeds", "across_tasks"], help="one kind of merge only")
    parser.add_argument("--metrics", nargs="+", default=["exact_match", "token_f1"],
                        help="metrics shown for the merges across tasks")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--eval-on", nargs=2, metavar=("BUNDLE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_on:   # the child that evaluates a bundle on another run's test split
        print(json.dumps(eval_on(*args.eval_on)))
        return
    try:
        spec_path = Path(args.spec).resolve()
        spec = mt.load_spec(spec_path)
        soups = validate_soups(spec, str(spec_path))
        size = mt.size_overrides(args.epochs, args.max_train_samples)
        runs_dir = Path(args.runs_dir or RESULTS / "runs" / "method-table" / mt.size_tag(size)).resolve()
        data = {"spec": rel(spec_path), "runs_dir": rel(runs_dir), "size": size, "seeds": [], "across_tasks": []}
        if args.only != "across_tasks":
            data["seeds"] = [seed_soup(spec, s, args.seeds, runs_dir, size) for s in soups.get("seeds", [])]
        if args.only != "seeds":
            data["across_tasks"] = [across_tasks(m, runs_dir, size, args.metrics)
                                    for m in soups.get("across_tasks", [])]
    except PeftmmError as error:
        sys.exit(f"error: {error}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "soups.json", json.dumps(data, indent=2) + "\n")
    print(json.dumps({s["task"] + "/" + s["method"]: {"soup": s["soup"], "seed_mean": s["seed_mean"]}
                      for s in data["seeds"]}, indent=2))


if __name__ == "__main__":
    main()
