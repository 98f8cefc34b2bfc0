"""Data sources, one module each, registered by name in DATASETS.

A source returns :class:`Splits`: lists of examples (``{"image": path, "text": ..., "label": ...}``)
for train / val / test, plus the label set. Validation always comes out of train, so the test
split is only ever used for the reported test numbers. Conversation sources (``llava``,
``messages``) and the conversation views of the built-in ones (``data.conversations: true``) add
a ``conversation`` to each example (shape in :mod:`peftmm.data.conversations`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..registry import Registry

DATASETS = Registry("data source")
# data.conversations: a source's examples as conversations (data/conversation_views.py), by source name
CONVERSATION_VIEWS = Registry("conversation view")


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    labels: list[str]
    metadata: dict = field(default_factory=dict)   # e.g. attribution and license of the images

    def __getitem__(self, name: str) -> list[dict]:
        return getattr(self, name)


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone: splits that do not move between runs or machines."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def load_splits(spec) -> Splits:
    splits = DATASETS.get(spec.source, "data.source")(spec)
    if getattr(spec, "conversations", False):
        splits = CONVERSATION_VIEWS.get(spec.source, "data.source (with data.conversations: true)")(splits, spec)
    if spec.max_train_samples:
        splits.train = splits.train[: spec.max_train_samples]
    if spec.max_eval_samples:
        splits.val = splits.val[: spec.max_eval_samples]
        splits.test = splits.test[: spec.max_eval_samples]
    return splits


from . import conversation_views, conversations, easy_vqa, emoji, files  # noqa: E402,F401  (each registers itself)
