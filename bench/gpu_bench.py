"""int8 against bf16 backbones on one CUDA GPU: peak memory and step time of a few training steps.

    .venv/bin/python bench/gpu_bench.py                      # every variant, well under 5 minutes
    .venv/bin/python bench/gpu_bench.py --variants minilm-int8,minilm-bf16 --steps 20
    .venv/bin/python bench/gpu_bench.py --validate           # only check the variants' recipes (no GPU needed)

Without a CUDA device it stops at once with exit code 2 and says so.

Variants, all the default recipe (recipes/easy-vqa-lora.yaml: frozen MobileNetV2, LoRA r=4 in the
text tower, gated cross-attention, VQA on easy-VQA) with the text tower at the variant's precision
and MobileNetV2 at bf16 in every variant: it has no Linear layer (1x1 convolutions instead), so
int8 would quantise nothing in it, and the comparison is the text tower's:

- ``minilm-int8`` / ``minilm-bf16``: MobileNetV2 + MiniLM-L6 (the recipe's own text tower);
- ``smollm2-int8`` / ``smollm2-bf16``: MobileNetV2 + SmolLM2-135M as the text tower, LoRA on its
  q_proj/v_proj (only when the zoo has smollm2-135m).

Every variant's quantised towers are checked to hold Linear layers bitsandbytes replaces
(``quantised_layers``; recorded per variant): one that would quantise nothing is refused.

Each runs in its own process through peftmm's trainer (bench/compare_peft.py's probed child),
``--steps`` optimizer steps of ``--batch-size`` shuffled questions from the first steps x batch
training questions (one epoch), then validation and test on the first ``--eval-samples``. As in
any peftmm run on CUDA, ``train.mixed_precision: auto`` computes in bf16 autocast; int8 weights
go through bitsandbytes' int8 matmul. Recorded: torch.cuda.max_memory_allocated and
max_memory_reserved over the whole run (the peak counters are reset once the data is loaded,
before the model), the allocated peak up to the last training step, and the median interval
between optimizer steps (the device synchronised at each) after ``--warmup`` steps.

A time budget (``--budget``, 240 s by default) keeps the whole command within 5 minutes: a
variant that would start after it is spent is recorded as skipped. Writes OUT/gpu_bench.json
(OUT: --out, default bench/results); each child's log goes to OUT/runs/gpu_bench/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peft import ROOT, common_overrides, spawn, summarise  # noqa: E402

RECIPE = ROOT / "recipes" / "easy-vqa-lora.yaml"
SMOLLM = ["text.backbone=smollm2-135m", "text.methods.0.targets=[q_proj,v_proj]"]
VARIANTS = {
    "minilm-int8": ["vision.precision=bf16", "text.precision=int8"],
    "minilm-bf16": ["vision.precision=bf16", "text.precision=bf16"],
    "smollm2-int8": [*SMOLLM, "vision.precision=bf16", "text.precision=int8"],
    "smollm2-bf16": [*SMOLLM, "vision.precision=bf16", "text.precision=bf16"],
}
NO_CUDA = 2   # the exit code when there is no GPU to measure


def available() -> list[str]:
    """The variants whose backbones the zoo has (smollm2-135m may be missing from an older zoo)."""
    from peftmm import zoo

    return [v for v in VARIANTS if not v.startswith("smollm2") or zoo.is_zoo_name("smollm2-135m")]


def quantised_layers(recipe) -> dict[str, int]:
    """Per int8/nf4 tower of ``recipe``, how many Linear layers bitsandbytes would replace (the
    models built on the meta device: no weights load)."""
    from torch import nn

    from peftmm.backbones import QUANTIZATION_SKIP, blueprint

    counts = {}
    for name in ("vision", "text"):
        spec = getattr(recipe, name)
        if spec.precision in ("int8", "nf4"):
            model = blueprint(name, spec.backbone, image_size=spec.image_size).empty_model()
            counts[name] = sum(isinstance(m, nn.Linear) and not any(s in n.split(".") for s in QUANTIZATION_SKIP)
                               for n, m in model.named_modules())
    return counts


def check_quantises(variant: str, recipe) -> dict[str, int]:
    counts = quantised_layers(recipe)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise SystemExit(f"gpu_bench: variant {variant}: the {' and '.join(empty)} tower "
                         f"({', '.join(getattr(recipe, n).backbone for n in empty)}) has no Linear layer, so "
                         f"{getattr(recipe, empty[0]).precision} would quantise nothing in it")
    return counts


def validate(variants: list[str], settings: dict) -> None:
    """Build every variant's recipe with its overrides and check what it quantises (no weights load)."""
    import peftmm

    for name in variants:
        recipe = peftmm.load_recipe(RECIPE, common_overrides(settings) + VARIANTS[name])
        print(f"{name}: vision {recipe.vision.backbone} {recipe.vision.precision}, text {recipe.text.backbone} "
              f"{recipe.text.precision}, text methods {recipe.to_dict()['text']['methods']}, quantised Linear "
              f"layers {check_quantises(name, recipe)}")


def cuda_device() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all available)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default 30)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=512, help="first N of val and test (default 512)")
    parser.add_argument("--warmup", type=int, default=5, help="step intervals left out of the median (default 5)")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no variant starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--validate", action="store_true", help="only check the variants' recipes and exit")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else available()
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    s = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "warmup": args.warmup,
         "train_samples": args.steps * args.batch_size, "eval_samples": args.eval_samples}
    if args.validate:
        validate(variants, s)
        return
    device = cuda_device()
    if device is None:   # the CPU numbers are bench/compare_peft.py's; this one measures a GPU or nothing
        print("gpu_bench: no CUDA device is present (torch.cuda.is_available() is False); this benchmark "
              "measures GPU memory and needs one. For CPU numbers run bench/compare_peft.py.", file=sys.stderr)
        sys.exit(NO_CUDA)
    import peftmm

    quantised = {name: check_quantises(name, peftmm.load_recipe(RECIPE, common_overrides(s) + VARIANTS[name]))
                 for name in variants}
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        for name in variants:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget:
                rows.append({"variant": name, "skipped": f"time budget of {args.budget:.0f} s spent ({elapsed:.0f} s)"})
                print(f"{name}: skipped, budget spent", file=sys.stderr, flush=True)
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            payload = {"name": name, "kind": "peftmm", "recipe": str(RECIPE),
                       "overrides": common_overrides(s) + VARIANTS[name], "run_dir": str(Path(scratch) / name)}
            row = summarise(name, spawn(payload, args.out / "runs" / "gpu_bench" / f"{name}.log"), s)
            row.pop("label")
            row["overrides"] = VARIANTS[name]
            row["quantised_linear_layers"] = quantised[name]
            rows.append(row)
            print(f"  max allocated {row['cuda_max_allocated'] / 2**20:,.0f} MiB, reserved "
                  f"{row['cuda_max_reserved'] / 2**20:,.0f} MiB, median step {1000 * row['median_step_s']:.1f} ms, "
                  f"accuracy {row['accuracy']:.4f}, {row['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    data = {"device": device, "settings": s, "recipe": RECIPE.stem, "mixed_precision": "auto (bf16 autocast on CUDA)",
            "total_seconds": round(time.perf_counter() - started, 1), "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out / 'gpu_bench.json'} ({data['total_seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
