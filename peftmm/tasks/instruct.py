"""Visual instruction tuning: an image and a conversation in, the assistant's turns written by a
decoder LM, LLaVA-style.

The text tower is a causal LM (``text_tower_causal_lm``); the ``projector`` fusion turns the
image into ``image_tokens`` embeddings that take the place of the image's slots in the prompt
(instruct_prompt.py: where ``<image>`` stands, else at the start of the first user turn). The
prompt is the conversation rendered by a chat template:

- ``task.chat_template`` unset: :data:`~.instruct_prompt.CHATML`, SmolLM2's ChatML without its
  20-token default system prompt (short sequences are what training costs here);
  ``"tokenizer"``: the tokenizer's own template; any other string: a Jinja template.
- ``task.system_prompt``: a system turn for conversations without their own.

Training: one sequence per conversation, all its turns; the loss is the mean cross-entropy over
the assistant's tokens (each answer through its end-of-turn token) and nothing else. The LM's
output layer runs only at the positions that predict an assistant token (a 49,152-word
vocabulary at every position would cost more than the rest of the step).

Generation: transformers' ``generate`` from the prompt's input embeddings, with its KV cache:
greedy, beam search (``num_beams``) or sampling (``do_sample``, ``temperature``, ``top_p``), at
most ``max_new_tokens``, stopping at the end-of-turn token or EOS (stop_token_ids). Prompts are
left-padded; positions follow the attention mask, as in training.

Too long for ``text.max_length`` (image tokens included): later turns are dropped, or the first
answer cut, and counted (``truncated_*``); a conversation with no room for any answer token is
left out of training and evaluation and counted as skipped ("too long for text.max_length").

Evaluation: the teacher-forced loss over every conversation, and for each one its last answer
generated from the turns before it (earlier answers as the data gives them), scored by
answer_metrics.py: ``exact_match`` (VQAv2-normalised), ``token_f1``, ``out_of_vocabulary`` (answers
that are none of the training answers, kept in bundles as ``memory.answers``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.conversations import IMAGE, prompt_turns
from ..errors import DataError, PeftmmError, RecipeError
from ..fusion.projector import pool_tokens
from ..generation import Generated, GenerationOptions, Prompt, TokenStream, seeded
from ..schema import build as build_settings
from ..tensors import to_device
from . import TASKS
from . import instruct_prompt as chat
from .answer_metrics import answer_metrics, answer_vocabulary
from .base import Task
from .decoder_lm import IGNORE, causal_lm, generation_config, pad_id, positions, target_tokens, token_loss

TOO_LONG = "too long for text.max_length"
# data.source values whose records are conversations already (hf: through its conversation column,
# data.columns.conversation; a record without one is left out as "no conversation")
CONVERSATION_SOURCES = ("llava", "messages", "hf")
GENERATION_KEYS = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p")


@TASKS.register("instruct")
class InstructTask(Task):
    primary_metric = "exact_match"
    fusions = ("projector",)
    text_tower_causal_lm = True
    cached_towers = ("vision",)   # the LM reads each conversation with its image: nothing to cache
    own_text_inputs = True
    own_evaluation = True         # answers are generated, not read off one forward pass
    converses = True
    text_noun = "conversation"
    text_request = "a question or instruction about the image (--prompt)"
    pipeline_tag = "image-text-to-text"

    @dataclass
    class Config:
        chat_template: str | None = None   # None: CHATML, no default system prompt; "tokenizer": its own
        system_prompt: str | None = None
        end_of_turn: str | None = None     # the string that ends a turn; None: the tokenizer's EOS
        max_new_tokens: int = field(default=16, metadata={"min": 1, "max": 1024})
        num_beams: int = field(default=1, metadata={"min": 1, "max": 16})     # 1: greedy (or sampling)
        do_sample: bool = False
        temperature: float = field(default=1.0, metadata={"gt": 0.0, "max": 10.0})
        top_p: float = field(default=1.0, metadata={"gt": 0.0, "max": 1.0})

    def __init__(self, config, labels: list[str]):
        super().__init__(config, labels)
        self.tokenizer = None
        self.image_tokens = 0            # set by attach: what the projector gives per image
        self.max_length = 0
        self.vocabulary: frozenset[str] | None = None   # normalised training answers (prepare / bundle)
        self._encoded: dict = {}         # conversation -> Encoded or TooLong (each is encoded once)
        self._stops: list[int] = []      # token ids that end an answer (attach)
        self._turn_end: int | None = None

    # -- the recipe and the model ----------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe) -> None:
        data = recipe.data
        if not data.conversations and data.source not in CONVERSATION_SOURCES:
            raise RecipeError(f"task instruct learns from conversations: data.source {data.source!r} gives them with "
                              "data.conversations: true (easy-vqa, emoji), or use data.source llava, messages or hf "
                              "(with a conversation column)",
                              recipe.source)

    @classmethod
    def predict_arguments(cls, config: dict) -> str:
        return '--prompt "What is in the picture?"'

    @classmethod
    def describe_memory(cls, config: dict, memory: dict[str, torch.Tensor]) -> str | None:
        if "answers" not in memory:
            return None
        count = len(_unpack(memory["answers"]))
        return f"answer vocabulary: {count:,} distinct training answers (for out_of_vocabulary)"

    def attach(self, model) -> None:
        text = model.towers["text"]
        if text.arch and not text.arch.get("decoder"):
            raise PeftmmError(f"task instruct writes text with a decoder LM; text.backbone {text.info.source!r} is a "
                              f"{text.info.model_type} encoder (bidirectional attention): use a causal LM such as "
                              "smollm2-135m", "text.backbone")
        self.tokenizer, self.max_length = text.processor, model.max_length
        vision = model.towers["vision"]
        with torch.no_grad():
            tokens, mask = vision(**vision.probe_inputs())
        self.image_tokens = pool_tokens(tokens, mask, model.fusion.max_tokens)[0].shape[1]
        self._encoded.clear()
        self._stops = chat.stop_token_ids(self.tokenizer, self.config.end_of_turn)
        if not self._stops:
            raise PeftmmError("the LM's tokenizer has no end-of-sequence token; give task.end_of_turn", "task")
        eot = self.config.end_of_turn   # where a streamed answer ends: the end of turn itself, else EOS
        self._turn_end = self.tokenizer(eot, add_special_tokens=False)["input_ids"][0] if eot else self._stops[0]

    def build_head(self, in_dim: int) -> nn.Module:
        return nn.Identity()   # the LM's own output layer is the head

    # -- examples --------------------------------------------------------------------------------
    def text_of(self, example: dict) -> str:
        return example["text"]   # the first question (predict's --question; not read by the LM as such)

    def needed_text(self, example: dict) -> str | None:
        return example.get("label")   # the last answer

    def unusable(self, example: dict) -> str | None:
        if not isinstance(example.get("conversation"), list):
            return "no conversation"
        encoded = self._encode(example["conversation"])
        if isinstance(encoded, chat.TooLong):
            return TOO_LONG
        return None if (encoded.labels != IGNORE).any() else "empty answer"

    def truncated(self, tokenizer, examples: list[dict], max_length: int) -> tuple[int, str]:
        counts = Counter()
        for e in examples:
            if isinstance(e.get("conversation"), list):
                encoded = self._encode(e["conversation"])
                kind = "too long" if isinstance(encoded, chat.TooLong) else encoded.truncated
                if kind:
                    counts[kind] += 1
        line = chat.truncation_line(counts, "-", max_length)
        return sum(counts.values()), line.removeprefix("peftmm: -: ") if line else ""

    def _options(self) -> dict:
        template = chat.CHATML if self.config.chat_template is None else \
            None if self.config.chat_template == "tokenizer" else self.config.chat_template
        return {"template": template, "system_prompt": self.config.system_prompt,
                "end_of_turn": self.config.end_of_turn, "max_length": self.max_length}

    def _encode(self, conversation: list[dict]):
        """The training encoding of a conversation, or the chat.TooLong error it gives (memoised)."""
        key = tuple((t["role"], t["text"]) for t in conversation)
        if key not in self._encoded:
            try:
                self._encoded[key] = chat.encode_conversation(self.tokenizer, conversation, self.image_tokens,
                                                         **self._options())
            except chat.TooLong as e:
                self._encoded[key] = e
        return self._encoded[key]

    def text_inputs(self, tower, examples: list[dict], max_length: int) -> dict:
        """Training rows (conversations ending with an answer: ids, labels on the assistant's tokens,
        right-padded) or generation prompts (ending with the user's turn, or a bare ``text``
        question: left-padded, no labels); ``image_positions`` says where the image's tokens go."""
        conversations = [e["conversation"] if isinstance(e.get("conversation"), list)
                         else _from_messages(e["messages"]) if e.get("messages") else _question(e) for e in examples]
        ends = {c[-1]["role"] for c in conversations}
        if ends == {"assistant"}:
            encoded = [self._encode(c) for c in conversations]
            too_long = next((e for e in encoded if isinstance(e, chat.TooLong)), None)
            if too_long is not None:   # screening leaves these out of training; a caller who asked for it
                raise too_long
            return chat.pad_batch(encoded, pad_id(self.tokenizer, "instruct"))
        if ends == {"user"}:
            prompts = [chat.encode_generation_prompt(self.tokenizer, c, self.image_tokens, **self._options())
                       for c in conversations]
            batch = chat.pad_batch(prompts, pad_id(self.tokenizer, "instruct"), left=True)
            del batch["labels"]
            return batch
        raise DataError("a batch mixes conversations to learn (ending with an answer) and prompts to answer "
                        "(ending with a question)", "conversation")

    # -- the model -------------------------------------------------------------------------------
    def _embed(self, model, lm, batch: dict):
        """The prompt's input embeddings with the projected image in its slots, and the mask."""
        vision, vision_mask = model.encode("vision", batch)
        prefix, prefix_mask = model.fusion(vision, vision_mask)
        index = batch["image_index"]
        prefix, prefix_mask = prefix[index], prefix_mask[index]
        slots = batch["image_positions"]
        missing = slots.shape[1] - prefix.shape[1]
        if missing < 0:
            raise PeftmmError(f"the projector gives {prefix.shape[1]} image tokens but the prompt has "
                              f"{slots.shape[1]} slots")
        if missing:   # a smaller image (a tower shared at another size): the spare slots are not attended
            prefix = torch.cat([prefix, prefix.new_zeros(prefix.shape[0], missing, prefix.shape[2])], 1)
            prefix_mask = torch.cat([prefix_mask, prefix_mask.new_zeros(prefix.shape[0], missing)], 1)
        text = lm.get_input_embeddings()(batch["input_ids"])
        embeds = text.scatter(1, slots.unsqueeze(-1).expand(-1, -1, text.shape[-1]), prefix.to(text.dtype))
        mask = batch["attention_mask"]
        return embeds, mask.scatter(1, slots, prefix_mask.to(mask.dtype))

    def forward(self, model, batch: dict) -> torch.Tensor:
        """Training rows: the logits ``[M, V]`` of the M positions that predict an assistant token
        (in the order of ``labels[:, 1:]``'s targets); prompts: generated token ids."""
        if "labels" not in batch:
            return self.generate(model, batch)
        lm = causal_lm(model, "instruct")
        embeds, mask = self._embed(model, lm, batch)
        hidden = lm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                               use_cache=False).last_hidden_state[:, :-1]
        head = lm.get_output_embeddings()
        if hidden.is_meta:   # peftmm plan: which positions learn is not known; all of them bound it
            return head(hidden)
        return head(hidden[batch["labels"][:, 1:] != IGNORE])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        return token_loss(logits, targets if logits.dim() == 3 else targets[targets != IGNORE])

    def loss_units(self, labels: torch.Tensor) -> torch.Tensor:
        return target_tokens(labels[:, 1:])

    @torch.no_grad()
    def generate(self, model, batch: dict, settings=None, stopping=None) -> torch.Tensor:
        """Answer token ids ``[B, T]`` (the new tokens only; padded after the stop token)."""
        lm = causal_lm(model, "instruct")
        embeds, mask = self._embed(model, lm, batch)
        return self._generate(lm, embeds, mask, settings or self.config, stopping)

    def _generate(self, lm, embeds, mask, settings, stopping=None) -> torch.Tensor:
        config = generation_config(settings.max_new_tokens, settings.num_beams, self._stops,
                                   pad_id(self.tokenizer, "instruct"), do_sample=settings.do_sample,
                                   temperature=settings.temperature, top_p=settings.top_p)
        return lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                           stopping_criteria=stopping)

    def _request_settings(self, options: GenerationOptions):
        """The bundle's settings under a request's options: ``max_tokens`` caps the new tokens,
        ``temperature > 0`` samples (with ``top_p``)."""
        settings = replace(self.config, max_new_tokens=options.max_tokens or self.config.max_new_tokens)
        if options.sampling:
            settings = replace(settings, do_sample=True, num_beams=1, temperature=options.temperature,
                               top_p=options.top_p or 1.0)
        return settings

    @torch.no_grad()
    def generate_text(self, model, batch: dict, options: GenerationOptions | None = None,
                      streams: list | None = None) -> Generated:
        """See Task.generate_text (generation.py): ``max_tokens`` caps the new tokens, ``temperature
        > 0`` samples (with ``top_p``, under ``seed``), otherwise the bundle's own decoding."""
        return self.generate_embedded(model, self.prompt_embeddings(model, batch), options, streams)

    def shared_generation(self, options: GenerationOptions) -> tuple | None:
        """One sequence per row (greedy or sampling) can share a ``generate`` across adapters; beam
        search cannot (it multiplies the rows, and slots.rows names one slot per row)."""
        settings = self._request_settings(options)
        if settings.num_beams > 1:
            return None
        return (self.registry_name, settings.max_new_tokens, settings.do_sample, settings.temperature, settings.top_p,
                tuple(self._stops), self._turn_end, pad_id(self.tokenizer, "instruct"))

    @torch.no_grad()
    def prompt_embeddings(self, model, batch: dict) -> Prompt:
        embeds, mask = self._embed(model, causal_lm(model, "instruct"), batch)
        return Prompt(embeds, mask, batch["attention_mask"].sum(1).tolist())

    @torch.no_grad()
    def generate_embedded(self, model, prompt: Prompt, options: GenerationOptions | None = None,
                          streams: list | None = None) -> Generated:
        options = options or GenerationOptions()
        settings = self._request_settings(options)
        one = settings.num_beams == 1 and streams and any(streams)
        watch = [TokenStream(self.tokenizer, streams, self._turn_end)] if one else None
        with seeded(options.seed if options.sampling else None, prompt.embeds.device):
            ids = self._generate(model.towers["text"].model, prompt.embeds, prompt.mask, settings, watch)
        rows = self._cut(ids)
        return Generated(ids, prompt.tokens, [len(r) + s for r, s in rows], [s for _, s in rows])

    def _cut(self, ids: torch.Tensor) -> list[tuple[list[int], bool]]:
        """Each row's answer ids, up to its first stop token, and whether it stopped there."""
        rows = []
        for row in ids.tolist():
            end = next((i for i, t in enumerate(row) if t in self._stops), None)
            rows.append((row if end is None else row[:end], end is not None))
        return rows

    def decode(self, ids: torch.Tensor) -> list[dict]:
        if ids.is_floating_point():
            raise PeftmmError("an instruct model answers a question: give it a prompt ending with the user's turn")
        return [{"answer": self.tokenizer.decode(row, skip_special_tokens=True).strip()} for row, _ in self._cut(ids)]

    def reply(self, model, batch: dict, options: dict | None = None) -> list[dict]:
        settings = self.settings(options)
        seed = (options or {}).get("seed")
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            ids = self.generate(model, batch, settings)
        prompt_tokens = batch["attention_mask"].sum(1).tolist()
        return [{"text": self.tokenizer.decode(row, skip_special_tokens=True).strip(), "prompt_tokens": int(n),
                 "completion_tokens": len(row) + stopped, "finish_reason": "stop" if stopped else "length"}
                for (row, stopped), n in zip(self._cut(ids), prompt_tokens, strict=True)]

    def settings(self, options: dict | None):
        """The task's generation settings with ``options`` (GENERATION_KEYS, and ``seed``) applied,
        each checked against the bounds a recipe has (RecipeError naming ``generation.<key>``)."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(options) - set(GENERATION_KEYS) - {"seed"})
        if unknown:
            raise RecipeError(f"unknown generation option {unknown[0]!r}; allowed: {', '.join(GENERATION_KEYS)}, "
                              "seed", "generation")
        given = {k: v for k, v in options.items() if k != "seed"}
        current = {k: getattr(self.config, k) for k in GENERATION_KEYS}
        checked = build_settings(type(self.config), {**current, **given}, "generation")
        return replace(self.config, **{k: getattr(checked, k) for k in GENERATION_KEYS})

    # -- state built from data -------------------------------------------------------------------
    def prepare(self, model, examples: list[dict], batcher, device, progress: bool = False) -> None:
        answers = [t["text"] for e in examples if isinstance(e.get("conversation"), list)
                   for t in e["conversation"] if t["role"] == "assistant"]
        self.vocabulary = answer_vocabulary(answers)

    def memory_tensors(self) -> dict[str, torch.Tensor]:
        if self.vocabulary is None:
            return {}
        return {"answers": torch.tensor(list("\n".join(sorted(self.vocabulary)).encode()), dtype=torch.uint8)}

    def load_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        if "answers" in tensors:
            self.vocabulary = frozenset(_unpack(tensors["answers"]))

    # -- evaluation ------------------------------------------------------------------------------
    def metrics(self, outputs: list[str], targets: list[str]) -> dict[str, float]:
        return answer_metrics(outputs, targets, self.vocabulary)

    @torch.no_grad()
    def evaluate(self, model, examples, batcher, batch_size: int, device, progress=False, desc="eval") -> dict:
        """Teacher-forced loss over the conversations, and each one's last answer generated from the
        turns before it, scored against the data's answer. Conversations it cannot use (too long)
        are counted as ``skipped_unusable`` (training's screening has left them out already)."""
        model.eval()
        usable = [e for e in examples if self.unusable(e) is None]
        skipped, examples = len(examples) - len(usable), sorted(usable, key=lambda e: str(e["image"]))
        total, tokens = 0.0, 0
        for start in tqdm(range(0, len(examples), batch_size), desc=f"{desc} loss", disable=not progress,
                          leave=False):
            batch = to_device(batcher(examples[start: start + batch_size]), device)
            units = self.loss_units(batch["labels"]).item()
            total += self.loss(model(batch), batch["labels"]).item() * units
            tokens += units
        prompts, references, too_long = [], [], 0
        for e in examples:
            conversation = e["conversation"]
            last = max(i for i, t in enumerate(conversation) if t["role"] == "assistant")
            prompt = {"image": e["image"], "conversation": conversation[:last]}
            try:   # the prompt alone can need more room than training's cut conversation kept
                chat.encode_generation_prompt(self.tokenizer, prompt["conversation"], self.image_tokens,
                                              **self._options())
            except chat.TooLong:
                too_long += 1
                continue
            prompts.append(prompt)
            references.append(conversation[last]["text"])
        answers = []
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"{desc} answers", disable=not progress,
                          leave=False):
            batch = to_device(batcher(prompts[start: start + batch_size]), device)
            answers += [d["answer"] for d in self.decode(self.generate(model, batch))]
        if too_long:
            warnings.warn(f"instruct: {desc}: {too_long} prompts longer than text.max_length were not answered",
                          stacklevel=2)
        return {"loss": total / max(tokens, 1), **self.metrics(answers, references), "answered": len(answers),
                "prompts_too_long": too_long, "skipped_unusable": skipped}


def _question(example: dict) -> list[dict]:
    """A bare ``text`` question (Predictor.predict) as a one-turn prompt."""
    text = example.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError("an instruct model needs a question or instruction (a user turn)", "conversation")
    return [{"role": "user", "text": text.strip()}]


def _from_messages(messages: list[dict]) -> list[dict]:
    """A runtime request's messages (``{"role", "content"}`` as serve/chat_kinds.py sends them, or
    ``{"role", "text", "images"}``) as a conversation to answer: the image where the last message
    that says it carried one stands, else at the start of the first user message."""
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("images")), default=None)
    turns = [{"role": m.get("role"), "content": m.get("content", m.get("text"))} if isinstance(m, dict) else m
             for m in messages]
    if last is not None and isinstance(turns[last]["content"], str):
        turns[last]["content"] = IMAGE + "\n" + turns[last]["content"]
    return prompt_turns(turns)


def _unpack(tensor: torch.Tensor) -> list[str]:
    text = bytes(tensor.tolist()).decode("utf-8", errors="replace")
    return text.split("\n") if text else []
