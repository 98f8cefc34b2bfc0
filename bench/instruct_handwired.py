"""The instruct recipe wired by hand (transformers + peft, a plain loop) against peftmm's trainer.

    .venv/bin/python bench/instruct_handwired.py                    # 15 steps of 32 each side
    .venv/bin/python bench/instruct_handwired.py --steps 3 --warmup 1 --batch-size 4 --out /tmp/ih   # smoke
    .venv/bin/python bench/instruct_handwired.py --recipe PATH.yaml --render    # redraw the chart

Two sides, each in its own process (so each one's peak memory is its own), on the same recipe
(default recipes/easy-vqa-instruct.yaml), the same training questions in the same shuffled
batches, the same number of optimizer steps:

- ``hand-wired``: what a user writes for LLaVA with transformers + peft and without peftmm.
  MobileNetV2 through ``AutoModel`` and SmolLM2 through ``AutoModelForCausalLM``, each at the
  recipe's precision (int8 through ``BitsAndBytesConfig``, with peftmm's per-device outlier
  threshold; transformers keeps the tied ``lm_head`` out of int8 on its own, as peftmm does, and
  bitsandbytes quantises Linear layers only, so MobileNetV2's convolutions stay fp32 on both
  sides); ``get_peft_model`` with the recipe's LoRA settings on the LM; the recipe's projector
  (LayerNorm when ``input_norm``, Linear, GELU, Linear) after the feature map is average-pooled
  2x2 to 4 tokens (peftmm pools the 49 tokens in their order to 4: the same shape and cost);
  the prompt rendered by a ChatML chat template without a default system prompt (as peftmm's
  default) with 4 image slots after ``<|im_start|>user\\n``; labels on the answer and its
  ``<|im_end|>``; ``model(inputs_embeds=..., labels=...)`` (logits at every position); AdamW and
  the recipe's schedule. Per step every question's image is decoded, preprocessed and run through
  the vision tower: no feature cache, no de-duplication of repeated images.
- ``peftmm``: ``peftmm.train`` on the recipe: vision features computed once per distinct image
  before training (the cache fill, timed apart) and read from memory each step; the LM's output
  layer only at the positions that predict an answer token.

Before the children run, the parent checks that the hand-wired prompt encoding gives exactly the
token ids and labels peftmm's gives for every training question used (``same_sequences``).

Measured per side (bench/compare_peft.py's probes): trainable parameters; the peak resident set
size up to the last training step, raw and above a baseline taken once the libraries are
imported and the data is listed; the median interval between optimizer steps after ``--warmup``
steps, and the median CPU time of a step (the process's, all threads: what a step costs when the
machine is shared, as it is here). The hand-wired side also times its per-step vision work (decode, preprocess, encode);
peftmm's side its cache fill. peftmm then evaluates (``--eval-samples`` questions), which the
hand-wired side does not: memory is compared up to the last training step.

Writes OUT/instruct_handwired.json and OUT/instruct_handwired.png (OUT: --out, default
bench/results); bench/readme_tables.py's ``instruct-handwired`` renders docs/instruct.md's table.
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
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peft import ROOT, Probe, common_overrides, probed_train, spawn  # noqa: E402

IMAGE = "<image>"
# ChatML as SmolLM2 writes it, with no default system prompt: what a user passes as chat_template
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SIDES = ("hand-wired", "peftmm")


# -- the hand-wired model ----------------------------------------------------------------------
def prompt_ids(tokenizer, question: str, image_tokens: int, fill_id: int) -> tuple[list[int], int]:
    """Token ids of a question as the chat template renders it up to the assistant's header, with
    ``image_tokens`` slots holding ``fill_id`` where ``<image>`` stands; and the first slot's index."""
    user = [{"role": "user", "content": f"{IMAGE}\n{question}"}]
    prompt = tokenizer.apply_chat_template(user, chat_template=CHATML, add_generation_prompt=True, tokenize=False)
    before, after = (tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in prompt.split(IMAGE))
    return before + [fill_id] * image_tokens + after, len(before)


def encode(tokenizer, question: str, answer: str, image_tokens: int, fill_id: int) -> tuple[list[int], list[int]]:
    """Token ids of one question and answer as the chat template renders them (image slots hold
    ``fill_id``) and the labels: -100 except on the answer's tokens through its end-of-turn token
    (the newline the template writes after it is not learnt)."""
    user = [{"role": "user", "content": f"{IMAGE}\n{question}"}]
    prompt = tokenizer.apply_chat_template(user, chat_template=CHATML, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], chat_template=CHATML,
                                         tokenize=False)
    ids, _ = prompt_ids(tokenizer, question, image_tokens, fill_id)
    reply = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    learnt = reply.index(tokenizer.eos_token_id) + 1   # SmolLM2's EOS is <|im_end|>
    return ids + reply, [-100] * len(ids) + reply[:learnt] + [-100] * (len(reply) - learnt)


def quantisation(precision: str, device: torch.device) -> dict:
    from transformers import BitsAndBytesConfig

    from peftmm.precision import device_facts, int8_threshold

    if precision == "fp32":
        return {}
    if precision != "int8":
        raise SystemExit(f"the hand-wired side is written for fp32 or int8 backbones, not {precision}")
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True,
                                                      llm_int8_threshold=int8_threshold(device_facts(device))),
            "device_map": "cpu" if device.type == "cpu" else {"": device.index or 0}}


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu, with the recipe's input LayerNorm and dropout (parameter names as
    peftmm's projector has them, so its bundle weights load: bench/instruct_generation.py)."""

    def __init__(self, vision_dim: int, text_dim: int, hidden: int | None, input_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim) if input_norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(vision_dim, hidden or text_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden or text_dim, text_dim))

    def forward(self, tokens):
        return self.mlp(self.norm(tokens))


def handwired_child(payload: dict, probe: Probe) -> dict:
    from peft import LoraConfig, get_peft_model
    from plain_peft import make_preprocess
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, get_scheduler, set_seed

    import peftmm
    from peftmm import zoo
    from peftmm.data import load_splits

    recipe = peftmm.load_recipe(payload["recipe"], payload["overrides"])
    spec, steps, fusion = recipe.train, payload["settings"]["steps"], recipe.fusion
    layout = recipe.to_dict()
    if fusion.layers != 2 or layout["vision"]["methods"] or [m["type"] for m in layout["text"]["methods"]] != ["lora"]:
        raise SystemExit("the hand-wired side is written for the instruct recipe's layout: frozen vision, LoRA in "
                         "the LM, a 2-layer projector")
    set_seed(spec.seed)
    splits = load_splits(recipe.data)
    probe.baseline()   # libraries imported, data listed: the model is what comes next

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = {name: str(zoo.resolve(getattr(recipe, name).backbone)) if zoo.is_zoo_name(getattr(recipe, name).backbone)
              else getattr(recipe, name).backbone for name in ("vision", "text")}
    vision = AutoModel.from_pretrained(folder["vision"], **quantisation(recipe.vision.precision, device))
    vision.requires_grad_(False)
    if recipe.vision.precision == "fp32":
        vision.to(device)
    vision.eval()   # frozen batch norm
    tokenizer = AutoTokenizer.from_pretrained(folder["text"])
    lora = recipe.text.methods[0]
    lm = AutoModelForCausalLM.from_pretrained(folder["text"], **quantisation(recipe.text.precision, device))
    lm.requires_grad_(False)
    lm = get_peft_model(lm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                       target_modules=lora.targets))
    size = recipe.vision.image_size or 224
    preprocess = make_preprocess(folder["vision"], size)
    side = round(fusion.max_tokens ** 0.5)   # 4 tokens: a 2x2 grid
    with torch.no_grad():   # a CNN's output width is easiest read off one blank image
        width = vision(pixel_values=torch.zeros(1, 3, size, size, device=device)).last_hidden_state.shape[1]
    projector = Projector(width, lm.config.hidden_size, fusion.hidden, fusion.input_norm, fusion.dropout).to(device)
    fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(examples: list[dict]) -> dict:
        rows = [encode(tokenizer, e["text"], e["label"], side * side, fill) for e in examples]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), fill)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, target) in enumerate(rows):   # right padding
            ids[i, :len(row)], labels[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), torch.tensor(target), 1
        return {"examples": examples, "input_ids": ids, "labels": labels, "attention_mask": mask}

    trainable = [p for p in lm.parameters() if p.requires_grad] + list(projector.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = {"constant": "constant_with_warmup"}.get(spec.schedule, spec.schedule)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(spec.warmup_ratio * steps),
                              num_training_steps=steps)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=spec.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(spec.seed), collate_fn=collate)
    image_start = len(tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    lm.train()
    projector.train()
    vision_seconds, losses, done = [], [], 0
    while done < steps:
        for batch in loader:
            started = time.perf_counter()
            pixels = torch.stack([preprocess(e["image"]) for e in batch["examples"]]).to(device)
            with torch.no_grad():
                features = vision(pixel_values=pixels).last_hidden_state          # [B, C, 7, 7]
            tokens = F.adaptive_avg_pool2d(features, side).flatten(2).transpose(1, 2)   # [B, 4, C]
            vision_seconds.append(time.perf_counter() - started)
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            embeds = lm.get_input_embeddings()(ids)
            image = projector(tokens.float()).to(embeds.dtype)
            embeds = torch.cat([embeds[:, :image_start], image, embeds[:, image_start + image.shape[1]:]], 1)
            loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())   # a loop logs its loss: the same host sync peftmm's trainer has
            done += 1
            if done >= steps:
                break
    return {"trainable_params": sum(p.numel() for p in trainable), "steps": done, "losses": losses,
            "vision_seconds": vision_seconds,
            "lm_head": type(lm.get_output_embeddings()).__name__,
            "int8_linear_layers": sum(type(m).__module__.startswith("bitsandbytes")
                                      for m in [*vision.modules(), *lm.modules()])}


def peftmm_child(payload: dict, probe: Probe) -> dict:
    m = probed_train(payload, probe)
    fill = sum(e["end"] - e["start"] for e in probe.report["events"] if e["name"] == "fill_caches")
    return {"trainable_params": m["trainable_params"], "steps": m["steps"], "cache_fill_seconds": fill,
            "metrics": {k: m[f"test_{k}"] for k in ("exact_match", "token_f1", "out_of_vocabulary", "examples")
                        if f"test_{k}" in m}}


def child_main(payload_path: str, report_path: str) -> None:
    # both sides import the same libraries before their baseline
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peftmm.trainer  # noqa: F401

    payload = json.loads(Path(payload_path).read_text())
    probe = Probe()
    result = handwired_child(payload, probe) if payload["name"] == "hand-wired" else peftmm_child(payload, probe)
    Path(report_path).write_text(json.dumps({**probe.finish(), **result}))


# -- the parent --------------------------------------------------------------------------------
def same_sequences(recipe) -> dict:
    """Whether the hand-wired encoding gives peftmm's token ids and labels for every training question."""
    from transformers import AutoTokenizer

    import peftmm.data as data
    from peftmm import zoo
    from peftmm.tasks import instruct_prompt as chat

    source = recipe.text.backbone
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.resolve(source)) if zoo.is_zoo_name(source) else source)
    fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = recipe.fusion.max_tokens
    train, same, lengths = data.load_splits(recipe.data).train, 0, []
    for e in train:
        ids, labels = encode(tokenizer, e["text"], e["label"], tokens, fill)
        theirs = chat.encode_conversation(tokenizer, e["conversation"], tokens, template=chat.CHATML,
                                          max_length=recipe.text.max_length, fill_id=fill)
        same += theirs.input_ids.tolist() == ids and theirs.labels.tolist() == labels
        lengths.append(len(ids))
    return {"compared": len(train), "identical": same, "mean_tokens": statistics.mean(lengths),
            "max_tokens": max(lengths)}


def summarise(side: str, report: dict, s: dict) -> dict:
    intervals = report["step_intervals"]
    skip = min(s["warmup"], max(len(intervals) - 1, 0))
    timed = intervals[skip:]
    median = statistics.median(timed)
    cpu = report["step_cpu_intervals"][skip:]
    row = {"side": side, "trainable_params": report["trainable_params"], "steps": report["steps"],
           "median_step_cpu_s": statistics.median(cpu), "step_cpu_intervals_s": report["step_cpu_intervals"],
           "train_peak_rss": report["train_peak_rss"], "baseline_rss": report["baseline_rss"],
           "train_above_baseline": report["train_peak_rss"] - report["baseline_rss"],
           "raw_max_rss": report["raw_max_rss"], "peak_counter_reset": report["peak_counter_reset"],
           "median_step_s": median, "samples_per_s": s["batch_size"] / median, "warmup_excluded": skip,
           "timed_steps": len(timed), "step_intervals_s": intervals, "wall_seconds": report["wall_seconds"],
           "device": report["device"], "torch_threads": report["torch_threads"]}
    if side == "hand-wired":
        row["median_vision_s"] = statistics.median(report["vision_seconds"][skip + 1:] or report["vision_seconds"])
        row.update({k: report[k] for k in ("losses", "lm_head", "int8_linear_layers")})
    else:
        row.update({k: report[k] for k in ("cache_fill_seconds", "metrics")})
    return row


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    rows, mib = data["results"], 2**20
    names = [r["side"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for offset, (key, label) in zip((-0.2, 0.2), (("train_peak_rss", "peak RSS (raw)"),
                                                  ("train_above_baseline", "above baseline"))):
        axes[0].bar([i + offset for i in range(len(rows))], [r[key] / mib for r in rows], width=0.4, label=label)
    axes[0].set_title("peak memory up to the last step (MiB)")
    axes[0].legend(fontsize=8)
    hand = next(r for r in rows if r["side"] == "hand-wired")
    axes[1].bar(names, [r["median_step_s"] for r in rows], color="tab:green", label="whole step")
    axes[1].bar(["hand-wired"], [hand["median_vision_s"]], color="tab:orange", label="of it: images + vision tower")
    axes[1].set_title(f"median step (s), batch {data['settings']['batch_size']}")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(rows)), names)
        ax.margins(y=0.2)
    fig.suptitle(f"{data['recipe']}: {data['settings']['steps']} steps each on {rows[0]['device']}; peftmm / "
                 f"hand-wired: memory {data['ratios']['memory_above_baseline']:.2f}x, step "
                 f"{data['ratios']['step']:.2f}x", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "easy-vqa-instruct.yaml")
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per side (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="step intervals left out of the median (default 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=32, help="val and test questions peftmm evaluates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--render", action="store_true", help="only redraw the chart from the JSON")
    args = parser.parse_args()
    path = args.out / "instruct_handwired.json"
    if args.render:
        chart(json.loads(path.read_text()), args.out / "instruct_handwired.png")
        return
    import peftmm

    s = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "warmup": args.warmup,
         "train_samples": args.steps * args.batch_size, "eval_samples": args.eval_samples}
    overrides = common_overrides(s)
    recipe = peftmm.load_recipe(args.recipe, overrides)
    sequences = same_sequences(recipe)
    print(f"prompt encodings identical for {sequences['identical']} of {sequences['compared']} questions",
          file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="instruct-handwired-") as scratch:
        for side in SIDES:
            print(f"{side} ...", file=sys.stderr, flush=True)
            payload = {"name": side, "recipe": str(args.recipe), "overrides": overrides, "settings": s,
                       "run_dir": str(Path(scratch) / side)}
            report = spawn(payload, args.out / "runs" / "instruct_handwired" / f"{side}.log", Path(__file__))
            rows.append(summarise(side, report, s))
            r = rows[-1]
            print(f"  {r['trainable_params']:,} trainable, peak RSS {r['train_peak_rss'] / 2**20:,.0f} MiB "
                  f"({r['train_above_baseline'] / 2**20:,.0f} above baseline), median step {r['median_step_s']:.2f} s",
                  file=sys.stderr, flush=True)
    hand, ours = rows
    lora = recipe.text.methods[0]
    data = {"recipe": args.recipe.stem, "settings": s, "overrides": overrides, "same_sequences": sequences,
            "lora": {"r": lora.r, "alpha": lora.alpha, "targets": lora.targets},
            "precision": {"vision": recipe.vision.precision, "text": recipe.text.precision},
            "image_tokens": recipe.fusion.max_tokens, "results": rows,
            "ratios": {"memory_above_baseline": ours["train_above_baseline"] / hand["train_above_baseline"],
                       "memory_raw": ours["train_peak_rss"] / hand["train_peak_rss"],
                       "step": ours["median_step_s"] / hand["median_step_s"],
                       "step_cpu": ours["median_step_cpu_s"] / hand["median_step_cpu_s"]}}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    chart(data, args.out / "instruct_handwired.png")
    print(f"wrote {path} and {args.out / 'instruct_handwired.png'}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
