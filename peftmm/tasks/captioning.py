"""Image captioning with a decoder LM, LLaVA-style.

The text tower is a causal LM (loaded with its output layer, see ``text_tower_causal_lm``). The
``projector`` fusion maps the image's vision tokens into the LM's input-embedding space; they
come first in the LM's input, then the prompt, then the caption and EOS:

    [projected vision tokens] [prompt ("Describe the emoji:")] [caption tokens] [EOS]

Only the caption tokens and EOS are predicted (cross-entropy over them alone; the labels of
vision, prompt and padding positions are -100). LoRA, bottleneck adapters and prefix tuning act
inside the LM as in any tower, at any precision.

``forward`` gives the teacher-forced logits of the caption positions when the batch carries
captions (its ``labels``), and otherwise generates: greedy, or beam search with ``num_beams``,
returning token ids that :meth:`decode` turns into ``{"caption": ...}``. So a plain
``decode(model(batch))`` (the Predictor's path) captions images.

A split is evaluated by generating one caption per distinct image and scoring it against all
of that image's captions (exact match, BLEU-4, CIDEr-D, unigram F1: caption_metrics.py), plus
the teacher-forced loss. Empty captions are skipped (no loss, no reference) and counted;
captions longer than ``text.max_length`` allows are cut there and counted.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import DataError, PeftmmError
from . import TASKS
from .base import Task
from .caption_metrics import caption_metrics

IGNORE = -100


@TASKS.register("captioning")
class CaptioningTask(Task):
    primary_metric = "cider_d"
    fusions = ("projector",)
    text_tower_causal_lm = True   # MultimodalModel.build loads the text tower with its LM head
    cached_towers = ("vision",)   # the LM reads each caption with its image: nothing to cache

    @dataclass
    class Config:
        prompt: str = "Describe the emoji:"
        max_new_tokens: int = field(default=24, metadata={"min": 1, "max": 1024})
        num_beams: int = field(default=1, metadata={"min": 1, "max": 32})   # 1: greedy decoding

    def __init__(self, config, labels: list[str]):
        super().__init__(config, labels)
        self.counts: Counter = Counter()   # "empty" and "truncated" captions seen since the last reset
        self._warned: set[str] = set()
        self.tokenizer = None              # the LM's, set on first use (decode needs it)

    def build_head(self, in_dim: int) -> nn.Module:
        return nn.Identity()  # the LM's own output layer is the head

    def text_of(self, example: dict) -> str:
        return self.config.prompt  # what the LM reads for any image; the caption is the target

    # -- batches -------------------------------------------------------------------------------
    def text_inputs(self, tower, examples: list[dict], max_length: int) -> dict:
        """Prompt + caption + EOS ids for the LM, right-padded, and the caption labels.

        Examples without any ``text`` (prediction) get the prompt alone and no labels.
        """
        tok = self.tokenizer = tower.processor
        prompt = self._prompt_ids(tok)
        room = max_length - len(prompt)
        if room < 2:
            raise DataError(f"task.prompt takes {len(prompt)} tokens, so text.max_length = {max_length} leaves "
                            "no room for a caption; raise text.max_length")
        captions = [e.get("text") for e in examples]
        if all(c is None for c in captions):
            ids = torch.tensor([prompt] * len(examples))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        targets = [self._caption_ids(tok, c, room) for c in captions]
        width = max(1, max(len(t) for t in targets))
        pad = tok.pad_token_id if tok.pad_token_id is not None else _eos(tok)
        ids = torch.full((len(examples), len(prompt) + width), pad)
        mask = torch.zeros_like(ids)
        labels = torch.full((len(examples), width), IGNORE)
        for row, target in enumerate(targets):
            ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
            mask[row, : len(prompt) + len(target)] = 1
            labels[row, : len(target)] = torch.tensor(target, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _prompt_ids(self, tok) -> list[int]:
        return tok(self.config.prompt, add_special_tokens=False)["input_ids"]

    def _caption_ids(self, tok, caption, room: int) -> list[int]:
        caption = " ".join(str(caption or "").split())
        if not caption:
            self._note("empty", "an example has an empty caption: it is skipped (no loss, not scored); "
                                "evaluation counts these as skipped_empty")
            return []
        ids = tok(" " + caption, add_special_tokens=False)["input_ids"] + [_eos(tok)]
        if len(ids) > room:
            self._note("truncated", f"a caption is longer than the {room} tokens text.max_length leaves after "
                                    "the prompt: it is cut there (evaluation counts these as truncated)")
            ids = ids[:room]
        return ids

    def _note(self, what: str, message: str) -> None:
        self.counts[what] += 1
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"captioning: {message}", stacklevel=3)

    def targets(self, examples: list[dict]) -> torch.Tensor:
        raise NotImplementedError("captioning builds its labels with the token ids, in text_inputs")

    # -- the model -----------------------------------------------------------------------------
    def _lm(self, model):
        tower = model.towers["text"]
        if not tower.causal_lm:
            raise PeftmmError("task captioning needs the text tower loaded as a causal LM (with its output "
                              "layer); this one was loaded as an encoder")
        if not getattr(model.fusion, "yields_tokens", False):
            raise PeftmmError("task captioning needs fusion type 'projector' (vision tokens for the LM)")
        model.activate("text")
        self.tokenizer = tower.processor
        return tower.model

    def _inputs(self, model, lm, batch: dict, input_ids, attention_mask):
        vision, vision_mask = model.encode("vision", batch)
        prefix, prefix_mask = model.fusion(vision, vision_mask)
        index = batch["image_index"]
        text = lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix[index].to(text.dtype), text], dim=1)
        return embeds, torch.cat([prefix_mask[index].to(attention_mask.dtype), attention_mask], dim=1)

    def forward(self, model, batch: dict) -> torch.Tensor:
        if "labels" not in batch:
            return self.generate(model, batch)
        lm = self._lm(model)
        embeds, mask = self._inputs(model, lm, batch, batch["input_ids"], batch["attention_mask"])
        # Position t predicts token t+1: the caption's logits come from the positions one before
        # it, i.e. the last (caption width + 1) positions but the very last.
        keep = batch["labels"].shape[1] + 1
        logits = lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
        return logits[:, :-1]

    @torch.no_grad()
    def generate(self, model, batch: dict) -> torch.Tensor:
        """Caption token ids ``[B, T]`` (after the prompt; padded after EOS)."""
        from transformers import GenerationConfig

        lm = self._lm(model)
        tok = self.tokenizer
        length = len(self._prompt_ids(tok))
        ids = batch["input_ids"][:, :length]
        embeds, mask = self._inputs(model, lm, batch, ids, torch.ones_like(ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else _eos(tok)
        config = GenerationConfig(max_new_tokens=self.config.max_new_tokens, num_beams=self.config.num_beams,
                                  do_sample=False, eos_token_id=_eos(tok), pad_token_id=pad)
        return lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                reduction="sum")
        return total / (labels != IGNORE).sum().clamp(min=1)  # a batch of only empty captions: 0

    def loss_units(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE).sum()  # the loss is a mean over caption tokens

    def decode(self, ids: torch.Tensor) -> list[dict]:
        if ids.is_floating_point():  # teacher-forced logits: the examples carried text
            raise PeftmmError("a captioning model describes the image itself: give it no question or text")
        if self.tokenizer is None:
            raise PeftmmError("captioning: nothing has been generated yet, so the tokenizer is unknown")
        eos = _eos(self.tokenizer)
        out = []
        for row in ids.tolist():
            row = row[: row.index(eos)] if eos in row else row
            out.append({"caption": self.tokenizer.decode(row, skip_special_tokens=True).strip()})
        return out

    # -- evaluation ----------------------------------------------------------------------------
    def metrics(self, hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
        return caption_metrics(hypotheses, references)

    @torch.no_grad()
    def evaluate(self, model, examples, batcher, batch_size: int, device, progress=False, desc="eval") -> dict:
        """Teacher-forced loss over the examples, and metrics of one generated caption per image."""
        model.eval()
        self.counts.clear()
        examples = sorted(examples, key=lambda e: str(e["image"]))
        total, tokens = 0.0, 0
        for start in tqdm(range(0, len(examples), batch_size), desc=f"{desc} loss", disable=not progress,
                          leave=False):
            batch = {k: v.to(device) for k, v in batcher(examples[start: start + batch_size]).items()}
            labels = batch["labels"]
            total += self.loss(model(batch), labels).item() * (labels != IGNORE).sum().item()
            tokens += (labels != IGNORE).sum().item()
        references: dict[str, list[str]] = {}
        for e in examples:
            caption = " ".join(str(e.get("text") or "").split())
            if caption:
                references.setdefault(str(e["image"]), []).append(caption)
        images = list(references)
        hypotheses = []
        for start in tqdm(range(0, len(images), batch_size), desc=f"{desc} captions", disable=not progress,
                          leave=False):
            chunk = [{"image": image, "text": None} for image in images[start: start + batch_size]]
            batch = {k: v.to(device) for k, v in batcher(chunk).items()}
            hypotheses += [d["caption"] for d in self.decode(model(batch))]
        return {"loss": total / max(tokens, 1), **self.metrics(hypotheses, [references[i] for i in images]),
                "images": len(images), "skipped_empty": self.counts["empty"], "truncated": self.counts["truncated"]}


def _eos(tok) -> int:
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise PeftmmError("captioning: the LM's tokenizer has no end-of-sequence token")
    return eos
