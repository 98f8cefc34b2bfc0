"""The README's Python example runs as written (on the real zoo backbones), and the shipped
default bundle answers questions right after set-up."""

import json
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


# The easy-VQA bundles (the emoji ones are checked in tests/test_emoji_bundles.py).
SHIPPED = sorted(p.name for p in (ROOT / "adapters").iterdir()
                 if (p / "adapter_config.json").is_file()
                 and json.loads((p / "adapter_config.json").read_text())["task"] == "vqa")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_bundles_are_accurate(monkeypatch, name):
    from peftmm import evaluate_bundle

    monkeypatch.chdir(ROOT)
    metrics = evaluate_bundle(name, split="test", max_samples=400, progress=False)
    assert metrics["examples"] == 400 and metrics["accuracy"] >= 0.99


def test_shipped_bundles_serve_from_one_runtime():
    """All shipped bundles on one pair of backbones; each answers as it does alone."""
    import easy_vqa

    from peftmm import Predictor, Runtime

    runtime = Runtime(device="cpu", root=ROOT / "adapters")
    for name in SHIPPED:
        runtime.register(name)
    assert len(runtime.backbones()) == 2 and len(SHIPPED) >= 3
    image = easy_vqa.get_test_image_paths()[0]
    requests = [{"adapter": name, "image": image, "text": "what shape is in the image?"} for name in SHIPPED]
    for request, served in zip(requests, runtime.predict(requests)):
        alone = Predictor.load(ROOT / "adapters" / request["adapter"], device="cpu").predict(image, request["text"])
        assert served["answer"] == alone["answer"]
