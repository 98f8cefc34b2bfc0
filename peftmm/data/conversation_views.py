"""Generative views of the built-in sources (recipe ``data.conversations: true``).

Each view turns a source's examples into conversation examples of the shape documented in
:mod:`peftmm.data.conversations`, keeping the splits the source made (so no image moves between
train and test) and the source's own fields:

- ``easy-vqa``: each question, one turn; the answer word is the assistant's answer.
- ``emoji``: several questions about each picture, one example per kind of question (the
  example's ``question`` field names it): ``name`` ("What is this emoji?" -> its English name),
  and the Unicode category that ``data.label`` names: ``group`` ("Which emoji group is this
  in?"), ``subgroup`` ("Which emoji subgroup is this in?"), or both for ``group > subgroup``.
  A split's examples stay grouped by picture, in the source's order.

Each example's ``label`` becomes its answer; ``Splits.labels`` stay the source's (easy-VQA's 13
answers, emoji's groups or subgroups). The answers a generative model is measured against are
the examples' ``label`` values, and its training vocabulary is that of train
(:func:`peftmm.tasks.answer_metrics.answer_vocabulary`).
- ``llava`` and ``messages`` are conversations already: their view changes nothing.
"""

from __future__ import annotations

from . import CONVERSATION_VIEWS, Splits

EMOJI_QUESTIONS = {"name": "What is this emoji?", "group": "Which emoji group is this in?",
                   "subgroup": "Which emoji subgroup is this in?"}
_EMOJI_KINDS = {"group": ("name", "group"), "subgroup": ("name", "subgroup"),
                "group > subgroup": ("name", "group", "subgroup")}


def one_turn(question: str, answer: str) -> list[dict]:
    """A conversation of one question (the image at its start) and one answer."""
    return [{"role": "user", "text": question, "images": 0}, {"role": "assistant", "text": answer, "images": 0}]


@CONVERSATION_VIEWS.register("easy-vqa")
def easy_vqa_conversations(splits: Splits, spec=None) -> Splits:
    for name in ("train", "val", "test"):
        splits[name][:] = [{**e, "conversation": one_turn(e["text"], e["label"])} for e in splits[name]]
    return splits


@CONVERSATION_VIEWS.register("emoji")
def emoji_conversations(splits: Splits, spec=None) -> Splits:
    """``splits`` as :func:`peftmm.data.emoji.emoji_splits` makes them (rows with ``text`` the
    name, ``group``, ``subgroup``); ``spec.label`` picks the category questions."""
    label = getattr(spec, "label", "group")
    kinds = _EMOJI_KINDS[label]
    for name in ("train", "val", "test"):
        splits[name][:] = [_emoji_example(row, kind) for row in splits[name] for kind in kinds]
    splits.metadata["questions"] = {kind: EMOJI_QUESTIONS[kind] for kind in kinds}
    return splits


def _emoji_example(row: dict, kind: str) -> dict:
    answer = row["text"] if kind == "name" else row[kind]
    question = EMOJI_QUESTIONS[kind]
    return {**row, "text": question, "label": answer, "question": kind, "name": row["text"],
            "conversation": one_turn(question, answer)}


@CONVERSATION_VIEWS.register("llava")
@CONVERSATION_VIEWS.register("messages")
def already_conversations(splits: Splits, spec=None) -> Splits:
    return splits
