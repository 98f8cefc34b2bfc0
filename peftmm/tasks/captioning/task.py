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
or a minimum-Bayes-risk choice among beam candidates with ``mbr_candidates`` (mbr.py),
returning token ids that :meth:`decode` turns into ``{"caption": ...}``. So a plain
``decode(model(batch))`` (the Predictor's path) captions images.

A split is evaluated by generating one caption per distinct image and scoring it against all
of that image's captions (exact match, BLEU-4, CIDEr-D, unigram F1: metrics.py), plus
the teacher-forced loss. Empty captions are skipped (no loss, no reference) and counted;
captions longer than ``text.max_length`` allows are cut there and counted.

With ``retrieved_captions: K`` the LM also reads the captions of the K training images most
like this one (memory.py), between the vision tokens and the prompt:

    [vision tokens] [retrieved_prefix c1; c2; ...; cK] [prompt] [caption tokens] [EOS]

The retrieved part differs in length per image; it is left-padded, and the teacher-forced pass
then takes its positions from the attention mask (as generation does), so padding never shifts them.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import DataError, PeftmmError, RecipeError
from ...fusion import masked_mean
from ...generation import Generated, GenerationOptions, TokenStream, seeded
from ...tensors import to_device
from .. import TASKS
from ..base import Task, count_too_long
from ..decoder_lm import IGNORE, causal_lm, eos_id, positions, target_tokens, token_loss
from . import mbr
from .memory import CaptionMemory, key_hash
from .metrics import caption_metrics


@TASKS.register("captioning")
class CaptioningTask(Task):
    primary_metric = "cider_d"
    fusions = ("projector",)
    text_tower_causal_lm = True   # MultimodalModel.build loads the text tower with its LM head
    cached_towers = ("vision",)   # the LM reads each caption with its image: nothing to cache
    own_text_inputs = True        # prompt + caption ids and the caption labels (text_inputs)
    own_evaluation = True         # its captions are generated, not read off one forward pass
    text_noun = "caption"
    pipeline_tag = "image-to-text"

    @dataclass
    class Config:
        prompt: str = "Describe the emoji:"
        max_new_tokens: int = field(default=24, metadata={"min": 1, "max": 1024})
        num_beams: int = field(default=1, metadata={"min": 1, "max": 32})   # 1: greedy decoding
        # Retrieval augmentation (memory.py): how many training captions of similar
        # images the LM reads before the prompt (0: none), each cut to retrieved_max_tokens.
        retrieved_captions: int = field(default=0, metadata={"min": 0, "max": 16})
        retrieved_prefix: str = "Similar:"
        retrieved_max_tokens: int = field(default=16, metadata={"min": 1, "max": 128})
        # While training, an example never retrieves entries that share its value of this example
        # field (emoji: family); none: its own caption only.
        retrieved_exclude: str | None = None
        # Minimum-Bayes-risk choice (mbr.py) among this many beam candidates (0: off):
        # the caption with the best expected unigram F1 against the candidates, weighted by their
        # probability, and the retrieved captions, which share mbr_retrieved_weight of the mass.
        # mbr_drop_words also considers captions made of some of a candidate's words.
        mbr_candidates: int = field(default=0, metadata={"min": 0, "max": 32})
        mbr_retrieved_weight: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
        mbr_drop_words: bool = False

    def __init__(self, config, labels: list[str]):
        super().__init__(config, labels)
        self.counts: Counter = Counter()   # "empty" and "truncated" captions seen since the last reset
        self._warned: set[str] = set()
        self.tokenizer = None              # the LM's, set on first use (decode needs it)
        self.memory: CaptionMemory | None = None   # built by prepare or read from a bundle
        self._context_ids: tuple[list[int], list[int]] | None = None   # see _retrieved

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.task.mbr_candidates == 1:
            raise RecipeError("task.mbr_candidates = 1: a choice needs at least 2 candidates (0 turns it off)",
                              recipe.source)
        if recipe.task.retrieved_captions and recipe.vision.methods:
            raise RecipeError("task.retrieved_captions needs a frozen vision tower (its features key the caption "
                              "memory, built once before training); remove vision.methods or set "
                              "task.retrieved_captions: 0", recipe.source)

    @classmethod
    def describe_memory(cls, config: dict, memory: dict[str, torch.Tensor]) -> str | None:
        if "ids" not in memory:
            return None
        return (f"caption memory: {len(memory['ids']):,} training captions with their image features, "
                f"{config.get('retrieved_captions')} retrieved per image")

    def build_head(self, in_dim: int) -> nn.Module:
        return nn.Identity()  # the LM's own output layer is the head

    def text_of(self, example: dict) -> str:
        return self.config.prompt  # what the LM reads for any image; the caption is the target

    def needed_text(self, example: dict) -> str | None:
        return example.get("text")   # the caption it learns

    def truncated(self, tokenizer, examples: list[dict], max_length: int) -> tuple[int, str]:
        """Captions cut at the room ``max_length`` leaves after the prompt (" caption" + EOS):
        counted, and still trained on. A cut target loses its EOS and last words only, so its labels
        teach the first words and never an end there; skipping it would lose the words it teaches."""
        texts = [" " + " ".join(e["text"].split()) for e in examples
                 if isinstance(e.get("text"), str) and e["text"].strip()]
        room = max_length - len(self._prompt_ids(tokenizer))
        where = f"the {room} tokens text.max_length={max_length} leaves after the prompt"
        return count_too_long(tokenizer, texts, room, where, self.text_noun, extra=1, special=False)

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
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.config.retrieved_captions:   # never retrieve an entry with its own exclusion key
            batch["exclude_hash"] = torch.tensor([key_hash(self._exclusion_key(e)) for e in examples])
        return batch

    def _exclusion_key(self, example: dict) -> str:
        field_name = self.config.retrieved_exclude
        if field_name is None:
            return str(example.get("text") or "")
        if field_name not in example:
            raise DataError(f"task.retrieved_exclude = {field_name!r}: the examples have no such field "
                            f"(they have {', '.join(sorted(example))})")
        return str(example[field_name])

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
        lm = causal_lm(model, "captioning")
        self.tokenizer = model.towers["text"].processor
        return lm

    def _inputs(self, model, lm, batch: dict, input_ids, attention_mask):
        """The LM's input embeddings and mask, and each row's retrieved memory entries (or None)."""
        vision, vision_mask = model.encode("vision", batch)
        prefix, prefix_mask = model.fusion(vision, vision_mask)
        index = batch["image_index"]
        embed = lm.get_input_embeddings()
        text = embed(input_ids)
        parts, masks = [prefix[index].to(text.dtype)], [prefix_mask[index].to(attention_mask.dtype)]
        chosen = None
        if self.config.retrieved_captions:
            ids, mask, chosen = self._retrieved(masked_mean(vision, vision_mask)[index], batch.get("exclude_hash"))
            parts.append(embed(ids.to(input_ids.device)))
            masks.append(mask.to(attention_mask.device, attention_mask.dtype))
        return torch.cat(parts + [text], dim=1), torch.cat(masks + [attention_mask], dim=1), chosen

    def _retrieved(self, pooled: torch.Tensor, exclude: torch.Tensor | None):
        """Token ids ``[B, W]`` (left-padded) and mask of each row's retrieved captions, and the
        memory entries they come from (a list per row, most similar first)."""
        if self.memory is None:
            raise PeftmmError("task.retrieved_captions: this model has no caption memory (it is built from the "
                              "training split when training starts, and saved in the bundle)")
        tok = self.tokenizer
        if self._context_ids is None:   # the prefix and separator, tokenised once
            self._context_ids = tuple(tok(text, add_special_tokens=False)["input_ids"]
                                      for text in (self.config.retrieved_prefix, ";"))
        head, separator = self._context_ids
        k = min(self.config.retrieved_captions, len(self.memory))
        if pooled.is_meta:   # peftmm plan: no similarity to rank by; any K entries have the shape
            chosen = [list(range(k))] * len(pooled)
        else:
            chosen = self.memory.nearest(pooled, k, exclude).tolist()
        rows = []
        for nearest in chosen:
            row = list(head)
            for position, entry in enumerate(nearest):
                row += (separator if position else []) + self.memory.captions_ids(entry)
            rows.append(row)
        width = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else _eos(tok)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids, mask, chosen

    # -- the caption memory --------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model, examples: list[dict], batcher, device, progress: bool = False) -> None:
        """Build the caption memory from the training examples (retrieved_captions > 0 only):
        each captioned example's image, pooled as the frozen vision tower gives it."""
        if not self.config.retrieved_captions:
            return
        self._lm(model)   # sets the tokenizer
        entries = [(str(e["image"]), " ".join(str(e.get("text") or "").split()), self._exclusion_key(e))
                   for e in examples]
        images = list(dict.fromkeys(image for image, text, _ in entries if text))
        was_training = model.training
        model.eval()
        pooled = {}
        for start in tqdm(range(0, len(images), 64), desc="caption memory", disable=not progress, leave=False):
            # unreadable images were reported while caching (or are by training): left out here;
            # the ones decoded by the check are not decoded again
            pixels: dict = {}
            chunk = [image for image in images[start: start + 64] if batcher.image_error(image, pixels) is None]
            if chunk:
                batch = to_device(batcher.vision_inputs(chunk, pixels), device)
                tokens, mask = model.encode("vision", batch)
                pooled.update(zip(chunk, masked_mean(tokens, mask).float().cpu()))
        model.train(was_training)
        entries = list(dict.fromkeys(entry for entry in entries if entry[1] and entry[0] in pooled))
        if not entries:
            raise DataError("task.retrieved_captions: the train split has no captioned image to remember")
        features = torch.stack([pooled[image] for image, _, _ in entries])
        self.memory = CaptionMemory.build(features, [text for _, text, _ in entries], [key for _, _, key in entries],
                                          self.tokenizer, self.config.retrieved_max_tokens)

    def prepare_shapes(self, model, examples: list[dict]) -> None:
        """For peftmm plan: a memory of the size prepare would build, every caption as long as
        retrieved_max_tokens allows (the longest retrieved context), with nothing encoded."""
        if not self.config.retrieved_captions:
            return
        self._lm(model)
        entries = max(len(examples), 1)
        ids = torch.full((entries, self.config.retrieved_max_tokens), _eos(self.tokenizer), dtype=torch.int32)
        dim = model.towers["vision"].info.hidden_size
        self.memory = CaptionMemory(torch.zeros(entries, dim, dtype=torch.float16), ids, torch.arange(entries))

    def load_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.retrieved_captions:
            self.memory = CaptionMemory.from_tensors(tensors)

    def forward(self, model, batch: dict) -> torch.Tensor:
        if "labels" not in batch:
            return self.generate(model, batch)
        lm = self._lm(model)
        embeds, mask, _ = self._inputs(model, lm, batch, batch["input_ids"], batch["attention_mask"])
        # Position t predicts token t+1: the caption's logits come from the positions one before
        # it, i.e. the last (caption width + 1) positions but the very last.
        keep = batch["labels"].shape[1] + 1
        # Left-padded retrieved captions: positions from the mask, as generation takes them.
        position_ids = positions(mask) if self.config.retrieved_captions else None
        logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep,
                    use_cache=False).logits
        return logits[:, :-1]

    @torch.no_grad()
    def generate(self, model, batch: dict) -> torch.Tensor:
        """Caption token ids ``[B, T]`` (after the prompt; padded after EOS), as the bundle decodes."""
        return self.generate_text(model, batch).ids

    @torch.no_grad()
    def generate_text(self, model, batch: dict, options: GenerationOptions | None = None,
                      streams: list | None = None) -> Generated:
        """See Task.generate_text. ``temperature > 0`` samples (one sequence, no beams or MBR);
        otherwise the bundle's own num_beams and mbr_candidates decide. Rows stream their text
        only when one sequence is generated per row (greedy or sampling)."""
        from transformers import GenerationConfig

        options = options or GenerationOptions()
        lm = self._lm(model)
        tok = self.tokenizer
        length = len(self._prompt_ids(tok))
        ids = batch["input_ids"][:, :length]
        embeds, mask, retrieved = self._inputs(model, lm, batch, ids, torch.ones_like(ids))
        pad, eos = (tok.pad_token_id if tok.pad_token_id is not None else _eos(tok)), _eos(tok)
        sampling = options.sampling
        n = 0 if sampling else self.config.mbr_candidates
        beams = 1 if sampling else max(self.config.num_beams, n)
        config = GenerationConfig(max_new_tokens=options.max_tokens or self.config.max_new_tokens, num_beams=beams,
                                  num_return_sequences=max(n, 1), do_sample=sampling, eos_token_id=eos,
                                  pad_token_id=pad, output_scores=n > 1, return_dict_in_generate=n > 1,
                                  **({"temperature": options.temperature, "top_p": options.top_p or 1.0}
                                     if sampling else {}))
        watch = [TokenStream(tok, streams, eos)] if streams and beams == 1 and any(streams) else []
        with seeded(options.seed if sampling else None, embeds.device):
            out = lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                              stopping_criteria=watch or None)
        if n > 1:
            out = self._minimum_bayes_risk(out, n, retrieved, pad)
        written = [row[: row.index(eos) + 1] if eos in row else row for row in out.tolist()]
        return Generated(out, mask.sum(1).tolist(), [len(row) for row in written],
                         [eos in row for row in written])

    def _minimum_bayes_risk(self, out, n: int, retrieved, pad: int) -> torch.Tensor:
        """One caption per image chosen among its ``n`` beam candidates (mbr.py), as
        token ids padded after EOS like generate's own output."""
        tok, eos = self.tokenizer, _eos(self.tokenizer)
        captions = [d["caption"] for d in self.decode(out.sequences)]
        scores = out.sequences_scores.view(-1, n).tolist()
        rows = []
        for i, log_probs in enumerate(scores):
            read = [tok.decode(self.memory.captions_ids(e)).strip() for e in retrieved[i]] if retrieved else []
            caption = mbr.choose(captions[i * n: (i + 1) * n], log_probs, read,
                                         self.config.mbr_retrieved_weight, self.config.mbr_drop_words)
            rows.append(tok(" " + caption, add_special_tokens=False)["input_ids"] + [eos])
        ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids.to(out.sequences.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss(logits, labels)   # a batch of only empty captions: 0

    def loss_units(self, labels: torch.Tensor) -> torch.Tensor:
        return target_tokens(labels)   # the loss is a mean over caption tokens

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
    def metrics(self, outputs: list[str], targets: list[list[str]]) -> dict[str, float]:
        """``outputs``: one generated caption per image; ``targets``: each image's captions."""
        return caption_metrics(outputs, targets)

    @torch.no_grad()
    def evaluate(self, model, examples, batcher, batch_size: int, device, progress=False, desc="eval") -> dict:
        """Teacher-forced loss over the examples, and metrics of one generated caption per image."""
        model.eval()
        self.counts.clear()
        examples = sorted(examples, key=lambda e: str(e["image"]))
        total, tokens = 0.0, 0
        for start in tqdm(range(0, len(examples), batch_size), desc=f"{desc} loss", disable=not progress,
                          leave=False):
            batch = to_device(batcher(examples[start: start + batch_size]), device)
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
            batch = to_device(batcher(chunk), device)
            hypotheses += [d["caption"] for d in self.decode(model(batch))]
        return {"loss": total / max(tokens, 1), **self.metrics(hypotheses, [references[i] for i in images]),
                "images": len(images), "skipped_empty": self.counts["empty"], "truncated": self.counts["truncated"]}


def _eos(tok) -> int:
    return eos_id(tok, "captioning")
