"""Full fine-tuning, plain peft wired by hand, and peftmm's methods: same model, data, batches, steps.

    .venv/bin/python bench/compare_peft.py                          # all variants, 60 steps each
    .venv/bin/python bench/compare_peft.py --steps 4 --train-samples 64 --eval-samples 64 \\
        --warmup 1 --out /tmp/peft-smoke                             # a smoke run, nothing in bench/results
    .venv/bin/python bench/compare_peft.py --variants plain-peft-lora,easy-vqa-lora   # rerun some, keep others
    .venv/bin/python bench/compare_peft.py --render                 # redraw the chart from the JSON

Variants, each in its own process (so each one's peak memory is its own), one after another:

- ``full``: peftmm's ``full`` method (recipes/easy-vqa-full.yaml): both towers trainable, fp32.
- ``plain-peft-lora``: what a user writes without peftmm, from the default recipe's settings
  (recipes/easy-vqa-lora.yaml): ``AutoModel`` per tower at the recipe's precision (int8 through
  ``BitsAndBytesConfig``), ``peft.get_peft_model`` with the recipe's LoRA config on the text
  tower, a hand-written gated cross-attention fusion and head of the recipe's sizes, and a plain
  torch loop (AdamW, the recipe's lr, warmup and schedule). Every question's image is read,
  preprocessed (resize, ImageNet mean/std, as peftmm does) and encoded in its own step: no
  feature cache, no de-duplication of repeated images within a batch.
- ``easy-vqa-lora``, ``-adapter``, ``-prefix``, ``-fusion-only``: peftmm's own trainer.

All variants get the same overrides: ``--steps`` optimizer steps of ``--batch-size`` shuffled
questions from the first ``--train-samples`` training questions (``group_by_image`` off, so all
see the very same batches: the plain loop's DataLoader(shuffle=True, generator seeded alike)
draws what peftmm's sampler draws), then accuracy on the first ``--eval-samples`` test
questions. Measured per variant, by the same probes in every child:

- trainable parameters;
- peak memory. CPU: the child's maximum resident set size (raw, from the kernel at exit) and
  its peak above a baseline sampled once the libraries are imported and the data is loaded
  (where the kernel's peak counter is reset). CUDA: torch.cuda.max_memory_allocated/reserved.
  These cover the whole run, test evaluation included; the JSON also has the peak up to the last
  training step (``train_above_baseline``, ``cuda_train_max_allocated``);
- step time: the interval between consecutive optimizer steps (a global optimizer hook, after a
  CUDA synchronize), so it covers batch building (image decoding, cache lookups), forward,
  backward and update; the median after ``--warmup`` steps, and batch size / median as samples/s.

Writes OUT/compare_peft.json and OUT/compare_peft.png (OUT: --out, default bench/results), each
child's log in OUT/runs/compare_peft/ (ignored by git); bench/readme_tables.py's ``peft`` renders
the docs/results.md table from the JSON.
bench/cache_bench.py and bench/gpu_bench.py reuse ``spawn`` and the child probes from here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
PEFTMM_VARIANTS = ["easy-vqa-lora", "easy-vqa-adapter", "easy-vqa-prefix", "easy-vqa-fusion-only"]
VARIANTS = ["full", "plain-peft-lora", *PEFTMM_VARIANTS]
LABELS = {"full": "full fine-tuning (peftmm `full`, fp32)", "plain-peft-lora": "plain peft LoRA (hand-wired)"}


# -- the child side: probes around one training run ------------------------------------------
def proc_status(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_counter() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Probe:
    """Step stamps, the memory baseline, and timed calls, collected into ``report``."""

    def __init__(self):
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []   # the process's CPU time (all threads): steadier on a shared machine
        self.report: dict = {"events": [], "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
                             "torch_threads": torch.get_num_threads()}
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self._stamp)   # every optimizer, peftmm's or the plain loop's

    def _stamp(self, *_):
        if self.cuda:   # kernels run asynchronously: the step ends when the device is done
            self.torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        # the peak so far, at each step: at the last one, the training phase's (before test evaluation)
        self.report["train_peak_rss"] = proc_status("VmHWM")
        if self.cuda:
            self.report["cuda_train_max_allocated"] = self.torch.cuda.max_memory_allocated()

    def baseline(self) -> None:
        """Once, after imports and data loading: what every variant pays before its model exists."""
        if "baseline_rss" in self.report:
            return
        self.report["baseline_rss"] = proc_status("VmRSS")
        self.report["peak_counter_reset"] = reset_peak_counter()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def timed(self, function, name: str):
        """``function`` recording its start and end (relative to the first step stamp later)."""
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.report["events"].append({"name": kwargs.get("desc", name), "start": start,
                                              "end": time.perf_counter()})
        return wrapper

    def finish(self) -> dict:
        r = self.report
        r["peak_rss"] = proc_status("VmHWM")
        r["above_baseline"] = r["peak_rss"] - r.get("baseline_rss", 0)
        r["step_intervals"] = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        r["step_stamps"] = self.stamps
        r["step_cpu_intervals"] = [b - a for a, b in zip(self.cpu_stamps, self.cpu_stamps[1:])]
        if self.cuda:
            r["cuda_max_allocated"] = self.torch.cuda.max_memory_allocated()
            r["cuda_max_reserved"] = self.torch.cuda.max_memory_reserved()
        return r


def peftmm_child(payload: dict, probe: Probe) -> dict:
    """One ``peftmm.train`` run (the library API the CLI calls), probed."""
    m = probed_train(payload, probe)
    return {"trainable_params": m["trainable_params"], "total_params": m["total_params"],
            "accuracy": m["test_accuracy"], "eval_examples": m["test_examples"], "steps": m["steps"],
            "best_epoch": m["best_epoch"], "train_seconds": m["train_seconds"]}


def probed_train(payload: dict, probe: Probe) -> dict:
    """``peftmm.train`` of the payload's recipe and overrides, with the probe's baseline taken
    right before the model is built and the cache fills and evaluations timed; its final metrics."""
    import peftmm
    import peftmm.trainer as trainer
    from peftmm.model import MultimodalModel

    build = MultimodalModel.build.__func__

    def probed_build(cls, *args, **kwargs):   # the trainer calls it right after load_splits
        probe.baseline()
        return build(cls, *args, **kwargs)

    MultimodalModel.build = classmethod(probed_build)
    load = trainer.load_splits

    def counted(spec):   # split sizes, for per-epoch rates (cache_bench)
        splits = load(spec)
        probe.report["split_sizes"] = {name: len(splits[name]) for name in ("train", "val", "test")}
        return splits

    trainer.load_splits = counted
    trainer.fill_caches = probe.timed(trainer.fill_caches, "fill_caches")   # cache_bench reads these
    trainer.evaluate = probe.timed(trainer.evaluate, "evaluate")
    recipe = peftmm.load_recipe(payload["recipe"], payload["overrides"])
    return peftmm.train(recipe, payload["run_dir"], progress=False).metrics


def child_main(payload_path: str, report_path: str) -> None:
    # The same libraries are imported before every variant's baseline, so raw peaks differ by
    # what the variant does, not by what it imported.
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peftmm.trainer  # noqa: F401

    payload = json.loads(Path(payload_path).read_text())
    probe = Probe()
    if payload["kind"] == "plain":
        from plain_peft import plain_child  # bench/plain_peft.py: the hand-wired loop

        result = plain_child(payload, probe)
    else:
        result = peftmm_child(payload, probe)
    Path(report_path).write_text(json.dumps({**probe.finish(), **result}))


# -- the parent side ---------------------------------------------------------------------------
def spawn(payload: dict, log_path: Path, script: Path | None = None) -> dict:
    """Run one child to its end; its report plus the kernel's max RSS of it and its wall time.
    ``script``: the bench whose ``--child PAYLOAD REPORT`` runs it (default this one)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-child-") as scratch:
        given, report = Path(scratch) / "payload.json", Path(scratch) / "report.json"
        given.write_text(json.dumps(payload))
        started = time.perf_counter()
        with open(log_path, "w+") as log:
            command = [sys.executable, str(script or __file__), "--child", str(given), str(report)]
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)   # wait4: the child's own rusage, max RSS included
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                log.seek(0)
                raise SystemExit(f"{payload.get('name')} failed (exit {process.returncode}), log {log_path}:\n"
                                 f"{log.read()[-3000:]}")
        result = json.loads(report.read_text())
    result.update(raw_max_rss=usage.ru_maxrss * 1024, wall_seconds=round(time.perf_counter() - started, 1))
    return result


def common_overrides(s: dict) -> list[str]:
    """What every variant trains on: the same subset, batches, steps, and no early stop before them."""
    batches = math.ceil(s["train_samples"] / s["batch_size"])
    epochs = math.ceil(s["steps"] / batches)   # more than one only if the subset is smaller than the steps
    return [f"train.max_steps={s['steps']}", f"train.batch_size={s['batch_size']}", f"train.epochs={epochs}",
            "train.patience=1000", "train.group_by_image=false", f"train.seed={s['seed']}",
            f"data.max_train_samples={s['train_samples']}", f"data.max_eval_samples={s['eval_samples']}"]


def summarise(variant: str, report: dict, s: dict) -> dict:
    steps = report["step_intervals"]
    skip = min(s["warmup"], max(len(steps) - 1, 0))   # a smoke run of few steps keeps at least one
    timed = steps[skip:]
    median = statistics.median(timed) if timed else float("nan")
    row = {"variant": variant, "label": LABELS.get(variant, f"peftmm `{variant}`"),
           "trainable_params": report["trainable_params"], "raw_max_rss": report["raw_max_rss"],
           "baseline_rss": report.get("baseline_rss"), "above_baseline": report["above_baseline"],
           "peak_counter_reset": report.get("peak_counter_reset"), "median_step_s": median,
           "warmup_excluded": skip, "timed_steps": len(timed), "step_intervals_s": steps,
           "samples_per_s": s["batch_size"] / median if timed else None, "accuracy": report["accuracy"],
           "eval_examples": report["eval_examples"], "steps": report.get("steps", len(steps) + 1),
           "wall_seconds": report["wall_seconds"], "device": report["device"]}
    row["train_above_baseline"] = report["train_peak_rss"] - report.get("baseline_rss", 0)
    for key in ("cuda_max_allocated", "cuda_max_reserved", "cuda_train_max_allocated", "best_epoch"):
        if key in report:
            row[key] = report[key]
    return row


def memory_key(rows: list[dict]) -> str:
    """What ratios compare: on CUDA the allocator's peak, on CPU the peak above the baseline."""
    return "cuda_max_allocated" if all("cuda_max_allocated" in r for r in rows) else "above_baseline"


def add_ratios(rows: list[dict]) -> None:
    key = memory_key(rows)
    refs = {name: next((r for r in rows if r["variant"] == name), None) for name in ("full", "plain-peft-lora")}
    for r in rows:
        for name, ref in refs.items():
            tag = "full" if name == "full" else "plain_peft"
            r[f"memory_vs_{tag}"] = r[key] / ref[key] if ref and ref[key] else None
            r[f"step_vs_{tag}"] = r["median_step_s"] / ref["median_step_s"] if ref else None


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    rows, mib = data["results"], 2**20
    key = memory_key(rows)
    names = [r["variant"].replace("easy-vqa-", "peftmm ") for r in rows]
    x = range(len(rows))
    pairs = ([("cuda_max_allocated", "max allocated"), ("cuda_max_reserved", "max reserved")] if key != "above_baseline"
             else [("raw_max_rss", "peak RSS (raw)"), ("above_baseline", "above baseline")])
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for offset, (field, label) in zip((-0.2, 0.2), pairs):
        axes[0].bar([i + offset for i in x], [r[field] / mib for r in rows], width=0.4, label=label)
    axes[1].bar(list(x), [1000 * r["median_step_s"] for r in rows], color="tab:green")
    for ax, ratio, height in ((axes[0], "memory", lambda r: r[key] / mib), (axes[1], "step",
                                                                            lambda r: 1000 * r["median_step_s"])):
        for i, r in enumerate(rows):   # ratios of the compared quantity vs full FT and vs plain peft
            parts = [f"{r[f'{ratio}_vs_{t}']:.2f}x {n}" for t, n in (("full", "full"), ("plain_peft", "peft"))
                     if r.get(f"{ratio}_vs_{t}") is not None]
            ax.annotate("\n".join(parts), (i + (0.2 if ax is axes[0] else 0), height(r)), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(x), names, rotation=25, ha="right")
    axes[0].set_title(f"peak memory (MiB); ratios of {'allocated' if key != 'above_baseline' else 'above baseline'}")
    axes[0].legend(fontsize=8)
    axes[1].set_title(f"median step time (ms), batch {data['settings']['batch_size']}")
    for ax in axes:
        ax.margins(y=0.25)
    fig.suptitle(f"{data['settings']['steps']} steps each on {rows[0]['device']}", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant (default 60)")
    parser.add_argument("--batch-size", type=int, default=128, help="the recipes' own batch size by default")
    parser.add_argument("--train-samples", type=int, help="first N training questions (default steps x batch "
                                                          "size: one epoch, so no variant picks a best epoch)")
    parser.add_argument("--eval-samples", type=int, default=1000, help="first N test questions (default 1000)")
    parser.add_argument("--warmup", type=int, default=5, help="step intervals left out of the median (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--render", action="store_true", help="only redraw the chart from the JSON")
    args = parser.parse_args()
    out, path = args.out, args.out / "compare_peft.json"
    if args.render:
        chart(json.loads(path.read_text()), out / "compare_peft.png")
        return
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    s = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "warmup": args.warmup,
         "train_samples": args.train_samples or args.steps * args.batch_size, "eval_samples": args.eval_samples}
    overrides = common_overrides(s)
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare-peft-") as scratch:   # run dirs (bundles) are not kept
        for variant in chosen:
            print(f"{variant} ...", file=sys.stderr, flush=True)
            recipe = RECIPES / ("easy-vqa-full.yaml" if variant == "full" else
                                "easy-vqa-lora.yaml" if variant == "plain-peft-lora" else f"{variant}.yaml")
            payload = {"name": variant, "kind": "plain" if variant == "plain-peft-lora" else "peftmm",
                       "recipe": str(recipe), "overrides": overrides, "settings": s,
                       "run_dir": str(Path(scratch) / variant)}
            rows.append(summarise(variant, spawn(payload, out / "runs" / "compare_peft" / f"{variant}.log"), s))
            r = rows[-1]
            print(f"  {r['trainable_params']:,} trainable, peak RSS {r['raw_max_rss'] / 2**20:,.0f} MiB "
                  f"({r['above_baseline'] / 2**20:,.0f} above baseline), median step {r['median_step_s']:.3f} s, "
                  f"accuracy {r['accuracy']:.4f}, {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    if path.exists() and set(chosen) != set(VARIANTS):   # a partial rerun keeps the other variants' rows
        previous = json.loads(path.read_text())
        if previous["settings"] == s:
            fresh = {r["variant"]: r for r in rows}
            rows = [fresh.pop(r["variant"], r) for r in previous["results"]] + list(fresh.values())
    rows.sort(key=lambda r: VARIANTS.index(r["variant"]))
    add_ratios(rows)
    data = {"settings": s, "overrides": overrides, "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    chart(data, out / "compare_peft.png")
    print(f"wrote {path} and {out / 'compare_peft.png'}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
