"""The documentation's examples are real: the Python example (docs/python-api.md) runs as written
on the real zoo backbones, every `peftmm` command line in the README and docs/ names a command and
options the CLI has, and the shipped default bundles answer questions right after set-up."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.integration
def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    """Run where a user would, from a checkout, but with runs/ landing in a temporary folder
    (the repository's own runs/ stays untouched)."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    for shared in ("recipes", "adapters"):   # the paths the example names, relative to the checkout
        (tmp_path / shared).symlink_to(ROOT / shared, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python-api.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert 0.0 <= float(out[0]) <= 1.0
    assert "'answer':" in out[1]
    assert (tmp_path / "runs/api-demo/bundle/adapter_model.safetensors").is_file()


def _command_lines():
    """(page, line) for every `peftmm ...` invocation inside a bash block of the README and docs/."""
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if re.match(r"(\.venv/bin/)?peftmm ", line):
                    yield page.relative_to(ROOT).as_posix(), line


    # the CLI reference's table: its first column is a synopsis, `peftmm COMMAND ARGS [--option ...]`
    for synopsis in re.findall(r"^\| `(peftmm [^`]+)` \|", (ROOT / "docs" / "cli.md").read_text(), re.M):
        yield "docs/cli.md", synopsis


COMMAND_LINES = list(_command_lines())


def test_docs_show_command_lines():
    pages = {page for page, _ in COMMAND_LINES}
    assert {"README.md", "docs/bundle-format.md", "docs/training.md", "docs/cli.md"} <= pages, pages


@pytest.mark.parametrize("page,line", COMMAND_LINES, ids=[f"{p}:{line[:60]}" for p, line in COMMAND_LINES])
def test_documented_command_lines_exist(page, line):
    """The command and each --option shown are the CLI's own (a renamed option fails here)."""
    from peftmm.cli import main

    name = line.split()[1]
    command = main.commands.get(name)
    assert command is not None, f"{page}: `{line}`: no command {name!r}; have {sorted(main.commands)}"
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts} | {"--help"}
    given = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    assert given <= known, f"{page}: `{line}`: {sorted(given - known)} not options of `peftmm {name}`"


# The easy-VQA bundles (the emoji ones are checked in tests/test_emoji_bundles.py).
SHIPPED = sorted(p.name for p in (ROOT / "adapters").iterdir()
                 if (p / "peftmm_config.json").is_file()
                 and json.loads((p / "peftmm_config.json").read_text())["task"] == "vqa")


@pytest.mark.integration
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_bundles_are_accurate(monkeypatch, name):
    from peftmm import evaluate_bundle

    monkeypatch.chdir(ROOT)
    metrics = evaluate_bundle(name, split="test", max_samples=400, progress=False)
    assert metrics["examples"] == 400 and metrics["accuracy"] >= 0.99


@pytest.mark.integration
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
    for request, served in zip(requests, runtime.predict(requests), strict=True):
        alone = Predictor.load(ROOT / "adapters" / request["adapter"], device="cpu").predict(image, request["text"])
        assert served["answer"] == alone["answer"]
