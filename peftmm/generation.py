"""Generation options and token streams for the tasks that write text with a decoder LM.

The interface a text-writing task implements (captioning now; an ``instruct`` task plugs in
the same way) is :meth:`peftmm.tasks.base.Task.generate_text`::

    task.generate_text(model, batch, options: GenerationOptions, streams: list[Callable | None])
        -> Generated(ids, prompt_tokens, completion_tokens, stopped)

- ``batch`` is what the task's own ``text_inputs`` built for the rows (the runtime passes each
  row's example as ``{"text": None, "messages": [...] or None}``: a captioner ignores
  ``messages``; an instruct task builds its prompt from them) plus the vision tokens.
- ``options`` (below) override the bundle's own settings for this call only: ``max_tokens``
  caps the new tokens, ``temperature > 0`` samples (with ``top_p``) under ``seed``, otherwise
  the bundle decodes as it was trained to (greedy, beam search, MBR). ``stop`` strings may end
  a row early; the caller cuts the text at the first one in any case (:func:`cut_at_stop`).
- ``streams`` has one entry per row: a callable that takes that row's text so far each time it
  grows (a :class:`TokenStream` does this from inside ``generate``), or None. The whole text
  rather than the new piece, so a caller never sends a piece twice should a row be generated
  again (the micro-batcher retries a failed batch one request at a time). A task may call none
  of them (beam search only knows its text at the end): callers send whatever was not streamed
  once the result is in.
- ``Generated.ids`` are the new token ids after the prompt, padded after EOS, that the task's
  ``decode`` turns into text; the counts are per row, for the API's ``usage``.

A task whose rows of several adapters may share one ``generate`` (instruct: each adapter's own
projector fills its rows' image slots, then one LM pass over all rows, LoRA choosing each row's
adapter through ``tower.slots.rows``) splits this in two (Task.shared_generation): its
``prompt_embeddings`` give a :class:`Prompt` per adapter, :func:`join_prompts` left-pads them into
one, and its ``generate_embedded`` writes from that (runtime_generation.py drives it).

The runtime (Runtime.predict) calls it for every request of such an adapter that carries
``"generation": GenerationOptions`` (and optionally ``"stream"``, ``"messages"``), so the
OpenAI-compatible API (serve/openai_api.py) serves any task that implements it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import DataError

MAX_TOKENS = 1024      # as captioning's task.max_new_tokens allows
MAX_STOP = 4           # stop strings per request, as OpenAI allows
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request generation settings; None leaves the bundle's own setting. Hashable, so rows
    with equal options can be generated together."""
    max_tokens: int | None = None
    temperature: float | None = None    # 0 or None: the bundle's deterministic decoding
    top_p: float | None = None          # only with temperature > 0
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None              # only with temperature > 0

    def __post_init__(self):
        for name, problem in option_problems(self.max_tokens, self.temperature, self.top_p, self.stop, self.seed):
            raise DataError(problem, name)

    @property
    def sampling(self) -> bool:
        return self.temperature is not None and self.temperature > 0


def option_problems(max_tokens=None, temperature=None, top_p=None, stop=(), seed=None) -> list[tuple[str, str]]:
    """(option, what is wrong) for each value out of range (the API reports them by its own names)."""
    out = []
    if max_tokens is not None and not (_int(max_tokens) and 1 <= max_tokens <= MAX_TOKENS):
        out.append(("max_tokens", f"must be an integer from 1 to {MAX_TOKENS}, not {max_tokens!r}"))
    if temperature is not None and not (_number(temperature) and 0 <= temperature <= 2):
        out.append(("temperature", f"must be a number from 0 to 2, not {temperature!r}"))
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        out.append(("top_p", f"must be a number above 0 and at most 1, not {top_p!r}"))
    if seed is not None and not (_int(seed) and 0 <= seed <= MAX_SEED):
        out.append(("seed", f"must be an integer from 0 to {MAX_SEED}, not {seed!r}"))
    if not isinstance(stop, tuple) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        out.append(("stop", f"must be at most {MAX_STOP} non-empty strings, not {stop!r}"))
    return out


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass
class Generated:
    ids: torch.Tensor               # [B, T] new token ids, padded after EOS
    prompt_tokens: list[int]        # per row: every position the LM read before writing (vision tokens too)
    completion_tokens: list[int]    # per row: tokens written, EOS included
    stopped: list[bool]             # per row: ended by EOS (False: max_tokens reached)


@dataclass
class Prompt:
    """Rows ready for the LM: input embeddings (left-padded), their attention mask, and per row
    the positions the LM reads (``Generated.prompt_tokens``)."""
    embeds: torch.Tensor            # [B, L, D]
    mask: torch.Tensor              # [B, L]
    tokens: list[int]


def join_prompts(prompts: list[Prompt]) -> Prompt:
    """One batch of the rows of ``prompts``, left-padded to the longest: a padded position is
    masked out, and positions follow the mask, so each row reads what it read alone."""
    if len(prompts) == 1:
        return prompts[0]
    length = max(p.embeds.shape[1] for p in prompts)
    embeds, masks = [], []
    for p in prompts:
        missing = length - p.embeds.shape[1]
        embeds.append(torch.cat([p.embeds.new_zeros(p.embeds.shape[0], missing, p.embeds.shape[2]), p.embeds], 1))
        masks.append(torch.cat([p.mask.new_zeros(p.mask.shape[0], missing), p.mask], 1))
    return Prompt(torch.cat(embeds), torch.cat(masks), [n for p in prompts for n in p.tokens])


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string (OpenAI's rule: the stop string is
    not returned), and whether one was found."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def safe_prefix(text: str, stop) -> str:
    """The part of a growing ``text`` that can be sent now: up to a stop string where one has
    appeared, else all but a tail that may still become the start of one."""
    cut, found = cut_at_stop(text, stop)
    if found:
        return cut
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold]


@contextlib.contextmanager
def seeded(seed: int | None, device):
    """Draws inside are repeatable for a seed; the global random state is left as it was."""
    if seed is None:
        yield
        return
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class TokenStream:
    """A stopping criterion for ``generate`` that never stops anything: after each step in which
    a streamed row's text grew, it sends that row's text so far (decoded from all its tokens, so
    word pieces join as in the final text) to the row's callable. Trailing whitespace is held
    back, as the final text is stripped. Only for one sequence per row (greedy or sampling):
    beams are not final."""

    def __init__(self, tokenizer, streams: list[Callable[[str], None] | None], eos: int):
        self.tokenizer, self.streams, self.eos = tokenizer, streams, eos
        self.sent = [""] * len(streams)
        self.done = [stream is None for stream in streams]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        for row, stream in enumerate(self.streams):
            if self.done[row]:
                continue
            ids = input_ids[row].tolist()
            if self.eos in ids:
                ids, self.done[row] = ids[: ids.index(self.eos)], True
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            if text != self.sent[row]:
                stream(text)
                self.sent[row] = text
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
