"""Epoch time with peftmm's frozen-feature cache against without it: same recipe, seed and data.

    .venv/bin/python bench/cache_bench.py                                   # easy-vqa-lora on a subset
    .venv/bin/python bench/cache_bench.py recipes/emoji-retrieval-projection.yaml --train-samples 0
    .venv/bin/python bench/cache_bench.py --train-samples 64 --eval-samples 32 --batch-size 16 \\
        --out /tmp/cache-smoke                                              # a smoke run

The recipe's vision tower (and, in emoji-retrieval-projection, the text tower too) has nothing to
train, so peftmm runs it once per distinct image and caches its tokens. Two runs of ``peftmm
train``, each in its own process (bench/compare_peft.py's probed child), one after the other:

- ``cache``: the recipe as it is;
- ``disk-cold`` then ``disk-warm``: the recipe with ``train.feature_cache_dir`` (a fresh folder):
  the first run encodes and writes the features, the second reads them back instead of
  encoding (its "cache fill" is the reading); its numbers must equal the first's;
- ``no-cache``: ``--set vision.cache_features=false --set text.cache_features=false``, so the
  frozen towers run on every batch, as they would without peftmm's cache.

Both train ``--epochs`` epochs (patience raised so none stops early) on the first
``--train-samples`` training examples (0: all), evaluating on the first ``--eval-samples`` of val
and test. Per epoch, the training loop's time is read from the run's metrics.jsonl (the last
step record of an epoch has its examples per second since the epoch began: examples / that
rate); the cache fill (train + val before the first epoch, test at the end) and each validation
are timed by wrapping the trainer's fill_caches and evaluate. The final numbers of both runs
(every epoch's val_* and the final test_* in metrics.jsonl, and each step's loss) are compared:
identical, or their largest difference.

Writes OUT/cache_bench.json (OUT: --out, default bench/results); the docs/results.md block is
bench/readme_tables.py's ``cache``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peft import ROOT, spawn  # noqa: E402  (the probed child and its runner)

RUNS = {"cache": [], "disk-cold": ["train.feature_cache_dir={scratch}/features"],
        "disk-warm": ["train.feature_cache_dir={scratch}/features"],
        "no-cache": ["vision.cache_features=false", "text.cache_features=false"]}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch_times(records: list[dict], report: dict) -> list[dict]:
    """Per epoch: its training loop (from metrics.jsonl) and its validation (timed in the child)."""
    train = report["split_sizes"]["train"]
    vals = [e for e in report["events"] if e["name"] == "val"]
    epochs = []
    for record in (r for r in records if "val_loss" in r):
        e = record["epoch"]
        last = [r for r in records if r.get("epoch") == e and "samples_per_s" in r][-1]
        loop = (train - record.get("skipped_train", 0)) / last["samples_per_s"]
        val = vals[e - 1]["end"] - vals[e - 1]["start"] if len(vals) >= e else None
        epochs.append({"epoch": e, "steps": sum(1 for r in records if r.get("epoch") == e and "samples_per_s" in r),
                       "loop_seconds": round(loop, 3), "val_seconds": round(val, 3) if val is not None else None})
    return epochs


def final_numbers(records: list[dict]) -> dict:
    """What must come out the same: validation per epoch, the test metrics, every step's loss."""
    numbers = {}
    for r in records:
        if "val_loss" in r:
            numbers.update({f"epoch {r['epoch']} {k}": v for k, v in r.items() if k.startswith("val_")})
        elif "final" in r:
            numbers.update({k: v for k, v in r["final"].items() if k.startswith(("test_", "val_"))})
        elif "loss" in r:
            numbers[f"step {r['step']} loss"] = r["loss"]
    return {k: v for k, v in numbers.items() if isinstance(v, (int, float))}


def compare(a: dict, b: dict) -> dict:
    keys = sorted(set(a) | set(b))
    missing = [k for k in keys if k not in a or k not in b]
    diffs = {k: abs(a[k] - b[k]) for k in keys if k in a and k in b}
    worst = max(diffs, key=diffs.get) if diffs and max(diffs.values()) > 0 else None
    return {"identical": not missing and all(d == 0 for d in diffs.values()), "compared": len(diffs),
            "missing": missing, "max_abs_diff": diffs[worst] if worst else 0.0, "max_diff_at": worst,
            "test_max_abs_diff": max((d for k, d in diffs.items() if k.startswith("test_")), default=0.0)}


def run(name: str, recipe: Path, overrides: list[str], scratch: Path, out: Path) -> dict:
    run_dir = scratch / name
    payload = {"name": name, "kind": "peftmm", "recipe": str(recipe),
               "overrides": overrides + [o.format(scratch=scratch) for o in RUNS[name]],
               "run_dir": str(run_dir)}
    report = spawn(payload, out / "runs" / "cache_bench" / f"{name}.log")
    records = read_metrics(run_dir / "metrics.jsonl")
    fills = [e["end"] - e["start"] for e in report["events"] if e["name"] == "fill_caches"]
    test = [e["end"] - e["start"] for e in report["events"] if e["name"] == "test"]
    final = next(r["final"] for r in records if "final" in r)
    return {"run": name, "overrides": payload["overrides"], "epochs": epoch_times(records, report),
            "cache_fill_seconds": round(fills[0], 3) if fills else 0.0,   # train + val, before epoch 1
            "test_cache_fill_seconds": round(fills[1], 3) if len(fills) > 1 else 0.0,
            "test_eval_seconds": round(test[0], 3) if test else None, "train_seconds": final["train_seconds"],
            "wall_seconds": report["wall_seconds"], "split_sizes": report["split_sizes"], "device": report["device"],
            "primary": {k: v for k, v in final.items() if k.startswith("test_") and isinstance(v, float)},
            "numbers": final_numbers(records)}


def summary(runs: dict) -> dict:
    cached, plain = runs["cache"], runs["no-cache"]
    per_epoch = []
    for c, p in zip(cached["epochs"], plain["epochs"]):
        c_s, p_s = c["loop_seconds"] + (c["val_seconds"] or 0), p["loop_seconds"] + (p["val_seconds"] or 0)
        per_epoch.append({"epoch": c["epoch"], "cache_seconds": round(c_s, 3), "no_cache_seconds": round(p_s, 3),
                          "no_cache_over_cache": p_s / c_s if c_s else None})
    first = per_epoch[0]["cache_seconds"] + cached["cache_fill_seconds"] if per_epoch else None
    return {"per_epoch": per_epoch, "cache_first_epoch_with_fill_seconds": round(first, 3) if first else None,
            "first_epoch_no_cache_over_cache_with_fill": per_epoch[0]["no_cache_seconds"] / first if first else None,
            "whole_run_no_cache_over_cache": plain["wall_seconds"] / cached["wall_seconds"],
            "metrics": compare(cached["numbers"], plain["numbers"])} | (_disk(runs) if "disk-warm" in runs else {})


def _disk(runs: dict) -> dict:
    cold, warm = runs["disk-cold"], runs["disk-warm"]
    return {"disk_fill_cold_over_warm": cold["cache_fill_seconds"] / max(warm["cache_fill_seconds"], 1e-9),
            "disk_whole_run_cold_over_warm": cold["wall_seconds"] / warm["wall_seconds"],
            "disk_warm_vs_cold_metrics": compare(cold["numbers"], warm["numbers"]),
            "disk_warm_vs_memory_metrics": compare(runs["cache"]["numbers"], warm["numbers"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=ROOT / "recipes" / "easy-vqa-lora.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=2560, help="first N training examples (0: all)")
    parser.add_argument("--eval-samples", type=int, default=500, help="first N of val and of test (0: all)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="another override for both runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    overrides = [f"train.epochs={args.epochs}", "train.patience=1000", f"train.seed={args.seed}"]
    overrides += [f"data.max_train_samples={args.train_samples}"] if args.train_samples else []
    overrides += [f"data.max_eval_samples={args.eval_samples}"] if args.eval_samples else []
    overrides += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += args.overrides
    runs = {}
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as scratch:
        for name in RUNS:
            print(f"{name} ...", file=sys.stderr, flush=True)
            runs[name] = run(name, args.recipe.resolve(), overrides, Path(scratch), args.out)
            r = runs[name]
            print(f"  fill {r['cache_fill_seconds']:.1f} s, epochs " +
                  ", ".join(f"{e['loop_seconds']:.1f} s + val {e['val_seconds'] or 0:.1f} s" for e in r["epochs"]) +
                  f", whole run {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    data = {"recipe": args.recipe.stem, "overrides": overrides, "runs": runs, "summary": summary(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache_bench.json").write_text(json.dumps(data, indent=2) + "\n")
    m = data["summary"]["metrics"]
    where = f" (largest difference {m['max_abs_diff']:.3g}, {m['max_diff_at']})" if m["max_diff_at"] else ""
    print(f"metrics {'identical' if m['identical'] else 'differ'} over {m['compared']} numbers{where}; "
          f"wrote {args.out / 'cache_bench.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
