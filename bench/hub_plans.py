"""`peftmm plan` for the recipes on real hub backbones (recipes/hub/), for docs/plan.md.

    .venv/bin/python bench/hub_plans.py        # every recipes/hub/*.yaml -> bench/results/hub_plans.json

Each recipe is estimated for a CUDA card (bf16 autocast where the recipe leaves
``mixed_precision: auto``), as `peftmm plan RECIPE --device cuda` prints it. Nothing is
downloaded: with the hub out of reach the backbone configs come from peftmm/hub_configs and
token counts from its ApproximateTokenizer, and each row says whether they did. Then
`bench/readme_tables.py` renders the docs/plan.md block from the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "hub_plans.json"


def plan(path: Path) -> dict:
    from peftmm.plan import Planner
    from peftmm.recipe import load

    recipe = load(path)
    estimate = Planner(recipe).estimate(device="cuda")
    d = estimate.details
    return {"recipe": recipe.name, "file": str(path.relative_to(ROOT)), "total": estimate.total,
            "parts": {p.name: p.bytes for p in estimate.parts},
            "trainable_params": d["trainable_params"],
            "backbones": {name: {"source": getattr(recipe, name).backbone, "precision": getattr(recipe, name).precision,
                                 "methods": [m.type for m in getattr(recipe, name).methods]}
                          for name in ("vision", "text")},
            "cards": {f"{gib} GiB": fits for gib, fits in estimate.cards().items()},
            "peak_phase": max(d["phases"], key=d["phases"].get), "train_batch": d["train_batch"],
            "mixed_precision": d["mixed_precision"], "checkpointed": d["checkpointed"],
            "cached": d["cached"], "offline_configs": d["offline"]}


def main() -> None:
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "recipes" / "hub").glob("*.yaml"))
    results = {row["recipe"]: row for row in map(plan, paths)}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for name, row in results.items():
        print(f"{name}: {row['total'] / 2**30:.2f} GiB; fits " +
              ", ".join(card for card, fits in row["cards"].items() if fits))


if __name__ == "__main__":
    main()
