"""The ``plain-peft-lora`` variant of bench/compare_peft.py: the default recipe wired by hand.

What a user would write with transformers + peft + torch and without peftmm, for the same model
as recipes/easy-vqa-lora.yaml: each tower through ``AutoModel`` at the recipe's precision (int8
via ``BitsAndBytesConfig``), ``get_peft_model`` with the recipe's LoRA settings on the text tower,
a gated cross-attention fusion and answer head written out with the recipe's sizes, AdamW and a
warmup schedule, a DataLoader over the questions. Per step every question's image is decoded,
preprocessed and run through the frozen vision tower: no feature cache, no de-duplication.
As usual, ``.train()`` puts the text tower in training mode (its dropout acts; peftmm keeps
frozen backbones in eval mode), while the frozen vision tower stays in eval mode (its batch norm
would otherwise take each batch's statistics).

Sizes and hyper-parameters are read from the recipe (after the bench's overrides), never typed
twice. peftmm is used for two things only, so that the data is the same: the example lists
(``peftmm.data.load_splits``: the same training subset and test questions as the other
variants) and the local folder of the zoo's weights (a user would give a hub id instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent


class GatedBlock(nn.Module):
    """Flamingo-style: text attends to vision, both residuals behind tanh gates that start at 0."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.attn_gate, self.ff_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def forward(self, text, vision):
        attended, _ = self.attn(self.attn_norm(text), vision, vision, need_weights=False)
        text = text + torch.tanh(self.attn_gate) * attended
        return text + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(text))


class FusionHead(nn.Module):
    """Project both towers, cross-attend, pool, ``[text, vision, text * vision]``, MLP to answers."""

    def __init__(self, vision_dim, text_dim, dim, heads, layers, dropout, hidden, head_dropout, answers):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.blocks = nn.ModuleList(GatedBlock(dim, heads, dropout) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Dropout(head_dropout),
                                  nn.Linear(hidden, answers))

    def forward(self, vision, text, text_mask):
        vision, text = self.vision_proj(vision), self.text_proj(text)
        for block in self.blocks:
            text = block(text, vision)
        weights = text_mask.unsqueeze(-1).to(text.dtype)
        pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        vision = vision.mean(1)   # every CNN position is a real token: no mask needed
        return self.head(torch.cat([pooled, vision, pooled * vision], dim=-1))


def load_backbone(folder: str, precision: str, device: torch.device):
    from transformers import AutoModel, BitsAndBytesConfig

    from peftmm.precision import device_facts, int8_threshold, nf4_compute_dtype

    kwargs = {"dtype": torch.bfloat16 if precision == "bf16" else torch.float32}
    if precision in ("int8", "nf4"):
        # quantised as peftmm loads it (precision.py: outlier threshold and 4-bit compute dtype
        # per device), so the two differ in wiring, not in the quantisation;
        # prepare_model_for_kbit_training is left out, since it would turn on gradient
        # checkpointing, which the recipe does not use.
        facts = device_facts(device)
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold(facts)) if precision == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=nf4_compute_dtype(facts)))
        kwargs["device_map"] = "cpu" if device.type == "cpu" else {"": device.index or 0}
    model = AutoModel.from_pretrained(folder, **kwargs)
    if precision not in ("int8", "nf4"):
        model.to(device)
    model.requires_grad_(False)
    return model


def make_preprocess(folder: str, size: int):
    """Resize to the recipe's size (bicubic), scale to [0, 1], normalise with the checkpoint's mean/std."""
    from PIL import Image

    config = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    mean = np.array(config.get("image_mean", (0.485, 0.456, 0.406)), dtype=np.float32)
    std = np.array(config.get("image_std", (0.229, 0.224, 0.225)), dtype=np.float32)

    def preprocess(path) -> torch.Tensor:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = (np.asarray(image, dtype=np.float32) / np.float32(255.0) - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    return preprocess


def plain_child(payload: dict, probe) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, get_scheduler, set_seed

    import peftmm
    from peftmm import zoo
    from peftmm.data import load_splits

    recipe = peftmm.load_recipe(payload["recipe"], payload["overrides"])
    spec, steps = recipe.train, payload["settings"]["steps"]
    layout = recipe.to_dict()
    if layout["fusion"]["type"] != "gated-cross-attention" or layout["vision"]["methods"] or \
            [m["type"] for m in layout["text"]["methods"]] != ["lora"]:
        raise SystemExit("plain-peft-lora is written for the default recipe's layout: frozen vision, LoRA on text, "
                         "gated cross-attention")
    set_seed(spec.seed)
    splits = load_splits(recipe.data)
    probe.baseline()   # libraries imported, data listed: the model is what comes next

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # what peftmm's trainer picks for the recipe's train.mixed_precision on this device (precision.py:
    # bf16 only where the card computes it natively, fp16 with a gradient scaler on older ones)
    from peftmm.precision import autocast_dtype, device_facts

    dtype = autocast_dtype(spec.mixed_precision, device_facts(device))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sources = {name: getattr(recipe, name).backbone for name in ("vision", "text")}
    folder = {name: str(zoo.resolve(s)) if zoo.is_zoo_name(s) else s for name, s in sources.items()}
    vision = load_backbone(folder["vision"], recipe.vision.precision, device).eval()   # eval: batch norm frozen
    tokenizer = AutoTokenizer.from_pretrained(folder["text"])
    lora = recipe.text.methods[0]
    text = get_peft_model(load_backbone(folder["text"], recipe.text.precision, device),
                          LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=lora.targets))
    answers = {a: i for i, a in enumerate(splits.labels)}
    f, task = recipe.fusion, recipe.task
    size = recipe.vision.image_size or 224
    preprocess = make_preprocess(folder["vision"], size)
    with torch.no_grad():   # a CNN's output width is easiest read off one blank image
        width = vision(pixel_values=torch.zeros(1, 3, size, size, device=device, dtype=vision.dtype)).last_hidden_state
    fusion = FusionHead(width.shape[1], text.config.hidden_size, f.dim, f.heads, f.layers, f.dropout,
                        task.hidden, task.dropout, len(answers)).to(device)

    def forward(batch: list[dict]) -> torch.Tensor:
        pixels = torch.stack([preprocess(e["image"]) for e in batch]).to(device, vision.dtype)
        tokens = tokenizer([e["text"] for e in batch], padding=True, truncation=True,
                           max_length=recipe.text.max_length, return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():   # the frozen tower needs no graph
                features = vision(pixel_values=pixels).last_hidden_state   # [B, C, H, W]
            features = features.flatten(2).transpose(1, 2).float()
            hidden = text(**tokens).last_hidden_state.float()
            return fusion(features, hidden, tokens["attention_mask"].bool())

    trainable = [p for p in text.parameters() if p.requires_grad] + list(fusion.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = {"constant": "constant_with_warmup"}.get(spec.schedule, spec.schedule)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(spec.warmup_ratio * steps),
                              num_training_steps=steps)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=spec.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(spec.seed), collate_fn=list)
    text.train()
    fusion.train()
    done = 0
    while done < steps:
        for batch in loader:
            targets = torch.tensor([answers[e["label"]] for e in batch], device=device)
            loss = F.cross_entropy(forward(batch).float(), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()   # a loop logs its loss: the same host sync peftmm's trainer has each step
            done += 1
            if done >= steps:
                break

    text.eval()
    fusion.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(splits.test), spec.eval_batch_size):
            batch = splits.test[start: start + spec.eval_batch_size]
            predicted = forward(batch).argmax(-1).cpu()
            correct += sum(int(p) == answers[e["label"]] for p, e in zip(predicted, batch))
    return {"trainable_params": sum(p.numel() for p in trainable), "accuracy": correct / len(splits.test),
            "eval_examples": len(splits.test), "steps": done}
