"""bench/serve_load.py's instruct mix end to end on tiny bundles: a real `peftmm serve` process,
concurrent official `openai` clients over two instruct adapters (streamed) and one VQA adapter,
every answer checked against a single-adapter run; the JSON and chart it writes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import perturb
from serving import METHODS, make_bundle
from test_instruct import build, data_file, instruct_recipe, tiny_models  # noqa: F401 (fixtures)

from peftmm.bundle import save_bundle

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.usefixtures("keep_torch_rng_module")


@pytest.fixture(scope="module")
def adapters(tiny_models, data_file, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("chat-a", "chat-b")):
        torch.manual_seed(20 + seed)
        recipe, model, _ = build(instruct_recipe(tiny_models, data_file, max_new_tokens=4))
        perturb(model, 0.5)
        save_bundle(model, recipe, root / name)
    make_bundle(tiny_models, root, "vqa", 3, **dict(METHODS["lora-text"]))
    return root


def _bench(adapters, out, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--adapters", str(adapters),
                           "--out", str(out), *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_instruct_mix_runs_and_reports_zero_mixed_answers(adapters, tmp_path):
    done = _bench(adapters, tmp_path, "--instruct", "chat-a", "chat-b", "--vqa", "vqa", "--clients", "4",
                  "--requests", "3", "--distinct", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "serve-instruct.json").read_text())
    assert report["total"] == 12 and report["wrong_or_mixed"] == 0 and report["errors"] == 0
    assert report["adapters"] == {"instruct": ["chat-a", "chat-b"], "vqa": ["vqa"]}
    assert report["distinct_items"] == 6 and report["clients"] == 4
    streamed = report["streamed"]
    assert 0 < streamed < 12   # the instruct requests stream, the VQA ones do not
    ttft, latency = report["time_to_first_token_s"], report["latency_by_kind_s"]["instruct"]
    assert 0 < ttft["p50"] <= ttft["p95"] <= ttft["max"] <= latency["max"]
    assert report["server"]["batches"] >= 1 and report["server"]["largest_batch"] >= 1
    assert (tmp_path / "serve-instruct.png").stat().st_size > 10_000
    # the docs' table (bench/readme_tables.py, block serve-instruct) renders from this JSON
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    row = tables.serve_instruct(report).splitlines()[2]
    assert row.startswith("| 4 x 3 | chat-a, chat-b | vqa | 0 of 12 | 0 |"), row


def test_a_bundle_given_as_the_wrong_kind_is_refused(adapters, tmp_path):
    done = _bench(adapters, tmp_path, "--instruct", "chat-a", "--vqa", "chat-b", "--requests", "1")
    assert done.returncode != 0
    assert "chat-b is a bundle of task instruct: give instruct bundles to --instruct" in done.stderr
    assert not (tmp_path / "serve-instruct.json").exists()
