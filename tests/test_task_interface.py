"""The task interface is declared (tasks/base.py) and the package's layers hold (pyproject.toml).

Outside peftmm/tasks/ no code may inspect a task object: no hasattr/getattr/isinstance/issubclass
on it, no comparison of its registry name, no attribute that Task does not declare, none of its
settings (``task.config.<field>``: which exist depends on the task). The scan
below reads the source (AST) and knows a task by how this code names it: a variable ``task``,
``<model>.task`` / ``<core>.task`` (``self.task`` inside MultimodalModel), ``TASKS.get(...)``,
``build_task(...)``, or a class whose name ends in ``Task``. Run as a script it prints every
place it finds (``PYTHONPATH=. python tests/test_task_interface.py``).
"""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftmm.tasks import TASKS
from peftmm.tasks.base import Task
from peftmm.tasks.labels import LabelTask

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peftmm"
PROBES = {"hasattr", "getattr", "isinstance", "issubclass", "type"}
DECLARED = set(dir(Task)) | set(Task.__annotations__)   # annotated: instance attributes set by __init__


class _Scan(ast.NodeVisitor):
    def __init__(self, where: str):
        self.where, self.found, self.classes = where, [], []

    def visit_ClassDef(self, node):
        self.classes.append(node.name)
        self.generic_visit(node)
        self.classes.pop()

    def is_task(self, node) -> bool:
        if isinstance(node, ast.Name):
            return node.id == "task" or node.id.endswith("Task")
        if isinstance(node, ast.Attribute) and node.attr == "task":
            base = node.value
            last = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            return last in ("model", "core") or (last == "self" and self.classes[-1:] == ["MultimodalModel"])
        if isinstance(node, ast.Call):
            func = node.func
            registry = (isinstance(func, ast.Attribute) and func.attr == "get"
                        and getattr(func.value, "id", None) == "TASKS")
            return registry or isinstance(func, ast.Name) and func.id == "build_task"
        return False

    def mentions_task(self, node) -> bool:
        return any(self.is_task(n) for n in ast.walk(node))

    def note(self, node, what: str) -> None:
        self.found.append(f"{self.where}:{node.lineno}: {what}")

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in PROBES and any(map(self.mentions_task, node.args)):
            self.note(node, f"{node.func.id}() on a task")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if self.is_task(node.value) and node.attr not in DECLARED:
            self.note(node, f"task attribute {node.attr!r} is not declared on Task")
        value = node.value   # its settings are the task's own business: which ones it has depends on the task
        if isinstance(value, ast.Attribute) and value.attr == "config" and self.is_task(value.value):
            self.note(node, f"a task's setting {node.attr!r} read")
        self.generic_visit(node)

    def visit_Compare(self, node):
        for side in [node.left, *node.comparators]:
            if isinstance(side, ast.Attribute) and side.attr == "registry_name" and self.is_task(side.value):
                self.note(node, "a task's registry_name compared")
        self.generic_visit(node)


def scan(source: str, where: str = "<source>") -> list[str]:
    visitor = _Scan(where)
    visitor.visit(ast.parse(source))
    return visitor.found


def inspections() -> list[str]:
    """Every place outside peftmm/tasks/ that inspects a task object."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "tasks" not in path.parents:
            found += scan(path.read_text(), str(path.relative_to(ROOT)))
    return found


def test_no_code_outside_tasks_inspects_a_task():
    assert inspections() == []


@pytest.mark.parametrize("source", [
    'if hasattr(model.task, "evaluate"): pass',
    'names = getattr(self.model.task, "cached_towers", TOWERS)',
    "issubclass(TASKS.get(recipe.task.type), VQATask)",
    "isinstance(self.model.task, RetrievalTask)",
    'if self.model.task.registry_name == "retrieval": pass',
    "probs = self.model.task.logits(images, texts)",      # RetrievalTask's own, not declared on Task
    "def f(task, example):\n    return task.config.prompt",
])
def test_the_scan_finds_each_kind_of_probe(source):
    assert len(scan(source)) == 1, source


@pytest.mark.parametrize("source", [
    "model.task.loss(outputs, targets)",
    "getattr(recipe, name).precision",
    'recipe.task.type == "vqa"',                           # a recipe's task settings, not a task
    "TASKS.get(recipe.task.type).text_tower_causal_lm",
    "class MultimodalModel:\n    def forward(self, batch):\n        return self.task.forward(self, batch)",
])
def test_the_scan_lets_declared_use_pass(source):
    assert scan(source) == []


def test_label_tasks_share_a_base_instead_of_inheriting_from_each_other():
    vqa, classification = TASKS.get("vqa"), TASKS.get("classification")
    assert vqa.__bases__ == classification.__bases__ == (LabelTask,)
    assert not issubclass(classification, vqa)
    assert {n for n in TASKS.names() if TASKS.get(n).classifies_into_labels} == {"vqa", "classification"}


def test_every_task_has_one_metrics_signature_and_only_declared_public_members():
    for name in TASKS.names():
        task = TASKS.get(name)
        assert list(inspect.signature(task.metrics).parameters) == ["self", "outputs", "targets"], name
        for member, value in vars(task).items():
            if not member.startswith("_") and member not in ("Config",) and not callable(value):
                assert member in DECLARED, f"{name}.{member}: declare it on Task"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([command, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_import_contracts_catch_an_upward_import(tmp_path):
    """The same contracts on a copy of the package in which bundle.py imports the trainer."""
    shutil.copytree(PACKAGE, tmp_path / "peftmm", ignore=shutil.ignore_patterns("__pycache__", "*.json", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    bundle = tmp_path / "peftmm" / "bundle.py"
    bundle.write_text(bundle.read_text() + "\nfrom .trainer import evaluate  # noqa: E402,F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "peftmm.bundle is not allowed to import peftmm.trainer" in result.stdout
    assert "layers BROKEN" in result.stdout and "no import cycles, at any depth BROKEN" in result.stdout


if __name__ == "__main__":
    found = inspections()
    print("\n".join(found + [f"{len(found)} places outside peftmm/tasks/ inspect a task"]))
