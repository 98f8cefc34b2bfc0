"""Write the documentation's result tables from the benchmark JSON, so no number is typed by hand.

    .venv/bin/python bench/readme_tables.py           # rewrite the marked blocks in README.md and docs/*.md
    .venv/bin/python bench/readme_tables.py --check   # exit 1 (naming the files) if a block differs from its JSON

Each table sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in whichever of
README.md and docs/*.md holds it, and is rendered from bench/results/ (tests/test_readme_tables.py
runs the check). Tables are written with links relative to the repository root; each block's
links are rebased onto the file it lands in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emoji_tables  # noqa: E402
import instruct_tables  # noqa: E402
import method_tables  # noqa: E402
from table_format import mib, ms  # noqa: E402
from task_metrics import REPORTED, SOURCES, metric_name, show  # noqa: E402

from peftmm.io import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def bundle_table(data: dict | None = None) -> str:
    """The default recipe's shipped bundle (bench/bundle_report.py)."""
    data = data or json.loads((RESULTS / "default_bundle.json").read_text())
    m, adapter = data["metrics"], data["adapter_bytes"]
    backbones, whole = data["backbones"], data.get("whole_test_split") or {}
    source = SOURCES.get(data.get("source", "easy-vqa"), data.get("source"))   # reports before the key: easy-VQA
    rows = [
        ("trainable parameters", f"{m['trainable_params']:,} of {m['total_params']:,} "
                                 f"({100 * m['trainable_share']:.3f}%)"),
        # a run that scored only part of the test split says so when the whole split was scored too
        *[(f"{source} test {metric_name(k)}" + (f" (the run's first {data['test_examples']:,})" if whole else ""),
           show(k, v)) for k, v in m.items() if k.startswith("test_")],
        *[(f"validation {metric_name(k)} (best epoch)", f"{show(k, v)} (epoch {m['best_epoch']})")
          for k, v in m.items() if k.startswith("val_")],
        *[(f"{source} test {metric_name(k)}, whole split ({whole['examples']:,} examples)", show(k, whole[k]))
          for k in REPORTED.get(data.get("task", "vqa"), ("accuracy",)) if k in whole],
        ("training time (train loop only)", f"{m['train_seconds']:.0f} s, {m['steps']} steps"),
        ("adapter file", f"{adapter:,} bytes"),
        *[(f"{name} backbone weights ({b['source']}, fp32 safetensors)", f"{b['bytes']:,} bytes")
          for name, b in backbones.items()],
        ("adapter / backbones", f"{100 * adapter / sum(b['bytes'] for b in backbones.values()):.2f}%"),
    ]
    return "\n".join([f"| {data['name']} | measured |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def instruct_bundle() -> str:
    """The shipped easy-VQA instruct bundle, with its score on the whole test split."""
    return bundle_table(json.loads((RESULTS / "instruct_bundle.json").read_text()))


def methods() -> str:
    return (RESULTS / "methods.md").read_text().strip()


def _median_of(rows: list[dict], key: str):
    """The upper median, an actual row's value (so byte counts stay integers)."""
    return sorted(r[key] for r in rows)[len(rows) // 2]


def runtime() -> str:
    data = json.loads((RESULTS / "runtime.json").read_text())
    swap, memory = data["swap"], data["memory"]
    lines = ["| what | median | p95 |", "|---|---|---|"]
    for label, key in (("switch to another adapter (`Runtime.activate`)", "switch_s"),
                       ("one request, same adapter every call", "request_same_adapter_s"),
                       ("one request, adapter alternating every call", "request_alternating_adapters_s"),
                       ("load backbones + adapter from disk, then predict", "cold_load_and_predict_s")):
        lines.append(f"| {label} | {ms(swap[key]['median'])} | {ms(swap[key]['p95'])} |")
    lines += ["", f"Cold load over switch: **{swap['cold_over_switch']:,.0f}x** (medians); a request with "
              f"the adapter alternating costs {swap['alternating_over_same']:.2f}x one with the same adapter.", "",
              "| 10 adapters registered | file bytes | resident memory growth | tensor bytes added |",
              "|---|---|---|---|",
              f"| total | {memory['total_file_bytes']:,} | {memory['total_rss_growth_bytes']:,} | "
              f"{memory['total_tensor_growth_bytes']:,} |",
              f"| median per adapter | {_median_of(memory['per_adapter'], 'file_bytes'):,} | "
              f"{memory['median_rss_growth_bytes']:,.0f} | "
              f"{_median_of(memory['per_adapter'], 'tensor_growth_bytes'):,} |",
              "", "| LoRA, fp32 backbones | unmerged (median) | merged (median) | unmerged / merged | max logit diff |",
              "|---|---|---|---|---|"]
    for row in data["merge"]:
        lines.append(f"| {row['variant']}, batch {row['batch_size']} | {ms(row['unmerged_s']['median'])} | "
                     f"{ms(row['merged_s']['median'])} | {row['ratio']:.2f}x | {row['max_logit_diff']:.1e} |")
    return "\n".join(lines)


def serve(name: str = "serve.json") -> str:
    """Concurrent clients against ``peftmm serve`` (bench/serve_load.py; ``--api openai`` writes
    serve-openai.json, the same load through the OpenAI-compatible API)."""
    data = json.loads((RESULTS / name).read_text())
    return "\n".join([
        "| clients x requests | adapters | wrong or mixed answers | errors | p50 latency | p95 latency | throughput |",
        "|---|---|---|---|---|---|---|",
        f"| {data['clients']} x {data['requests_per_client']} | {', '.join(data['adapters'])} | "
        f"{data['wrong_or_mixed']} of {data['total']} | {data['errors']} | {ms(data['latency_s']['p50'])} | "
        f"{ms(data['latency_s']['p95'])} | {data['requests_per_s']:.1f} requests/s |"])


def serve_openai() -> str:
    return serve("serve-openai.json")


def serve_instruct(data: dict | None = None) -> str:
    """Official openai clients over instruct (streamed) and VQA adapters at once
    (bench/serve_load.py --instruct ... --vqa ...)."""
    data = data or json.loads((RESULTS / "serve-instruct.json").read_text())
    kinds, first = data["latency_by_kind_s"], data["time_to_first_token_s"]
    server = data["server"]
    return "\n".join([
        "| clients x requests | instruct adapters (streamed) | VQA adapters | mixed or wrong answers | errors | "
        "p50 / p95 latency | instruct p50 / p95 | VQA p50 / p95 | time to first token p50 / p95 | throughput |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {data['clients']} x {data['requests_per_client']} | {', '.join(data['adapters']['instruct'])} | "
        f"{', '.join(data['adapters']['vqa'])} | {data.get('mixed', data['wrong_or_mixed'])} of {data['total']} | "
        f"{data['errors']} | "
        f"{ms(data['latency_s']['p50'])} / {ms(data['latency_s']['p95'])} | "
        f"{ms(kinds['instruct']['p50'])} / {ms(kinds['instruct']['p95'])} | "
        f"{ms(kinds['vqa']['p50'])} / {ms(kinds['vqa']['p95'])} | {ms(first['p50'])} / {ms(first['p95'])} | "
        f"{data['requests_per_s']:.1f} requests/s |",
        "",
        f"Server batches: {server['batches']} for {data['total']} requests (mean {server['mean_batch']:.1f}, "
        f"largest {server['largest_batch']}, --max-batch {server['max_batch']}) on {server['device']}. "
        f"Answers that differ from the same request run alone but that the request also gets in a batch of "
        f"its own adapter's rows (greedy decoding tipped at a near-tie by the batch's rounding, not a mix): "
        f"{data.get('differs_from_alone_by_batch_numerics', 0)}.",
        "",
        "![latency per adapter](bench/results/serve-instruct.png)"])


def image_bomb() -> str:
    """The server's memory under concurrent huge one-colour PNGs, before and after the pixel limit
    (bench/image_bomb.py; "before" ran the same script against the older code)."""
    data = json.loads((RESULTS / "image_bomb.json").read_text())
    lines = ["| image | code | answers | peak RSS | RSS 3 s after | RSS before the requests |",
             "|---|---|---|---|---|---|"]
    order = sorted(data, key=lambda label: (-int(label.rsplit("-", 1)[1]), not label.startswith("before")))
    for label in order:
        run = data[label]
        answers = ", ".join(f"{n} x {status}" for status, n in sorted(run["statuses"].items()))
        code = "before the limits" if label.startswith("before") else "now"
        rss = run["rss_mib"]
        lines.append(f"| {run['image']} | {code} | {answers} | {mib(rss['peak'] * 2**20)} | "
                     f"{mib(rss['3s_after'] * 2**20)} | {mib(rss['before_requests'] * 2**20)} |")
    return "\n".join(lines)


def hf_memory() -> str:
    """A parquet data set larger than the training process's peak memory (bench/hf_larger_than_memory.py)."""
    data = json.loads((RESULTS / "hf_memory.json").read_text())
    gb = lambda n: f"{n / 1e9:.2f} GB"   # noqa: E731
    training, conversion = data["training"], data["conversion"]
    return "\n".join([
        "| what | measured |", "|---|---|",
        f"| parquet on disk ({data['images']:,} embedded PNGs of {data['image_px']} px) | "
        f"{gb(data['parquet_bytes'])} |",
        f"| Arrow cache `datasets` wrote from it | {gb(data['arrow_cache_bytes'])} |",
        f"| training process, peak RSS ({training['steps']} steps, {training['test_examples']} test examples) | "
        f"{gb(training['peak_rss_bytes'])} ({data['parquet_over_training_peak_rss']:.1f}x less than the parquet) |",
        f"| first-load conversion to Arrow, its own process, peak RSS | {gb(conversion['peak_rss_bytes'])} |"])


def _detail(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_detail(v)}" for k, v in value.items()) + "}"
    return str(value)


def gpu_smoke() -> str:
    """Each part of the GPU smoke check (bench/gpu_smoke.py): the CUDA run where there is one, else
    the CPU dry run."""
    name = "gpu_smoke_cuda.json" if (RESULTS / "gpu_smoke_cuda.json").exists() else "gpu_smoke_cpu.json"
    data = json.loads((RESULTS / name).read_text())
    lines = [f"`bench/results/{name}`: {data['device']}, torch {data['torch']}, {data['steps']} steps, "
             f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped, "
             f"{data['total_seconds']:.0f} s.", "", "| part | status | seconds | measured |", "|---|---|---:|---|"]
    for part in data["parts"]:
        measured = part.get("reason") or part.get("error") or "; ".join(
            f"{k} {_detail(v)}" for k, v in (part.get("details") or {}).items())
        seconds = f"{part['seconds']:.1f}" if part.get("seconds") is not None else ""
        lines.append(f"| `{part['name']}` | {part['status']} | {seconds} | {measured} |")
    return "\n".join(lines)


def walltime() -> str:
    data = json.loads((RESULTS / "main_walltime.json").read_text())
    return "\n".join([
        "| what | measured |", "|---|---|",
        f"| `make main` from a fresh clone, set-up included | {data['wall_seconds']:.0f} s "
        f"({data['wall_seconds'] / 60:.1f} min) |",
        f"| `peftmm eval` test accuracy of the bundle it trained | {100 * data['eval_test_accuracy']:.2f}% |",
        f"| its prediction for test image 0, \"{data['prediction']['question']}\" | {data['prediction']['answer']} |"])




def plan() -> str:
    """``peftmm plan --device cpu`` against the measured peak, per recipe (bench/plan_check.py)."""
    data = json.loads((RESULTS / "plan_check.json").read_text())
    lines = ["| recipe | estimate | max RSS | error | above baseline: estimate | measured | error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(data.items()):
        lines.append(f"| {name} | {mib(r['estimate_total'])} | {mib(r['raw_max_rss'])} | "
                     f"{100 * r['error_raw']:+.1f}% | {mib(r['estimate_above_baseline'])} | "
                     f"{mib(r['above_baseline'])} | {100 * r['error_above_baseline']:+.1f}% |")
    worst = {k: max(data.values(), key=lambda r: abs(r[f"error_{k}"])) for k in ("raw", "above_baseline")}
    inside = sum(r["within_25pct_raw"] and r["within_25pct_above_baseline"] for r in data.values())
    lines += ["", f"{inside} of {len(data)} recipes within 25% both ways; the largest errors: "
                  f"{100 * worst['raw']['error_raw']:+.1f}% of the max RSS ({worst['raw']['recipe']}), "
                  f"{100 * worst['above_baseline']['error_above_baseline']:+.1f}% above baseline "
                  f"({worst['above_baseline']['recipe']})."]
    return "\n".join(lines)


def hub() -> str:
    """``peftmm plan`` (cuda) for the recipes on real hub backbones, recipes/hub/ (bench/hub_plans.py)."""
    data = json.loads((RESULTS / "hub_plans.json").read_text())
    cards = list(next(iter(data.values()))["cards"])

    def tower(r, name):
        b = r["backbones"][name]
        return f"{b['source']} ({b['precision']}, {' + '.join(b['methods']) or 'frozen'})"

    lines = ["| recipe | vision | text | trainable | estimate | peak of | " + " | ".join(cards) + " |",
             "|---|---|---|---:|---:|---|" + "---|" * len(cards)]
    for r in sorted(data.values(), key=lambda r: r["file"]):
        lines.append(f"| `{r['file']}` | {tower(r, 'vision')} | {tower(r, 'text')} | {r['trainable_params']:,} | "
                     f"{r['total'] / 2**30:.2f} GiB | {r['peak_phase']} | " +
                     " | ".join("yes" if fits else "no" for fits in r["cards"].values()) + " |")
    offline = sorted({source for r in data.values() for source in r["offline_configs"].values()})
    if offline:
        lines += ["", f"Planned without the hub: the configs of {', '.join(offline)} came from `peftmm/hub_configs`, "
                      "and token counts from its approximate tokenizer (they err long)."]
    return "\n".join(lines)


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def peft(data: dict | None = None) -> str:
    """Full fine-tuning, plain peft wired by hand and peftmm's methods (bench/compare_peft.py)."""
    data = data or json.loads((RESULTS / "compare_peft.json").read_text())
    rows, s = data["results"], data["settings"]
    cuda = all("cuda_max_allocated" in r for r in rows)
    first, second = ("cuda_max_allocated", "cuda_max_reserved") if cuda else ("raw_max_rss", "above_baseline")
    names = ("peak allocated", "peak reserved") if cuda else ("peak RSS (raw)", "above baseline")
    lines = [f"| variant | trainable params | {names[0]} | {names[1]} | memory vs full FT | median step | "
             "step vs full FT | samples/s | accuracy |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['trainable_params']:,} | {mib(r[first])} | {mib(r[second])} | "
                     f"{_times(r.get('memory_vs_full'))} | {ms(r['median_step_s'])} | "
                     f"{_times(r.get('step_vs_full'))} | {r['samples_per_s']:.1f} | {100 * r['accuracy']:.2f}% |")
    lines += ["", f"{s['steps']} optimizer steps of {s['batch_size']} shuffled questions per variant (the same "
              f"batches, from the first {s['train_samples']:,} training questions), seed {s['seed']}, on "
              f"{rows[0]['device']}; median step time after {s['warmup']} warm-up "
              f"step{'s' if s['warmup'] != 1 else ''}; accuracy on the first "
              f"{s['eval_samples']:,} test questions. Memory ratios compare "
              f"{'the peak allocated' if cuda else 'the peak above baseline'}."]
    plain = next((r for r in rows if r["variant"] == "plain-peft-lora"), None)
    lora = next((r for r in rows if r["variant"] == "easy-vqa-lora"), None)
    if plain and lora:
        lines.append(f"peftmm `easy-vqa-lora` against the same LoRA wired by hand with plain peft: "
                     f"{_times(lora['memory_vs_plain_peft'])} the memory, {_times(lora['step_vs_plain_peft'])} the "
                     f"step time, accuracy {100 * lora['accuracy']:.2f}% against {100 * plain['accuracy']:.2f}%.")
    lines += ["", "![full fine-tuning, plain peft and peftmm: memory and step time](bench/results/compare_peft.png)"]
    return "\n".join(lines)


def cache(data: dict | None = None) -> str:
    """Epoch time with the frozen-feature cache and without it (bench/cache_bench.py)."""
    data = data or json.loads((RESULTS / "cache_bench.json").read_text())
    runs, summary = data["runs"], data["summary"]
    epochs = [e["epoch"] for e in summary["per_epoch"]]
    metric = next((k for k in runs["cache"]["primary"] if k != "test_loss"), "test_loss")
    lines = [f"| {data['recipe']} | cache fill (train + val) | " + " | ".join(f"epoch {e}" for e in epochs) +
             f" | whole run | test {metric[5:].replace('_', ' ')} |", "|---|" + "---:|" * (len(epochs) + 3)]
    for name, label in (("cache", "with the cache (default, in memory)"),
                        ("disk-cold", "`train.feature_cache_dir`, first run (writes)"),
                        ("disk-warm", "`train.feature_cache_dir`, second run (reads)"),
                        ("no-cache", "`cache_features: false`")):
        if name not in runs:
            continue
        r = runs[name]
        fill = f"{r['cache_fill_seconds']:.1f} s" if r["cache_fill_seconds"] else "–"
        lines.append(f"| {label} | {fill} | " + " | ".join(f"{e['loop_seconds'] + (e['val_seconds'] or 0):.1f} s"
                                                         for e in r["epochs"]) +
                     f" | {r['wall_seconds']:.0f} s | {100 * r['primary'][metric]:.2f}% |")
    lines.append("| no cache / cache | | " + " | ".join(_times(e["no_cache_over_cache"]) for e in summary["per_epoch"])
                 + f" | {_times(summary['whole_run_no_cache_over_cache'])} | |")
    m, sizes = summary["metrics"], runs["cache"]["split_sizes"]
    same = (f"identical in both runs ({m['compared']} numbers: every epoch's validation metrics, the test metrics "
            "and each step's loss)" if m["identical"] else
            f"not bit-identical: largest difference {m['max_abs_diff']:.2g} ({m['max_diff_at']}), "
            f"{m['test_max_abs_diff']:.2g} in the test metrics")
    lines += ["", f"{sizes['train']:,} training examples, {sizes['val']:,} val and {sizes['test']:,} test, "
              f"on {runs['cache']['device']}. An epoch is its training loop and its validation; the first epoch "
              f"with the cache, fill included, took {summary['cache_first_epoch_with_fill_seconds']:.1f} s "
              f"(no cache / cache: {_times(summary['first_epoch_no_cache_over_cache_with_fill'])}). "
              f"Final metrics: {same}."]
    if "disk_warm_vs_cold_metrics" in summary:
        warm = summary["disk_warm_vs_cold_metrics"]
        lines[-1] += (f" On disk: the second run read the features in "
                      f"{runs['disk-warm']['cache_fill_seconds']:.1f} s instead of encoding them in "
                      f"{runs['disk-cold']['cache_fill_seconds']:.1f} s "
                      f"({_times(summary['disk_fill_cold_over_warm'])}; whole run "
                      f"{_times(summary['disk_whole_run_cold_over_warm'])}), and its numbers are "
                      + ("identical to the first's." if warm["identical"] else
                         f"not identical to the first's (largest difference {warm['max_abs_diff']:.2g})."))
        lines[-1] += " " + _reproducibility(runs)
    return "\n".join(lines)


def _first_step_apart(a: dict, b: dict) -> tuple[int, float] | None:
    """The first step whose logged loss differs between two runs' numbers, and by how much."""
    steps = sorted(int(k.split()[1]) for k in a if k.startswith("step ") and k in b)
    return next(((s, abs(a[f"step {s} loss"] - b[f"step {s} loss"])) for s in steps
                 if a[f"step {s} loss"] != b[f"step {s} loss"]), None)


def _reproducibility(runs: dict) -> str:
    """Whether the runs' differences come from the cache: the in-memory and the first disk run
    compute the same features the same way, so anything between them is the training itself."""
    same = _first_step_apart(runs["cache"]["numbers"], runs["disk-cold"]["numbers"])
    if same is None:
        return "The in-memory run and the first disk run (the same features, computed the same way) are identical."
    names = list(runs)
    pairs = [_first_step_apart(runs[x]["numbers"], runs[y]["numbers"]) for i, x in enumerate(names)
             for y in names[i + 1:]]
    agree = min(p[0] for p in pairs if p) - 1
    accuracy = [r["primary"]["test_accuracy"] for r in runs.values() if "test_accuracy" in r["primary"]]
    return (f"The in-memory run and the first disk run compute the same features the same way, yet their step "
            f"losses part at step {same[0]} (by {same[1]:.1g}); every pair of runs agrees for the first {agree} "
            f"steps, then drifts at float precision (test accuracy within {100 * (max(accuracy) - min(accuracy)):.1f} "
            "points): the training itself is not bit-reproducible run to run here, cache or not.")


def distributed(data: dict | None = None) -> str:
    """1 process against N: same recipe, seed and global batch (bench/distributed_check.py)."""
    data = data or json.loads((RESULTS / "distributed.json").read_text())
    lines = ["| recipe (overrides) | processes | wall | train loop | steps | test metric | largest weight "
             "difference from 1 process | largest step-loss difference |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for check in data["checks"]:
        label = f"{Path(check['recipe']).stem} (`{' '.join(check['overrides'])}`)"
        for r in check["runs"]:
            metric = next(k for k in ("test_accuracy", "test_mean_recall", "test_unigram_f1") if k in r["metrics"])
            against = r.get("against_1")
            weights = (f"{against['max_weight_diff']:.2g} (`{against['max_weight_diff_tensor']}`, of weights up to "
                       f"{against['max_weight']:.2f})" if against else "")
            losses = f"{against['max_step_loss_diff']:.2g}" if against else ""
            lines.append(f"| {label} | {r['processes']} | {r['wall_seconds']:.0f} s | {r['train_seconds']:.1f} s | "
                         f"{r['steps']} | {metric[5:].replace('_', ' ')} {100 * r['metrics'][metric]:.2f}% | "
                         f"{weights} | {losses} |")
            label = ""
    return "\n".join(lines)




TABLES = {"bundle": bundle_table, "methods": methods, "runtime": runtime, "serve": serve, "walltime": walltime,
          "emoji": emoji_tables.emoji, "plan": plan, "peft": peft, "cache": cache, "distributed": distributed,
          "hub": hub,
          "serve-openai": serve_openai, "image-bomb": image_bomb, "hf-memory": hf_memory,
          "gpu-smoke": gpu_smoke, "serve-instruct": serve_instruct, "instruct-bundle": instruct_bundle,
          "instruct-handwired": instruct_tables.handwired,
          "instruct-generation": instruct_tables.generation, "method-table": method_tables.method_table,
          "soups": method_tables.soups}
FILES = {"bundle": "default_bundle.json", "methods": "methods.md", "walltime": "main_walltime.json",
         "emoji": "emoji_baselines.json", "plan": "plan_check.json", "peft": "compare_peft.json",
         "cache": "cache_bench.json", "hub": "hub_plans.json", "serve-openai": "serve-openai.json",
         "image-bomb": "image_bomb.json", "hf-memory": "hf_memory.json",
         "gpu-smoke": "gpu_smoke_cpu.json", "instruct-handwired": "instruct_handwired.json",
         "instruct-generation": "instruct_generation.json", "method-table": "method_table.json",
         "soups": "soups.json", "instruct-bundle": "instruct_bundle.json"}
MARKER = re.compile(r"^<!-- (/?)bench:([\w-]+) -->$", re.M)   # a marker is a line of its own
# A markdown link or image target that is a path in this repository: no scheme, no anchor-only.
LINK = re.compile(r"(\]\()(?![a-z][a-z0-9+.-]*:|#|/)([^)\s]+)(\))")


def documents() -> list[Path]:
    """The files that may hold table blocks: the README and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _rebase(block: str, where: Path) -> str:
    """Links in a rendered block are relative to the repository root; make them relative to ``where``."""
    prefix = os.path.relpath(ROOT, where.parent)
    if prefix == ".":
        return block
    return LINK.sub(lambda m: m.group(1) + Path(os.path.relpath(ROOT / m.group(2), where.parent)).as_posix()
                    + m.group(3), block)


def render(text: str, where: Path | None = None) -> str:
    """``text`` with every table block whose JSON exists rendered afresh; ``where`` is the file the
    text belongs to (default README.md), for the blocks' relative links."""
    where = where or ROOT / "README.md"
    unknown = {m.group(2) for m in MARKER.finditer(text)} - set(TABLES)
    if unknown:
        raise ValueError(f"{where}: unknown table block(s) {sorted(unknown)}; known: {sorted(TABLES)}")
    for name, make in TABLES.items():
        pattern = re.compile(rf"(^<!-- bench:{name} -->\n)(?:.*?\n)?(^<!-- /bench:{name} -->$)", re.S | re.M)
        if pattern.search(text) and (RESULTS / FILES.get(name, f"{name}.json")).exists():
            block = _rebase(make(), where)
            text = pattern.sub(lambda m, block=block: m.group(1) + block + "\n" + m.group(2), text)
    return text


def stale() -> list[Path]:
    """The documents whose table blocks differ from what the JSON renders."""
    return [path for path in documents() if render(path.read_text(), path) != path.read_text()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    try:
        _run(args.check)
    except ValueError as error:
        sys.exit(f"error: {error}")


def _run(check: bool) -> None:
    if check:
        behind = stale()
        for path in behind:
            print(f"stale tables: {path.relative_to(ROOT)}", file=sys.stderr)
        sys.exit(1 if behind else 0)
    # every page is rendered before any is written: an error leaves them all as they were
    pages = {path: path.read_text() for path in documents()}
    rendered = {path: render(text, path) for path, text in pages.items()}
    for path, text in rendered.items():
        if text != pages[path]:   # untouched pages keep their modification time
            atomic_write_text(path, text)
            print(f"rendered {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
