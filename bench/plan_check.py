"""Check `peftmm plan --device cpu` against the memory a short real training run takes.

    .venv/bin/python bench/plan_check.py recipes/easy-vqa-fusion-only.yaml     # one recipe
    .venv/bin/python bench/plan_check.py                                        # every recipes/*.yaml
    .venv/bin/python bench/plan_check.py RECIPE --set train.batch_size=32        # with overrides
    .venv/bin/python bench/plan_check.py --estimate-only                       # estimator changed: no training

Per recipe, one process after another (so they do not share memory or cores):

1. `peftmm plan RECIPE --device cpu --json` gives the estimate: its total, and the same less the
   process baseline that the estimating process measured on itself.
2. `peftmm train RECIPE --set train.max_steps=3` runs in a child process (the real CLI, with two
   memory probes added): everything a run does, feature caching, 3 training steps, validation,
   a checkpoint, test caching and evaluation, and the bundle. Measured:
   - raw: the child's maximum resident set size, from the kernel when it exits (what
     /usr/bin/time reports as "Maximum resident set size");
   - baseline: its resident size once the libraries are imported and the data is loaded (sampled
     as MultimodalModel.build starts); the kernel's peak counter (VmHWM) is reset there;
   - above baseline: that peak counter at the end, less the baseline.
3. raw is compared with the estimate's total, above-baseline with the estimate less its baseline;
   the issue asks for both to be within 25%.

Results are merged by recipe into bench/results/plan_check.json. The recipes in recipes/hub/
need the Hugging Face Hub to train and are not run (bench/hub_plans.py estimates them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare_peft import proc_status, reset_peak_counter  # noqa: E402  (bench/: memory probes)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "plan_check.json"
TOLERANCE = 0.25


def child(report_path: str, argv: list[str]) -> None:
    """Run `peftmm <argv>` in this process, with the memory probes described above."""
    import accelerate  # noqa: F401  (imported first, like everything training needs, so the
    import bitsandbytes  # noqa: F401  baseline holds the libraries and only the run is above it)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401

    from peftmm.cli import main
    from peftmm.model import MultimodalModel

    report: dict = {}
    build = MultimodalModel.build.__func__

    def probed_build(cls, *args, **kwargs):
        if "baseline" not in report:   # after imports and load_splits: the data is in memory
            report["baseline"] = proc_status("VmRSS")
            report["peak_reset"] = reset_peak_counter()
        return build(cls, *args, **kwargs)

    MultimodalModel.build = classmethod(probed_build)
    try:
        main(argv, standalone_mode=False)
    finally:
        report["peak"] = proc_status("VmHWM")
        Path(report_path).write_text(json.dumps(report))


def estimate(recipe: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "peftmm", "plan", str(recipe), "--device", "cpu", "--json"]
    for item in overrides:
        cmd += ["--set", item]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"peftmm plan {recipe.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout[result.stdout.index("{"):])


def measure(recipe: Path, overrides: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="plan-check-") as scratch:
        report = Path(scratch) / "report.json"
        argv = ["train", str(recipe), "--output", str(Path(scratch) / "run"), "--no-progress",
                "--set", f"train.max_steps={steps}"]
        for item in overrides:
            argv += ["--set", item]
        started = time.perf_counter()
        with open(Path(scratch) / "log", "w+") as log:
            process = subprocess.Popen([sys.executable, __file__, "--child", str(report), "--", *argv],
                                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                log.seek(0)
                raise SystemExit(f"peftmm train {recipe.name} failed:\n{log.read()[-3000:]}")
        probes = json.loads(report.read_text())
    raw = usage.ru_maxrss * 1024   # KiB on Linux
    return {"raw_max_rss": raw, "baseline": probes["baseline"], "above_baseline": probes["peak"] - probes["baseline"],
            "peak_counter_reset": probes["peak_reset"], "wall_seconds": round(time.perf_counter() - started, 1)}


def compare(row: dict, planned: dict) -> dict:
    """``row`` (a measurement) with the estimate ``planned`` and how far apart they are."""
    baseline = next(p["bytes"] for p in planned["parts"] if p["name"] == "process baseline")
    row.update(estimate_total=planned["total"], estimate_baseline=baseline,
               estimate_above_baseline=planned["total"] - baseline,
               parts={p["name"]: p["bytes"] for p in planned["parts"]}, phases=planned["details"]["phases"])
    for name, got, want in (("raw", row["raw_max_rss"], planned["total"]),
                            ("above_baseline", row["above_baseline"], planned["total"] - baseline)):
        row[f"error_{name}"] = round(want / got - 1, 4)   # estimate vs measured: +0.10 = 10% over
        row[f"within_25pct_{name}"] = abs(want / got - 1) <= TOLERANCE
    return row


def check(recipe: Path, overrides: list[str], steps: int) -> dict:
    planned = estimate(recipe, overrides)
    row = {"recipe": recipe.stem, "overrides": overrides, "max_steps": steps, **measure(recipe, overrides, steps)}
    return compare(row, planned)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipe files (default: recipes/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3, help="training steps of each run (default 3)")
    parser.add_argument("--estimate-only", action="store_true",
                        help="train nothing: estimate again for the recipes measured before (after a change to "
                             "the estimator), keeping their measurements")
    args = parser.parse_args()
    recipes = args.recipes or sorted((ROOT / "recipes").glob("*.yaml"))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    mib = 2**20
    for recipe in recipes:
        if args.estimate_only:
            if recipe.stem not in results:
                continue
            row = results[recipe.stem]
            row = compare(row, estimate(recipe.resolve(), row["overrides"]))
        else:
            row = check(recipe.resolve(), args.overrides, args.steps)
        results[row["recipe"]] = row
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{row['recipe']}: estimate {row['estimate_total'] / mib:,.0f} MiB vs max RSS "
              f"{row['raw_max_rss'] / mib:,.0f} MiB ({row['error_raw']:+.1%}); above baseline "
              f"{row['estimate_above_baseline'] / mib:,.0f} vs {row['above_baseline'] / mib:,.0f} MiB "
              f"({row['error_above_baseline']:+.1%}); {row['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:])
    else:
        main()
