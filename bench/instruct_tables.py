"""docs/instruct.md's measured tables, rendered from bench JSON by bench/readme_tables.py (blocks
``instruct-handwired``: bench/instruct_handwired.py; ``instruct-generation``: bench/instruct_generation.py)."""

from __future__ import annotations

import json
from pathlib import Path

from table_format import mib

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"transformers-merged": "transformers `generate`, LoRA merged (`merge_and_unload`), fp32",
            "peftmm-fp32-merged": "peftmm `Predictor`, LoRA merged (`merge=True`), fp32",
            "peftmm-fp32": "peftmm `Predictor`, LoRA unmerged, fp32"}


def _variant(name: str) -> str:
    if name in VARIANTS:
        return VARIANTS[name]
    return f"peftmm `Predictor`, LoRA unmerged, {name.removeprefix('peftmm-')} LM (as the recipe trains)"


def handwired(data: dict | None = None) -> str:
    data = data or json.loads((RESULTS / "instruct_handwired.json").read_text())
    rows = {r["side"]: r for r in data["results"]}
    hand, ours = rows["hand-wired"], rows["peftmm"]
    s, lora, ratios, same = data["settings"], data["lora"], data["ratios"], data["same_sequences"]
    lines = ["| per training step | hand-wired (transformers + peft, plain loop) | peftmm `instruct` |",
             "|---|---:|---:|",
             f"| trainable parameters | {hand['trainable_params']:,} | {ours['trainable_params']:,} |",
             f"| peak RSS up to the last step | {mib(hand['train_peak_rss'])} | {mib(ours['train_peak_rss'])} |",
             f"| of it above the baseline (libraries imported, data listed) | {mib(hand['train_above_baseline'])} | "
             f"{mib(ours['train_above_baseline'])} |",
             f"| median step, batch {s['batch_size']} | {hand['median_step_s']:.2f} s | "
             f"{ours['median_step_s']:.2f} s |",
             f"| CPU time of a step (median, all threads) | {hand['median_step_cpu_s']:.2f} s | "
             f"{ours['median_step_cpu_s']:.2f} s |",
             f"| samples/s | {hand['samples_per_s']:.2f} | {ours['samples_per_s']:.2f} |",
             f"| images | decoded, preprocessed and run through MobileNetV2 every step (median "
             f"{hand['median_vision_s']:.2f} s of the step) | features read from memory (computed once per "
             f"distinct image before training: {ours['cache_fill_seconds']:.1f} s) |",
             "| LM output layer | every position | only the positions that predict an answer token |",
             "",
             f"peftmm / hand-wired: **{ratios['memory_above_baseline']:.2f}x** the memory above the baseline "
             f"({ratios['memory_raw']:.2f}x the raw peak), **{ratios['step']:.2f}x** the step time "
             f"({ratios['step_cpu']:.2f}x its CPU time). "
             f"`{data['recipe']}` with {data['precision']['vision']} MobileNetV2 and {data['precision']['text']} "
             f"SmolLM2-135M, LoRA r {lora['r']} (alpha {lora['alpha']:g}) on {', '.join(lora['targets'])}, "
             f"{data['image_tokens']} image tokens; {s['steps']} optimizer steps of {s['batch_size']} questions "
             f"each, the same shuffled batches, median after {s['warmup']} warm-up steps, each side in its own "
             f"process on {hand['device']} ({hand['torch_threads']} threads). The hand-wired prompt encoding gives "
             f"peftmm's token ids and labels for {same['identical']:,} of {same['compared']:,} training questions "
             f"({same['mean_tokens']:.1f} tokens on average, image included).",
             "", "![hand-wired LLaVA against peftmm: memory and step time](bench/results/instruct_handwired.png)"]
    return "\n".join(lines)


def generation(data: dict | None = None) -> str:
    data = data or json.loads((RESULTS / "instruct_generation.json").read_text())
    results, ratios, agreement = data["results"], data["ratios"], data["agreement"]
    sizes = [str(b) for b in data["settings"]["batches"]]
    names = list(results[sizes[0]])
    lines = ["| variant | " + " | ".join(f"batch {b}: tokens/s | vs transformers" for b in sizes)
             + " | same answers as transformers |", "|---|" + "---:|---:|" * len(sizes) + "---|"]
    for name in names:
        cells = [f"{results[b][name]['tokens_per_s']:.1f} | {ratios[b][name]:.2f}x" for b in sizes]
        same = ", ".join(f"{agreement[b][name]['same']} of {agreement[b][name]['of']}" for b in sizes
                         if name in agreement[b]) or "(the reference)"
        lines.append(f"| {_variant(name)} | " + " | ".join(cells) + f" | {same} |")
    s = data["settings"]
    lora = data["lora"]
    trained = data["bundle"] == "trained here"
    bundle = (f"a bundle trained {data['train_steps']} steps from `{data['recipe']}`" if trained
              else f"`{data['bundle']}`") + f" (LoRA r {lora['r']} on {', '.join(lora['targets'])})"
    reached = data["reached_max_new_tokens"]
    reference = "transformers-merged"
    lines += ["", f"{bundle}, {data['bundle_precision']} LM; its adapter also put on the fp32 LM to merge it; "
              f"greedy, at most {s['max_new_tokens']} new tokens, stopping at the end-of-turn token, prompt "
              f"\"{s['prompt']}\" about easy-VQA test images; {s['repeats']} calls per variant and batch size, "
              f"interleaved, median tokens per second, on {data['device']} ({data['torch_threads']} threads). A "
              "call is timed whole (image preprocessing, vision tower, projector, prefill, KV-cached decoding); its "
              "tokens are the rows' completion tokens through the end-of-turn token (a batch runs until its longest "
              "row ends). Answers of transformers that reached the token limit: "
              + ", ".join(f"{reached[b][reference]} of {agreement[b][names[0]]['of']} at batch {b}" for b in sizes)
              + ".",
              "", "![generation speed: peftmm and transformers generate](bench/results/instruct_generation.png)"]
    return "\n".join(lines)
