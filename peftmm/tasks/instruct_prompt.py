"""Token ids of a conversation with an image, through a chat template, for instruction tuning.

:func:`encode_conversation` gives what training needs: the token ids of the whole conversation
as the chat template (the tokenizer's own, or a Jinja string the recipe gives) renders it, with
``image_tokens`` slots where the image's tokens go, and labels that are -100 everywhere except
on the assistant's tokens (every assistant turn, through its end-of-turn token).
:func:`encode_generation_prompt` gives what generation starts from: the same ids up to the
assistant header of a conversation that ends with the user's turn.

Conversations have the shape of :mod:`peftmm.data.conversations` (``[{"role", "text"}]``).

Where the image goes: where the ``<image>`` placeholder stands in a user turn; without one, at
the start of the first user turn, followed by a newline when that turn has text (LLaVA's
``"<image>\\n..."``). The slots hold ``fill_id`` (the pad token): the model puts the projected
image features there. One image per conversation; ``image_tokens=0`` is a conversation without
one (placeholders are then an error).

How the assistant's tokens are found: the template is rendered for each assistant turn ``k``
twice, the turns before it with the generation prompt (ending with the assistant header) and
the turns through it; the characters between the two are the answer. They are cut after the
last end-of-turn string in them (``end_of_turn``, default the tokenizer's EOS: SmolLM2's
``<|im_end|>``), so the newline some templates write after it is not learnt. This works for any
template that renders the beginning of a conversation as the beginning of the whole;
``return_assistant_tokens_mask`` would need ``{% generation %}`` in the template, which
SmolLM2's (and most) do not have. The rendered text is tokenized in pieces cut at the image and
at each answer's start and end, so the ids before answer ``k`` are exactly the ids
:func:`encode_generation_prompt` gives for the turns before it: what the model learns to
continue is what it is asked to continue. A tokenizer whose pieces do not join up to the
tokens of the whole text (SentencePiece's prefix space on every piece) is refused, checked
once per tokenizer and template on a probe conversation.

The system prompt: a conversation's own system turn is kept; otherwise ``system_prompt``, when
given, becomes one. SmolLM2's template adds its default system prompt ("You are a helpful AI
assistant named SmolLM, trained by Hugging Face", 20 tokens) to a conversation without one;
:data:`CHATML` is the same format without that default.

Longer than ``max_length`` (image slots included): training keeps the beginning, whole turns
while they fit: later turns are dropped (``truncated == "later turns"``), since the image and
the first question come first and each turn builds on those before it. When even the first
answer does not fit whole, it is cut at the limit (``"answer cut"``: it loses its end-of-turn
token). When no answer token fits (or the image would be cut), :class:`TooLong` is raised for the
caller to skip the example and count it. A generation prompt drops its earliest exchanges that
do not hold the image (``"earlier turns"``), and is :class:`TooLong` when that is not enough.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import torch
from jinja2 import TemplateError

from ..data.conversations import IMAGE
from ..errors import DataError, PeftmmError

IGNORE = -100
_SLOT = "\ue000"     # stands for the image while rendering (a private-use character no text has)

# ChatML as SmolLM2's template writes it, without its default system prompt (shorter sequences).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class TooLong(DataError):
    """A conversation with no room for an answer (or the image) in ``max_length`` tokens."""


@dataclass
class Encoded:
    input_ids: torch.Tensor      # (L,) long; the image slots hold fill_id
    labels: torch.Tensor         # (L,) long; -100 except on assistant tokens (all -100 for a generation prompt)
    image_start: int             # index of the first image slot (0 and no slots without an image)
    image_tokens: int
    truncated: str | None = None  # None, "later turns", "answer cut" or (generation) "earlier turns"

    @property
    def image_positions(self) -> torch.Tensor:
        return torch.arange(self.image_start, self.image_start + self.image_tokens)


def encode_conversation(tokenizer, conversation: list[dict], image_tokens: int, *, template: str | None = None,
                        system_prompt: str | None = None, max_length: int | None = None,
                        end_of_turn: str | None = None, fill_id: int | None = None) -> Encoded:
    """Training ids and labels of ``conversation`` (at least one assistant turn); see the module docstring."""
    messages = _messages(conversation, image_tokens, system_prompt)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn: nothing to learn", "conversation")
    render, eot = _prepare(tokenizer, template, end_of_turn)
    full = render(messages, False)
    spans = _answer_spans(render, messages, full, eot)
    turn_ends = [end for _, _, end in spans]
    ids, labels, marks = _tokenize(tokenizer, full, [(a, b) for a, b, _ in spans], turn_ends, image_tokens, fill_id)
    image_start = marks["image"]
    truncated = None
    if max_length is not None and len(ids) > max_length:
        image_end = image_start + image_tokens
        fits = [end for end in marks["turn_ends"] if image_end <= end <= max_length]
        first_answer = marks["answer_starts"][0]
        if fits:
            cut, truncated = fits[-1], "later turns"
        elif first_answer < max_length and image_end <= max_length:
            cut, truncated = max_length, "answer cut"
        else:
            raise TooLong(f"{len(ids)} tokens and no room for an answer in max_length={max_length} (the first answer "
                          f"starts at token {first_answer}, the image takes {image_tokens})", "conversation")
        ids, labels = ids[:cut], labels[:cut]
    return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), image_start,
                   image_tokens, truncated)


def encode_generation_prompt(tokenizer, conversation: list[dict], image_tokens: int, *, template: str | None = None,
                             system_prompt: str | None = None, max_length: int | None = None,
                             end_of_turn: str | None = None, fill_id: int | None = None) -> Encoded:
    """Ids of ``conversation`` (ending with a user turn) followed by the assistant header, to generate from."""
    messages = _messages(conversation, image_tokens, system_prompt)
    if messages[-1]["role"] != "user":
        raise DataError(f"a prompt to answer ends with a user turn, not a {messages[-1]['role']} turn", "conversation")
    render, eot = _prepare(tokenizer, template, end_of_turn)
    truncated = None
    while True:
        full = render(messages, True)
        spans = _answer_spans(render, messages, full, eot)
        # cut where training cuts, so these ids are the training ids before the answer
        ids, _, marks = _tokenize(tokenizer, full, [(a, b) for a, b, _ in spans], [end for *_, end in spans],
                                  image_tokens, fill_id)
        if max_length is None or len(ids) <= max_length:
            break
        drop = _droppable_exchange(messages)
        if drop is None:
            raise TooLong(f"the prompt takes {len(ids)} tokens, more than max_length={max_length}, even without "
                          "its earlier exchanges", "conversation")
        del messages[drop: drop + 2]
        truncated = "earlier turns"
    return Encoded(torch.tensor(ids, dtype=torch.long), torch.full((len(ids),), IGNORE, dtype=torch.long),
                   marks["image"], image_tokens, truncated)


def pad_batch(encoded: list[Encoded], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """``encoded`` as one batch: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` and
    ``image_positions`` (B, image_tokens; every example needs the same number of image slots).
    Training pads on the right; generation on the left (``left=True``), so every prompt ends where
    the first new token goes, and the image positions move with the padding."""
    if not encoded:
        raise ValueError("an empty batch")
    counts = {e.image_tokens for e in encoded}
    if len(counts) > 1:
        raise ValueError(f"examples with different numbers of image tokens in one batch: {sorted(counts)}")
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    positions = torch.zeros((len(encoded), counts.pop()), dtype=torch.long)
    for row, e in enumerate(encoded):
        start = width - len(e.input_ids) if left else 0
        span = slice(start, start + len(e.input_ids))
        ids[row, span], labels[row, span], mask[row, span] = e.input_ids, e.labels, 1
        positions[row] = e.image_positions + start
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "image_positions": positions}


def stop_token_ids(tokenizer, end_of_turn: str | None = None) -> list[int]:
    """The ids that end an answer: the end-of-turn token and EOS (generation stops at either)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if end_of_turn:
        tokens = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise PeftmmError(f"the end-of-turn string {end_of_turn!r} is {len(tokens)} tokens, not one",
                              "chat template")
        ids.add(tokens[0])
    return sorted(ids)


def truncation_line(counts: Counter, split: str, max_length: int) -> str | None:
    """One warning line for a split's truncations (``Encoded.truncated`` values and ``"too long"``), or None."""
    if not counts:
        return None
    meaning = {"later turns": "later turns dropped", "answer cut": "first answer cut at the limit",
               "earlier turns": "earlier turns dropped", "too long": "skipped: no room for an answer"}
    detail = ", ".join(f"{meaning.get(k, k)}: {n:,}" for k, n in sorted(counts.items()))
    return (f"peftmm: {split}: {sum(counts.values()):,} conversations longer than text.max_length={max_length} "
            f"({detail}); raise text.max_length")


# ---------------------------------------------------------------- pieces

def _messages(conversation: list[dict], image_tokens: int, system_prompt: str | None) -> list[dict]:
    """Template messages, the image's place written as _SLOT (inserted when no placeholder says where)."""
    if not conversation:
        raise DataError("empty conversation", "conversation")
    messages = [{"role": t["role"], "content": t["text"].replace(_SLOT, "").replace(IMAGE, _SLOT)}
                for t in conversation]
    placed = sum(m["content"].count(_SLOT) for m in messages)
    if placed > (1 if image_tokens else 0):
        raise DataError(f"{placed} {IMAGE} placeholders but {1 if image_tokens else 'no'} image", "conversation")
    if image_tokens and not placed:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise DataError("no user turn to put the image in", "conversation")
        first["content"] = _SLOT + ("\n" + first["content"] if first["content"] else "")
    if messages[0]["role"] != "system" and system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


# tokenizer -> the templates whose pieces it was checked to tokenize as the whole text
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE = [{"role": "user", "content": "What is in the picture?"}, {"role": "assistant", "content": "A red circle."},
          {"role": "user", "content": "And its size?"}, {"role": "assistant", "content": "Small, I think."}]


def _prepare(tokenizer, template: str | None, end_of_turn: str | None):
    """The renderer and the end-of-turn string, once checked on a probe conversation: the ids of
    its pieces must be the ids of its whole text. A tokenizer that starts every piece with a space
    (SentencePiece's dummy prefix) fails that, and would learn answers it is never shown."""
    render, eot = _renderer(tokenizer, template), end_of_turn or tokenizer.eos_token
    checked = _CHECKED.setdefault(tokenizer, set())
    if template not in checked:
        full = render(_PROBE, False)
        spans = _answer_spans(render, _PROBE, full, eot)
        pieces, _, _ = _tokenize(tokenizer, full, [(a, b) for a, b, _ in spans], [e for *_, e in spans], 0, None)
        if pieces != tokenizer(full, add_special_tokens=False)["input_ids"]:
            raise PeftmmError("this tokenizer gives other tokens for a conversation cut at its turns than for the "
                              "whole text (a prefix space on every piece?), so the assistant's tokens cannot be cut "
                              "out exactly; byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen) work", "chat template")
        checked.add(template)
    return render, eot


def _renderer(tokenizer, template: str | None):
    if template is None and not tokenizer.chat_template:
        raise PeftmmError("the text backbone's tokenizer has no chat template; give one in the recipe "
                          "(task.chat_template)", "chat template")

    def render(messages: list[dict], generation: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation)
        except (TemplateError, TypeError, ValueError) as e:   # raise_exception in a template is a TemplateError
            raise PeftmmError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}",
                              "chat template") from None
    return render


def _answer_spans(render, messages: list[dict], full: str, end_of_turn: str | None) -> list[tuple[int, int, int]]:
    """Per assistant turn: (answer start, answer end after its end-of-turn string, turn end) in ``full``."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise PeftmmError(f"the chat template does not render the conversation up to turn {k} as the beginning "
                              "of the whole, so the assistant's tokens cannot be told apart; give a template that "
                              "does (task.chat_template)", "chat template")
        answer = through[len(before):]
        cut = answer.rfind(end_of_turn) if end_of_turn else -1
        end = len(before) + (cut + len(end_of_turn) if cut >= 0 else len(answer))
        spans.append((len(before), end, len(through)))
    return spans


def _tokenize(tokenizer, full: str, answers: list[tuple[int, int]], turn_ends: list[int], image_tokens: int,
              fill_id: int | None):
    """Ids and labels of ``full`` tokenized in pieces cut at the image and the answers' edges."""
    slot = full.find(_SLOT)
    cuts = sorted({0, len(full), *(c for span in answers for c in span), *turn_ends,
                   *((slot, slot + 1) if slot >= 0 else ())})
    pieces = list(pairwise(cuts))
    texts = [full[a:b] for a, b in pieces if full[a:b] != _SLOT]
    tokenized = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    answer_starts = {a for a, _ in answers}
    learnt = [any(s <= a and b <= e for s, e in answers) for a, b in pieces]
    fill = fill_id if fill_id is not None else tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids: list[int] = []
    labels: list[int] = []
    marks = {"image": 0, "answer_starts": [], "turn_ends": []}
    for (a, b), learn in zip(pieces, learnt):
        if a in answer_starts:
            marks["answer_starts"].append(len(ids))
        if full[a:b] == _SLOT:
            marks["image"] = len(ids)
            ids += [fill] * image_tokens
            labels += [IGNORE] * image_tokens
        else:
            piece = next(tokenized)
            ids += piece
            labels += piece if learn else [IGNORE] * len(piece)
        if b in turn_ends:
            marks["turn_ends"].append(len(ids))
    return ids, labels, marks


def _droppable_exchange(messages: list[dict]) -> int | None:
    """Index of the earliest user turn that, with the assistant turn after it, can go: not the last
    question, not the one holding the image."""
    for i in range(len(messages) - 2):
        if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant" and \
                _SLOT not in messages[i]["content"]:
            return i
    return None
