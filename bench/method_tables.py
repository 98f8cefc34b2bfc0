"""docs/method-table.md's tables, rendered from bench JSON by bench/readme_tables.py (blocks
``method-table``: bench/method_table.py; ``soups``: bench/soups.py)."""

from __future__ import annotations

import json
from pathlib import Path

from table_format import mib, pct

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

def _settings(a: dict) -> str:
    """A method's recipe settings as the spec gives them (targets and tuner options: see the spec)."""
    parts = [f"{m['type']}({', '.join(f'{k}={v}' for k, v in m.items() if k not in ('type', 'targets', 'options'))})"
             .replace("()", "") for m in a["methods"]]
    return " + ".join(parts) + "".join(f"; `{s}`" for s in a["set"]) if parts else "none: the tower stays frozen"


def _overrides_line(differs: dict) -> str:
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(differs.items()))


def method_table(data: dict | None = None) -> str:
    """One table per task: each method's test metrics (mean ± std over seeds, in %), size, time, memory."""
    data = data or json.loads((RESULTS / "method_table.json").read_text())
    blocks = []
    for t, task in data["tasks"].items():
        rows = [a for a in data["aggregates"] if a["task"] == t]
        if not rows:
            continue
        metrics = task["metrics"]
        beyond = {k: v for a in rows for k, v in a["beyond_method"].items()}
        caption = (f"**{t}**: [`{task['recipe']}`]({task['recipe']}), each method in the {task['tower']} tower; "
                   "test metrics in %, mean ± std over the seeds")
        caption += (f"; every run also differs from the recipe by {_overrides_line(beyond)} (a reduced run, not the "
                    "recipe's own size)." if beyond else "; otherwise as the recipe is written.")
        lines = [caption, "", "| method | settings | " + " | ".join(m.replace("_", " ") for m in metrics)
                 + " | trainable params | share | adapter bytes | train loop | whole run | peak RSS | seeds |",
                 "|---|---|" + "---:|" * (len(metrics) + 6) + "---|"]
        for a in rows:
            m = a["metrics"]
            lines.append(f"| {a['method']} | {_settings(a)} | " + " | ".join(pct(m, k) for k in metrics)
                         + f" | {m['trainable_params']['mean']:,.0f} | {100 * m['trainable_share']['mean']:.3f}% | "
                         f"{m['adapter_bytes']['mean']:,.0f} | {m['train_seconds']['mean']:,.0f} s | "
                         f"{m['wall_seconds']['mean']:,.0f} s | {mib(m['peak_rss_bytes']['mean'])} | "
                         f"{', '.join(map(str, a['seeds']))}{' (resumed)' if a['resumed'] else ''} |")
        blocks.append("\n".join(lines))
    if not blocks:
        return "No method-table runs collected yet."
    png = "bench/results/method_table.png"
    return "\n\n".join(blocks) + (f"\n\n![the method table]({png})" if (ROOT / png).is_file() else "")


def _metric_cells(metrics: dict, keys: list[str]) -> str:
    return " | ".join(f"{100 * metrics[k]:.1f}" if k in metrics else "–" for k in keys)


def soups(data: dict | None = None) -> str:
    """Seed soups against their seeds, and merges of two tasks' bundles against each bundle (bench/soups.py)."""
    data = data or json.loads((RESULTS / "soups.json").read_text())
    lines = []
    for soup in data["seeds"]:
        keys = soup["metrics"]
        start = soup.get("start")
        caption = f"**{soup['task']} / {soup['method']}" + (f", from seed {start['seed']}'s bundle" if start else "") \
            + f"**: `peftmm merge` of seeds {', '.join(str(s['seed']) for s in soup['members'])}" \
            + (f", each trained on from seed {start['seed']}'s bundle (`init_from`: one start, other data order, "
               "augmentation and dropout)" if start else ", each trained from scratch") \
            + "; every bundle evaluated by `peftmm eval` on the same test split (%)"
        if soup["beyond_method"]:
            caption += f"; the runs differ from the recipe by {_overrides_line(soup['beyond_method'])}"
        lines += [caption + ".", "", "| bundle | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        if start:
            lines.append(f"| the start (seed {start['seed']}'s bundle) | {_metric_cells(start['test'], keys)} |")
        lines += [f"| seed {s['seed']} | {_metric_cells(s['test'], keys)} |" for s in soup["members"]]
        lines += [f"| mean of the seeds | {_metric_cells(soup['seed_mean'], keys)} |",
                  *(f"| **soup** (`--method {how}`, equal weights) | {_metric_cells(metrics, keys)} |"
                    for how, metrics in soup["soups"].items()), ""]
    for merge in data["across_tasks"]:
        keys = merge["metrics"]
        lines += [f"**{merge['name']}**: `peftmm merge --method {merge['method']} --density {merge['density']}` of "
                  f"{' and '.join(f'`{n}`' for n in merge['tasks'])} (seed {merge['seed']}), each test split (%).", "",
                  "| test split | bundle | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---|---|" + "---:|" * len(keys)]
        for split, by_bundle in merge["evaluations"].items():
            for bundle, metrics in by_bundle.items():
                lines.append(f"| {split} | {bundle} | {_metric_cells(metrics, keys)} |")
        lines += ["", f"A merged bundle keeps its first source's recipe (prompt, data), so the merge is made once "
                  f"with each bundle first; the two orders' tensors differ by at most "
                  f"{merge['orders_largest_difference']:.2g}."
                  + (f" The runs differ from their recipes by {_overrides_line(merge['beyond_method'])}."
                     if merge["beyond_method"] else ""), ""]
    png = "bench/results/soups.png"
    text = "\n".join(lines).strip() or "No soups measured yet."
    return text + (f"\n\n![the soups and merges]({png})" if lines and (ROOT / png).is_file() else "")
