"""One process against several: the same recipe, seed and global batch through `peftmm train`
and `peftmm train --num-processes N` (gloo on this CPU machine, one per GPU on a CUDA one).

    .venv/bin/python bench/distributed_check.py                       # easy-vqa-lora on a subset
    .venv/bin/python bench/distributed_check.py recipes/emoji-retrieval.yaml --set train.epochs=1
    .venv/bin/python bench/distributed_check.py --processes 1 2 4 --out /tmp/dist

Each run is its own `python -m peftmm train` (the real CLI, one after another, so they do not share
cores), timed from start to exit. Compared with the 1-process run: every trainable tensor of the
bundle (largest absolute difference, and the largest trained change of any weight for scale),
each logged step loss, and the final val/test metrics.

The default recipe is run without the head's dropout (``task.dropout=0``): with dropout each
process draws masks for its slice of the batch, another random stream than one process's, so the
runs would differ by chance and not only by float summation order.

Merges its result by recipe into OUT/distributed.json (OUT: --out, default bench/results); the docs/training.md
block is bench/readme_tables.py's ``distributed``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import ROOT, train_cli  # noqa: E402  (bench/: one way to run `peftmm train`)

DEFAULT_SET = ["data.max_train_samples=4096", "data.max_eval_samples=1024", "train.epochs=2", "task.dropout=0"]


def run(recipe: str, overrides: list[str], processes: int, out: Path) -> dict:
    metrics, wall = train_cli(recipe, overrides, out, "--num-processes", str(processes))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"processes": processes, "wall_seconds": round(wall, 1), "train_seconds": metrics["train_seconds"],
            "steps": metrics["steps"], "losses": [r["loss"] for r in records if "loss" in r],
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("test_", "val_"))}}


def compare(reference: dict, other: dict, bundles: tuple[Path, Path]) -> dict:
    from peftmm.bundle import read_tensors

    a, b = (read_tensors(path) for path in bundles)
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    worst = max(diffs, key=diffs.get)
    return {"max_weight_diff": diffs[worst], "max_weight_diff_tensor": worst,
            "max_weight": max(t.abs().max().item() for t in a.values()),
            "tensors": len(a), "equal_tensors": sum(1 for v in diffs.values() if v == 0.0),
            "max_step_loss_diff": max(abs(x - y) for x, y in zip(reference["losses"], other["losses"])),
            "first_step_loss_diff": abs(reference["losses"][0] - other["losses"][0]),
            "metric_diffs": {k: other["metrics"][k] - v for k, v in reference["metrics"].items()
                             if isinstance(v, (int, float))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="recipes/easy-vqa-lora.yaml")
    parser.add_argument("--set", dest="overrides", action="append", help="recipe override (default: a subset)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    overrides = DEFAULT_SET if args.overrides is None else args.overrides
    runs_dir = args.out / "runs" / "distributed" / Path(args.recipe).stem
    runs = [run(args.recipe, overrides, n, runs_dir / f"processes-{n}") for n in args.processes]
    reference = runs[0]
    for other in runs[1:]:
        other["against_1"] = compare(reference, other, (runs_dir / f"processes-{reference['processes']}" / "bundle",
                                                        runs_dir / f"processes-{other['processes']}" / "bundle"))
    for r in runs:
        r["losses"] = [round(x, 6) for x in r["losses"]]
    result = {"recipe": args.recipe, "overrides": overrides, "cpus": os.cpu_count(), "machine": platform.machine(),
              "cuda": _cuda(), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "distributed.json"
    checks = json.loads(path.read_text())["checks"] if path.exists() else []
    checks = [c for c in checks if c["recipe"] != args.recipe] + [result]    # merged by recipe
    path.write_text(json.dumps({"checks": checks}, indent=2) + "\n")
    for r in runs:
        line = f"{r['processes']} process(es): wall {r['wall_seconds']} s, train loop {r['train_seconds']} s"
        if "against_1" in r:
            c = r["against_1"]
            line += f"; max weight diff {c['max_weight_diff']:.3g} ({c['max_weight_diff_tensor']})"
        print(line, {k: round(v, 4) for k, v in r["metrics"].items()})
    print(f"wrote {path}")


def _cuda() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
