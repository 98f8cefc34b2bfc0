"""Write the README's result tables from the benchmark JSON, so no number is typed by hand.

    .venv/bin/python bench/readme_tables.py           # rewrite the marked blocks in README.md
    .venv/bin/python bench/readme_tables.py --check   # exit 1 if a block differs from its JSON

Each table sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in README.md and is
rendered from bench/results/ (tests/test_readme.py runs the check).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def methods() -> str:
    return (RESULTS / "methods.md").read_text().strip()


def runtime() -> str:
    data = json.loads((RESULTS / "runtime.json").read_text())
    swap, memory = data["swap"], data["memory"]
    lines = ["| what | median | p95 |", "|---|---|---|"]
    for label, key in (("switch to another adapter (`Runtime.activate`)", "switch_s"),
                       ("one request, same adapter every call", "request_same_adapter_s"),
                       ("one request, adapter alternating every call", "request_alternating_adapters_s"),
                       ("load backbones + adapter from disk, then predict", "cold_load_and_predict_s")):
        lines.append(f"| {label} | {_ms(swap[key]['median'])} | {_ms(swap[key]['p95'])} |")
    lines += ["", f"Cold load over switch: **{swap['cold_over_switch']:,.0f}x** (medians); a request with "
              f"the adapter alternating costs {swap['alternating_over_same']:.2f}x one with the same adapter.", "",
              "| 10 adapters registered | file bytes | resident memory growth | tensor bytes added |",
              "|---|---|---|---|",
              f"| total | {memory['total_file_bytes']:,} | {memory['total_rss_growth_bytes']:,} | "
              f"{memory['total_tensor_growth_bytes']:,} |",
              f"| median per adapter | {sorted(r['file_bytes'] for r in memory['per_adapter'])[len(memory['per_adapter']) // 2]:,} | "
              f"{memory['median_rss_growth_bytes']:,.0f} | "
              f"{sorted(r['tensor_growth_bytes'] for r in memory['per_adapter'])[len(memory['per_adapter']) // 2]:,} |",
              "", "| LoRA, fp32 backbones | unmerged (median) | merged (median) | unmerged / merged | max logit diff |",
              "|---|---|---|---|---|"]
    for row in data["merge"]:
        lines.append(f"| {row['variant']}, batch {row['batch_size']} | {_ms(row['unmerged_s']['median'])} | "
                     f"{_ms(row['merged_s']['median'])} | {row['ratio']:.2f}x | {row['max_logit_diff']:.1e} |")
    return "\n".join(lines)


def serve() -> str:
    data = json.loads((RESULTS / "serve.json").read_text())
    return "\n".join([
        "| clients x requests | adapters | wrong or mixed answers | errors | p50 latency | p95 latency | throughput |",
        "|---|---|---|---|---|---|---|",
        f"| {data['clients']} x {data['requests_per_client']} | {', '.join(data['adapters'])} | "
        f"{data['wrong_or_mixed']} of {data['total']} | {data['errors']} | {_ms(data['latency_s']['p50'])} | "
        f"{_ms(data['latency_s']['p95'])} | {data['requests_per_s']:.1f} requests/s |"])


def walltime() -> str:
    data = json.loads((RESULTS / "main_walltime.json").read_text())
    return "\n".join([
        "| what | measured |", "|---|---|",
        f"| `make main` from a fresh clone, set-up included | {data['wall_seconds']:.0f} s ({data['wall_seconds'] / 60:.1f} min) |",
        f"| `peftmm eval` test accuracy of the bundle it trained | {100 * data['eval_test_accuracy']:.2f}% |",
        f"| its prediction for test image 0, \"{data['prediction']['question']}\" | {data['prediction']['answer']} |"])


# -- emoji tasks (issue 5): bench/emoji_tasks.py runs + bench/emoji_baselines.py reference points
EMOJI_ORDER = ["emoji-retrieval-projection", "emoji-retrieval", "emoji-caption", "emoji-group"]


def _pct(m: dict | None, key: str, scale: float = 100, digits: int = 1) -> str:
    """mean ± std over seeds (std only with two or more seeds); blank when the run lacks it."""
    if m is None or key not in m:
        return "–"
    value = m[key]
    text = f"{scale * value['mean']:.{digits}f}"
    return text + (f" ± {scale * value['std']:.{digits}f}" if value.get("std") is not None else "")


def _label(a: dict) -> str:
    return f"`{a['recipe']}` from `{a['chain_from']}` (init_from)" if a.get("chain_from") else f"`{a['recipe']}`"


def emoji(tasks: dict | None = None, baselines: dict | None = None) -> str:
    """Tables of whatever has been measured: recipes without runs are simply absent."""
    if tasks is None:
        path = RESULTS / "emoji_tasks.json"
        tasks = json.loads(path.read_text()) if path.exists() else {"aggregates": {}}
    if baselines is None and (RESULTS / "emoji_baselines.json").exists():
        baselines = json.loads((RESULTS / "emoji_baselines.json").read_text())
    runs = [a for a in tasks["aggregates"].values() if a["as_recipe"]]  # never runs with overrides
    runs.sort(key=lambda a: (EMOJI_ORDER.index(a["recipe"]) if a["recipe"] in EMOJI_ORDER else 99,
                             a.get("chain_from") or "", a["recipe"]))
    b = baselines or {}
    seeds = lambda a: str(len(a["seeds"]))  # noqa: E731
    recalls = [f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    lines = ["| retrieval, test split, recall (%) | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 "
             "| seeds |", "|---|---|---|---|---|---|---|---|"]
    for a in (a for a in runs if a["task"] == "retrieval"):
        lines.append(f"| {_label(a)} | " + " | ".join(_pct(a["metrics"], f"test_{r}") for r in recalls)
                     + f" | {seeds(a)} |")
    if "retrieval_chance" in b:
        c = b["retrieval_chance"]
        lines.append(f"| chance (K/N, N = {c['n']}) | " + " | ".join(f"{100 * c[r]:.1f}" for r in recalls) + " | – |")
    lines += ["", "| captioning, test split | exact match (%) | BLEU-4 (0-1) | CIDEr-D (0-10) | unigram F1 (%) "
              "| seeds |", "|---|---|---|---|---|---|"]
    for a in (a for a in runs if a["task"] == "captioning"):
        m = a["metrics"]
        lines.append(f"| {_label(a)} | {_pct(m, 'test_exact_match')} | {_pct(m, 'test_bleu4', 1, 3)} | "
                     f"{_pct(m, 'test_cider_d', 1, 3)} | {_pct(m, 'test_unigram_f1')} | {seeds(a)} |")
    if "nearest_neighbour_captioning" in b:
        n = b["nearest_neighbour_captioning"]
        lines += [f"| nearest neighbour: caption of the most similar train image | {100 * n['exact_match']:.1f} | "
                  f"{n['bleu4']:.3f} | {n['cider_d']:.3f} | {100 * n['unigram_f1']:.1f} | – |",
                  f"| oracle: best train caption per test image | – | – | – | "
                  f"{100 * n['oracle_best_train_caption_unigram_f1']:.1f} | – |"]
    groups = len(b["split"]["labels"]) if "split" in b else "the"
    lines += ["", f"| {groups} Unicode groups, test split | accuracy (%) | macro-F1 (%) | seeds |", "|---|---|---|---|"]
    for a in (a for a in runs if a["task"] == "classification"):
        lines.append(f"| {_label(a)}, trained | {_pct(a['metrics'], 'test_accuracy')} | "
                     f"{_pct(a['metrics'], 'test_macro_f1')} | {seeds(a)} |")
    for a in (a for a in runs if "zero_shot_accuracy" in a["metrics"]):
        lines.append(f"| {_label(a)}, zero-shot, prompt \"{tasks['template'].replace('{}', '<group>')}\" | "
                     f"{_pct(a['metrics'], 'zero_shot_accuracy')} | {_pct(a['metrics'], 'zero_shot_macro_f1')} | "
                     f"{seeds(a)} |")
    if "majority_class" in b:
        mc, probe = b["majority_class"], b["linear_probe"]
        lines += [f"| majority class of train ({mc['label']}) | {100 * mc['accuracy']:.1f} | "
                  f"{100 * mc['macro_f1']:.1f} | – |",
                  f"| logistic-regression probe on frozen pooled image features (L2 {probe['l2']:g}, chosen on val) | "
                  f"{100 * probe['accuracy']:.1f} | {100 * probe['macro_f1']:.1f} | – |", "",
                  f"The family split gives test other group shares than train: {mc['label']} is "
                  f"{100 * mc['train_share']:.1f}% of train but {100 * mc['accuracy']:.1f}% of test, whose largest "
                  f"group is {mc['test_majority_label']} ({100 * mc['test_majority_share']:.1f}%)."]
    chains = [(a, next((s for s in runs if s["recipe"] == a["recipe"] and not s.get("chain_from")), None))
              for a in runs if a.get("chain_from")]
    chains = [(a, s) for a, s in chains if s is not None]
    if chains:
        lines += ["", "| stage chain | test metric | with init_from | from scratch | seeds |", "|---|---|---|---|---|"]
        for a, s in chains:
            key = {"retrieval": "test_mean_recall", "captioning": "test_cider_d"}.get(a["task"], "test_accuracy")
            lines.append(f"| {_label(a)} | {key[5:]} | {_pct(a['metrics'], key)} | {_pct(s['metrics'], key)} | "
                         f"{seeds(a)} / {seeds(s)} |")
    if runs:
        lines += ["", "| recipe | trainable params | share | bundle bytes | train loop | whole run | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for a in runs:
            m = a["metrics"]
            mark = "" if a["wall_measured"] else " *"
            lines.append(f"| {_label(a)} | {m['trainable_params']['mean']:,.0f} | "
                         f"{100 * m['trainable_share']['mean']:.3f}% | {m['adapter_bytes']['mean']:,.0f} | "
                         f"{_pct(m, 'train_seconds', 1, 0)} s | {_pct(m, 'wall_seconds', 1, 0)} s{mark} | {seeds(a)} |")
        if not all(a["wall_measured"] for a in runs):
            lines.append("\n\\* trained outside bench/emoji_tasks.py: no whole-run time was measured, the train "
                         "loop's time stands in.")
    else:
        lines += ["", "No recipe runs collected yet: `bench/emoji_tasks.py` adds their rows."]
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def plan() -> str:
    """``peftmm plan --device cpu`` against the measured peak, per recipe (bench/plan_check.py)."""
    data = json.loads((RESULTS / "plan_check.json").read_text())
    lines = ["| recipe | estimate | max RSS | error | above baseline: estimate | measured | error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(data.items()):
        lines.append(f"| {name} | {_mib(r['estimate_total'])} | {_mib(r['raw_max_rss'])} | "
                     f"{100 * r['error_raw']:+.1f}% | {_mib(r['estimate_above_baseline'])} | "
                     f"{_mib(r['above_baseline'])} | {100 * r['error_above_baseline']:+.1f}% |")
    return "\n".join(lines)


TABLES = {"methods": methods, "runtime": runtime, "serve": serve, "walltime": walltime, "emoji": emoji,
          "plan": plan}
FILES = {"methods": "methods.md", "walltime": "main_walltime.json", "emoji": "emoji_baselines.json",
         "plan": "plan_check.json"}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        if pattern.search(text) and (RESULTS / FILES.get(name, f"{name}.json")).exists():
            text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    rendered = render(text)
    if args.check:
        sys.exit(0 if rendered == text else 1)
    readme.write_text(rendered)


if __name__ == "__main__":
    main()
