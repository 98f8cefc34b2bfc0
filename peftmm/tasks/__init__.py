"""Tasks: the head on top of the fused vector, its loss and its metrics. Registered in TASKS."""

from __future__ import annotations

from ..registry import Registry

TASKS = Registry("task")


def build_task(config, labels: list[str]):
    return TASKS.get(config.type)(config, labels)


from . import classification, retrieval, vqa  # noqa: E402,F401  (each registers itself)
from . import captioning  # noqa: E402,F401  (a decoder LM writes the text)
