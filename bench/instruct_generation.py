"""Generation speed of an instruct bundle: peftmm's Predictor beside transformers' ``generate``, merged.

    .venv/bin/python bench/instruct_generation.py                        # trains a tiny bundle first
    .venv/bin/python bench/instruct_generation.py --bundle adapters/easy-vqa-instruct
    .venv/bin/python bench/instruct_generation.py --repeats 1 --max-new-tokens 8 --out /tmp/ig   # smoke

The bundle: ``--bundle``, else adapters/easy-vqa-instruct when it exists, else one trained here
for ``--train-steps`` steps from ``--recipe`` (default recipes/easy-vqa-instruct.yaml; enough for speed: the weights
only need to be the recipe's shapes), kept in OUT/runs/instruct_generation/ for the next run.
Its adapter is also put on an fp32 LM (the same tensors, ``load_trainable_state_dict``, saved as
a second bundle) so that LoRA can be merged, which int8 weights do not allow. Variants, all in this process, on
the same requests (easy-VQA test images, the prompt ``--prompt``), greedy, at most
``--max-new-tokens`` new tokens, stopping at the end-of-turn token:

- ``peftmm-<precision>``: ``Predictor.load(bundle).generate_batch`` as the bundle trained (int8 LM
  with LoRA unmerged, for the recipe);
- ``peftmm-fp32``: the same adapter on the fp32 LM, LoRA unmerged;
- ``peftmm-fp32-merged``: the same, ``Predictor.load(..., merge=True)``;
- ``transformers-merged``: what a user writes without peftmm: the bundle's LoRA exported to a
  peft folder (peftmm.peft_interop.export_peft), ``PeftModel.from_pretrained`` on the fp32
  ``AutoModelForCausalLM`` and ``merge_and_unload``; MobileNetV2 through ``AutoModel``, its 49
  tokens average-pooled in order to the projector's count, the bundle's projector weights in a
  hand-written projector, the image's embeddings in the chat-template prompt's slots, then
  ``model.generate(inputs_embeds=...)``.

Each call is timed whole: image preprocessing, the vision tower, projector, prefill and the
KV-cached decoding. Tokens per second = the completion tokens of the call's rows (each row's
tokens through its end-of-turn token, as the API's ``usage`` counts them; a batch runs until
its longest row ends) over the call's wall time; the median over ``--repeats`` calls, variants
interleaved call by call (this machine is shared: ratios are taken within one run). Batch 1
cycles through the requests one at a time; batch 16 answers 16 of them together. Every
variant's answers are compared with transformers' (text and token count per request).

Writes OUT/instruct_generation.json and .png (OUT: --out, default bench/results);
bench/readme_tables.py's ``instruct-generation`` renders docs/instruct.md's table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peft import ROOT  # noqa: E402
from instruct_handwired import Projector, prompt_ids  # noqa: E402

RECIPE = ROOT / "recipes" / "easy-vqa-instruct.yaml"
SHIPPED = ROOT / "adapters" / "easy-vqa-instruct"
BATCHES = (1, 16)


def train_tiny(recipe: Path, steps: int, folder: Path) -> Path:
    """A bundle of ``steps`` steps from the recipe, trained into ``folder`` once and reused."""
    import peftmm

    if (folder / "run" / "bundle" / "adapter_model.safetensors").is_file():
        return folder / "run" / "bundle"
    overrides = [f"train.max_steps={steps}", "train.batch_size=8", "train.epochs=1", "train.group_by_image=false",
                 f"data.max_train_samples={8 * steps}", "data.max_eval_samples=8"]
    return peftmm.train(peftmm.load_recipe(recipe, overrides), folder / "run", progress=False).bundle_dir


def on_fp32(bundle: Path, folder: Path) -> Path:
    """The bundle's adapter, memory and recipe on the fp32 LM, saved as a bundle of its own."""
    from peftmm import recipe as recipes
    from peftmm.bundle import load_bundle, save_bundle
    from peftmm.model import MultimodalModel

    model, recipe, config = load_bundle(bundle)
    if recipe.text.precision == "fp32":
        return bundle
    data = recipe.to_dict()
    data["text"]["precision"] = "fp32"
    fp32 = recipes.from_dict(data)
    copy = MultimodalModel.build(fp32, config["labels"])
    copy.load_trainable_state_dict(model.trainable_state_dict())
    copy.task.load_memory(model.task.memory_tensors())
    return save_bundle(copy, fp32, folder / "fp32-bundle", config.get("metrics"))


class PeftmmSide:
    def __init__(self, bundle: Path, merge: bool, prompt: str, max_new_tokens: int):
        from peftmm.predict import Predictor

        self.predictor = Predictor.load(bundle, device="cpu", merge=merge)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def __call__(self, images: list[str]) -> list[dict]:
        replies = self.predictor.generate_batch([{"messages": [{"role": "user", "content": self.prompt}], "image": i}
                                                 for i in images], max_new_tokens=self.max_new_tokens)
        return [{"text": r["text"], "tokens": r["completion_tokens"]} for r in replies]


class TransformersSide:
    """The bundle's model rebuilt from transformers, peft and the bundle's own tensors."""

    def __init__(self, bundle: Path, prompt: str, max_new_tokens: int, folder: Path):
        from peft import PeftModel
        from plain_peft import make_preprocess
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from peftmm.backbones import resolve_source
        from peftmm.bundle import read_config, read_tensors
        from peftmm.peft_interop import export_peft

        recipe = read_config(bundle)["recipe"]
        where = {name: resolve_source(recipe[name]["backbone"]) for name in ("vision", "text")}
        self.vision = AutoModel.from_pretrained(where["vision"]).eval()
        lm = AutoModelForCausalLM.from_pretrained(where["text"], dtype=torch.float32)
        exported = export_peft(bundle, "text", folder / "peft-lora", base_path=where["text"])
        self.lm = PeftModel.from_pretrained(lm, exported).merge_and_unload().eval()
        self.tokenizer = AutoTokenizer.from_pretrained(where["text"])
        self.tokens = recipe["fusion"]["max_tokens"]
        weights = {k.removeprefix("fusion."): v for k, v in read_tensors(bundle).items() if k.startswith("fusion.")}
        hidden, width = weights["mlp.0.weight"].shape
        self.projector = Projector(width, self.lm.config.hidden_size, hidden, "norm.weight" in weights)
        self.projector.load_state_dict(weights)
        self.projector.eval()
        self.preprocess = make_preprocess(where["vision"], recipe["vision"].get("image_size") or 224)
        fill = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.ids, self.start = prompt_ids(self.tokenizer, prompt, self.tokens, fill)
        self.stop = self.tokenizer.eos_token_id   # SmolLM2's <|im_end|>, its generation config's EOS too
        self.config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       eos_token_id=self.stop, pad_token_id=fill)

    @torch.no_grad()
    def __call__(self, images: list[str]) -> list[dict]:
        pixels = torch.stack([self.preprocess(i) for i in images])
        features = self.vision(pixel_values=pixels).last_hidden_state.flatten(2)      # [B, C, 49]
        if features.shape[2] > self.tokens:   # as the projector pools: runs of neighbouring tokens, in order
            features = F.adaptive_avg_pool1d(features, self.tokens)
        image = self.projector(features.transpose(1, 2))
        ids = torch.tensor([self.ids] * len(images))
        embeds = self.lm.get_input_embeddings()(ids)
        embeds = torch.cat([embeds[:, :self.start], image, embeds[:, self.start + self.tokens:]], 1)
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                               generation_config=self.config)
        rows = []
        for row in out.tolist():
            end = next((i for i, t in enumerate(row) if t == self.stop), None)
            kept = row if end is None else row[:end]
            rows.append({"text": self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                         "tokens": len(kept) + (end is not None)})
        return rows


def requests(count: int) -> list[str]:
    """The first ``count`` distinct easy-VQA test images."""
    from peftmm import load_recipe
    from peftmm.data import load_splits

    images = dict.fromkeys(str(e["image"]) for e in load_splits(load_recipe(RECIPE).data).test)
    return list(images)[:count]


def measure(sides: dict, images: list[str], repeats: int) -> dict:
    """Per batch size and variant: each call's seconds and completion tokens, the answers of the
    first pass over the requests, and the median tokens per second."""
    results = {}
    for size in BATCHES:
        calls = [images[i: i + size] for i in range(0, len(images), size)][: max(repeats, 1)]
        runs = {name: {"seconds": [], "tokens": [], "answers": []} for name in sides}
        for rep in range(repeats):
            chunk = calls[rep % len(calls)]
            for name, side in sides.items():   # interleaved: a slow spell of the machine hits every variant
                started = time.perf_counter()
                answers = side(chunk)
                runs[name]["seconds"].append(time.perf_counter() - started)
                runs[name]["tokens"].append(sum(a["tokens"] for a in answers))
                if rep < len(calls):
                    runs[name]["answers"] += answers
        for run in runs.values():
            rates = [t / s for t, s in zip(run["tokens"], run["seconds"])]
            run["tokens_per_s"] = statistics.median(rates)
            run["median_call_s"] = statistics.median(run["seconds"])
        results[str(size)] = runs
    return results


def agreement(results: dict, reference: str = "transformers-merged") -> dict:
    """Per variant: requests whose answer (text and token count) is transformers' own."""
    out = {}
    for size, runs in results.items():
        ref = runs[reference]["answers"]
        out[size] = {name: {"same": sum(a == b for a, b in zip(run["answers"], ref)), "of": len(ref)}
                     for name, run in runs.items() if name != reference}
    return out


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(11, 4))
    for ax, size in zip(axes, BATCHES):
        runs = data["results"][str(size)]
        names = list(runs)
        rates = [runs[n]["tokens_per_s"] for n in names]
        ax.bar(range(len(names)), rates, color=["tab:blue"] * (len(names) - 1) + ["tab:gray"])
        for i, rate in enumerate(rates):
            ax.annotate(f"{rate:.1f}", (i, rate), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"batch {size}: completion tokens per second (median)")
        ax.margins(y=0.2)
    s = data["settings"]
    fig.suptitle(f"greedy, at most {s['max_new_tokens']} new tokens, {s['repeats']} calls per variant, "
                 f"{data['device']}", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an instruct bundle (default: adapters/easy-vqa-instruct, "
                                                    "else one trained here)")
    parser.add_argument("--train-steps", type=int, default=4, help="steps of the bundle trained here (default 4)")
    parser.add_argument("--recipe", type=Path, default=RECIPE,
                        help="what that bundle trains (default: the repository's easy-vqa-instruct.yaml)")
    parser.add_argument("--prompt", default="Describe the image in detail.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant and batch size")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--render", action="store_true", help="only redraw the chart from the JSON")
    args = parser.parse_args()
    path = args.out / "instruct_generation.json"
    if args.render:
        chart(json.loads(path.read_text()), args.out / "instruct_generation.png")
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="instruct-generation-") as scratch:
        scratch = Path(scratch)
        bundle = args.bundle or (SHIPPED if SHIPPED.is_dir() else None)
        trained_here = bundle is None
        if trained_here:
            print(f"training a {args.train_steps}-step bundle from {args.recipe} ...", file=sys.stderr, flush=True)
            kept = args.out / "runs" / "instruct_generation" / f"{args.recipe.stem}-{args.train_steps}-steps"
            bundle = train_tiny(args.recipe, args.train_steps, kept)
        from peftmm.bundle import read_config

        precision = read_config(bundle)["recipe"]["text"]["precision"]
        fp32 = on_fp32(bundle, scratch)
        settings = (args.prompt, args.max_new_tokens)
        sides = {} if fp32 == bundle else {f"peftmm-{precision}": PeftmmSide(bundle, False, *settings)}
        sides |= {"peftmm-fp32": PeftmmSide(fp32, False, *settings),
                  "peftmm-fp32-merged": PeftmmSide(fp32, True, *settings),
                  "transformers-merged": TransformersSide(fp32, *settings, scratch)}
        images = requests(max(BATCHES) * max(args.repeats, 1))
        print(f"{len(sides)} variants, {args.repeats} calls each at batch {' and '.join(map(str, BATCHES))} ...",
              file=sys.stderr, flush=True)
        results = measure(sides, images, args.repeats)
    reference = "transformers-merged"
    lora = next(m for m in read_config(bundle)["recipe"]["text"]["methods"] if m["type"] == "lora")
    data = {"bundle": "trained here" if trained_here else str(bundle), "bundle_precision": precision,
            "recipe": read_config(bundle)["name"], "lora": {k: lora[k] for k in ("r", "alpha", "targets")},
            "train_steps": args.train_steps if trained_here else None, "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "settings": {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                         "batches": list(BATCHES), "decoding": "greedy"},
            "results": results, "agreement": agreement(results, reference),
            "ratios": {size: {name: run["tokens_per_s"] / runs[reference]["tokens_per_s"] for name, run in runs.items()}
                       for size, runs in results.items()},
            "reached_max_new_tokens": {size: {name: sum(a["tokens"] >= args.max_new_tokens for a in run["answers"])
                                              for name, run in runs.items()} for size, runs in results.items()}}
    for size, runs in results.items():
        for name, run in runs.items():
            print(f"batch {size} {name}: {run['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    chart(data, args.out / "instruct_generation.png")
    print(f"wrote {path} and {args.out / 'instruct_generation.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
