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


TABLES = {"methods": methods, "runtime": runtime, "serve": serve, "walltime": walltime}
FILES = {"methods": "methods.md", "walltime": "main_walltime.json"}


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
