"""How each kind of bundle answers an OpenAI chat completion (serve/openai_api.py).

One :class:`ChatKind` per task type, in the ``CHAT_KINDS`` registry. A kind turns a parsed
:class:`Chat` into runtime requests, which go through the server's micro-batcher together
(so requests for several adapters batch as ``/api/predict`` does), and the results into one
:class:`Answer`:

- ``vqa`` and ``classification``: the top label is the answer; the question is the text of the
  last user message (a classifier with a fixed prompt reads that prompt instead). The scores
  are in ``peftmm.scores``.
- ``retrieval``: the last user message lists candidate texts (:func:`candidates`); the answer is
  the one most similar to the image, with every similarity in ``peftmm.similarities``.
- ``captioning`` (:class:`GenerativeChat`): the caption the bundle writes for the image under
  the request's generation options; the messages' text is not read (the bundle's own prompt is).

A task that writes text and reads the conversation (``instruct``) registers a
:class:`GenerativeChat` subclass with ``reads_messages = True`` and implements
Task.generate_text (generation.py): nothing here changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..generation import GenerationOptions
from ..registry import Registry

CHAT_KINDS = Registry("chat answer")
MAX_CANDIDATES = 64
CANDIDATES_PREFIX = "candidates:"


@dataclass
class Chat:
    """A validated chat completion request."""
    adapter: str
    messages: list[dict]           # {"role", "text", "images": number of images in it}
    image: object                   # the last image of the conversation (PIL)
    question: str | None            # the text of the last user message; None when it has none
    options: GenerationOptions = field(default_factory=GenerationOptions)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"     # "length": a generation that ran into max_tokens
    extra: dict = field(default_factory=dict)   # the response's ``peftmm`` object


class ChatKind:
    """Answers chat completions for the adapters of one task type."""
    question: str = "required"      # "required" (needs the user's text) or "ignored" (reads none)
    question_hint = "a question about the image"

    def problem(self, question: str | None) -> str | None:
        """What is wrong with the user's text for this kind, if anything."""
        return None

    def requests(self, chat: Chat, stream: Callable[[str], None] | None) -> list[dict]:
        """Runtime requests (Runtime.predict) for the chat; ``stream`` takes the text so far each
        time it grows, for kinds that generate (the others answer at once)."""
        raise NotImplementedError

    def answer(self, chat: Chat, results: list[dict]) -> Answer:
        """The answer from the runtime's results, one per request, in order."""
        raise NotImplementedError


def _extra(chat: Chat, result: dict, **more) -> dict:
    return {"adapter": chat.adapter, "question": chat.question,
            **{k: v for k, v in result.items() if k not in ("adapter", "usage")}, **more}


@CHAT_KINDS.register("vqa")
class LabelChat(ChatKind):
    """The top label as the answer; ``peftmm`` carries the runtime's result (``answer``,
    ``scores``: the top-k labels with probabilities; ``child`` for parent labels)."""

    def requests(self, chat, stream):
        return [{"adapter": chat.adapter, "image": chat.image, "text": chat.question, "usage": True}]

    def answer(self, chat, results):
        result = results[0]
        usage = result["usage"]
        return Answer(result["answer"], usage["prompt_tokens"], usage["completion_tokens"],
                      extra=_extra(chat, result, task=self.registry_name))


@CHAT_KINDS.register("classification")
class ClassificationChat(LabelChat):
    """As VQA; whether the text is read depends on the bundle (a fixed prompt: not)."""


@CHAT_KINDS.register("retrieval")
class RetrievalChat(ChatKind):
    """Scores the image against each candidate text (one runtime request each, batched
    together; the image is encoded once) and answers the most similar candidate."""
    question_hint = "candidate texts, one per line or separated by commas"

    def problem(self, question):
        if len(candidates(question or "")) > MAX_CANDIDATES:
            return f"at most {MAX_CANDIDATES} candidate texts"
        return None

    def requests(self, chat, stream):
        return [{"adapter": chat.adapter, "image": chat.image, "text": text, "usage": True}
                for text in candidates(chat.question or "")]

    def answer(self, chat, results):
        ranked = sorted(zip(candidates(chat.question or ""), results), key=lambda pair: -pair[1]["similarity"])
        best, result = ranked[0]
        return Answer(best, sum(r["usage"]["prompt_tokens"] for r in results), result["usage"]["completion_tokens"],
                      extra={"adapter": chat.adapter, "task": self.registry_name, "question": chat.question,
                             "similarities": [{"candidate": c, "similarity": r["similarity"]} for c, r in ranked]})


@CHAT_KINDS.register("captioning")
class GenerativeChat(ChatKind):
    """Generates with the bundle's task (Task.generate_text) under the request's options, the
    text streamed as it is written where the decoding allows (greedy, sampling)."""
    question = "ignored"
    reads_messages = False          # instruct: True, the conversation goes to the task
    text_key = "caption"            # where the task's decode puts the text

    def requests(self, chat, stream):
        request = {"adapter": chat.adapter, "image": chat.image, "generation": chat.options, "stream": stream}
        if self.reads_messages:
            request["messages"] = [{"role": m["role"], "content": m["text"]} for m in chat.messages]
        return [request]

    def answer(self, chat, results):
        result = results[0]
        usage = result["usage"]
        return Answer(result[self.text_key], usage["prompt_tokens"], usage["completion_tokens"],
                      usage["finish_reason"], extra=_extra(chat, result, task=self.registry_name))


@CHAT_KINDS.register("instruct")
class InstructChat(GenerativeChat):
    """The conversation goes to the task, which writes the answer to its last user turn."""
    question = "required"
    question_hint = "a question about the image"
    reads_messages = True
    text_key = "answer"


def candidates(text: str) -> list[str]:
    """Candidate texts for a retrieval adapter: one per line, or, on a single line, separated by
    commas; an optional leading ``candidates:`` is dropped; blanks and repeats are left out.
    ``"candidates: a red circle, a blue square"`` and ``"a red circle\\na blue square"`` both
    give two."""
    text = text.strip()
    if text.lower().startswith(CANDIDATES_PREFIX):
        text = text[len(CANDIDATES_PREFIX):]
    lines = [line for line in text.splitlines() if line.strip()]
    parts = lines if len(lines) > 1 else text.split(",")
    return list(dict.fromkeys(part.strip() for part in parts if part.strip()))
