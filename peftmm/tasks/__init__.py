"""Tasks: the head on top of the fused vector, its loss and its metrics. Registered in TASKS.

Every registered task is one module here (vqa.py, classification.py) or one package whose
``task.py`` is the task and whose other modules are its helpers (captioning/, retrieval/).
What any other layer may ask of a task is declared on :class:`~.base.Task` (base.py); label
tasks share labels.py.
"""

from __future__ import annotations

from ..registry import Registry

TASKS = Registry("task")


def build_task(config, labels: list[str]):
    return TASKS.get(config.type)(config, labels)


from . import captioning, classification, instruct, retrieval, vqa  # noqa: E402,F401  (each registers itself)
