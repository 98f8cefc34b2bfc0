"""The README's Python example runs as written (on the real zoo backbones), and the shipped
default bundle answers questions right after set-up."""

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.integration


def test_readme_python_example_runs(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    shutil.rmtree(ROOT / "runs/api-demo", ignore_errors=True)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert 0.0 <= float(out[0]) <= 1.0
    assert "'answer':" in out[1]
    assert (ROOT / "runs/api-demo/bundle/adapter_model.safetensors").is_file()


def test_shipped_default_bundle_is_accurate(monkeypatch):
    from peftmm import evaluate_bundle

    monkeypatch.chdir(ROOT)
    metrics = evaluate_bundle("easy-vqa-lora", split="test", max_samples=400, progress=False)
    assert metrics["examples"] == 400 and metrics["accuracy"] >= 0.99
