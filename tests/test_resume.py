"""Checkpoints and `peftmm train --resume`: a run stopped at any point (an exception in-process,
or SIGKILL of a real `python -m peftmm train`) continues from its latest complete checkpoint and
ends bit-identical to a run never interrupted (CPU, fp32): same bundle tensors, same final
checkpoint (trainable tensors, optimizer state, random generators), same metrics.jsonl records
and final metrics (all but timings). Also: the checkpoint round trip, keep-last-K pruning, a
damaged latest checkpoint, refusals of another recipe, and a NaN loss. Tiny MobileNetV2 + BERT
(LoRA with dropout on the text tower) on a slice of easy-VQA."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from peftmm import PeftmmError, recipe_from_dict
from peftmm.bundle import read_tensors
from peftmm.checkpoint import POINTER, STATE, TENSORS, Checkpointer, load_latest, prune, read_checkpoint
from peftmm.cli import main
from peftmm.io import fsync_dir
from peftmm.run_state import flatten_optimizer, unflatten_optimizer
from peftmm.tasks.vqa import VQATask
from peftmm.trainer import train

# 96 train examples in batches of 16: 6 batches an epoch, 18 steps in 3 epochs. "grouped": images'
# questions batched together, the vision tower uncached with augmentation, 2 batches per step.
VARIANTS = {
    "shuffled": {"train": {}, "vision": {}},
    "grouped": {"train": {"group_by_image": True, "grad_accum": 2},
                "vision": {"cache_features": False, "augment": {"crop_scale": 0.8, "rotate": 10.0}}},
}


# Bit-identical resuming is promised on CPU in fp32; in-process runs use CUDA where there is one.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="in-process runs would train on CUDA")


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(tiny.build(kind, root / kind)) for kind in ("mobilenet_v2", "bert")}


# these runs seed torch; later modules' seeded expectations must not depend on them
pytestmark = pytest.mark.usefixtures("keep_torch_rng")


def recipe_dict(models, variant: str = "shuffled", **train_settings) -> dict:
    data = tiny.recipe(models["mobilenet_v2"], models["bert"], text_methods=[{"type": "lora", "r": 2, "dropout": 0.1}],
                       task={"type": "vqa", "hidden": 32, "dropout": 0.1},
                       train={"epochs": 3, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0, "patience": 5,
                              "checkpoint_every": 2, **VARIANTS[variant]["train"], **train_settings})
    data["vision"].update(VARIANTS[variant]["vision"])
    return data


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """Uninterrupted runs, one per variant, trained when first asked for: (result, run dir)."""
    runs = {}

    def get(variant: str):
        if variant not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference-{variant}") / "run"
            runs[variant] = train(recipe_from_dict(recipe_dict(models, variant)), run_dir, progress=False, log=quiet)
        return runs[variant]
    return get


def train_until(recipe, run_dir: Path, step: int):
    """Train until just before optimizer step ``step`` (it is computed, not applied), then fail."""
    original = Checkpointer.check_loss

    def check_loss(self, loss, at, epoch):
        if at == step:
            raise Interrupted(f"step {at}")
        return original(self, loss, at, epoch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "check_loss", check_loss)
        with pytest.raises(Interrupted):
            train(recipe, run_dir, progress=False, log=quiet)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("samples_per_s", None)
        if "final" in record:
            record["final"].pop("train_seconds")
        out.append(record)
    return out


def latest(run_dir: Path) -> Path:
    folder = run_dir / "checkpoints"
    return folder / json.loads((folder / POINTER).read_text())["checkpoint"]


def assert_same_run(expected: Path, actual: Path, expected_metrics: dict, actual_metrics: dict) -> None:
    drop = lambda metrics: {k: v for k, v in metrics.items() if k != "train_seconds"}  # noqa: E731
    assert drop(actual_metrics) == drop(expected_metrics)
    assert records(actual) == records(expected)
    a, b = read_tensors(expected / "bundle"), read_tensors(actual / "bundle")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the last checkpoint: trainable tensors as training left them (the bundle holds the best
    # epoch's), the optimizer's moments, the random generators
    first, second = latest(expected), latest(actual)
    assert first.name == second.name
    assert (first / TENSORS).read_bytes() == (second / TENSORS).read_bytes()
    state_a, state_b = (json.loads((path / STATE).read_text()) for path in (first, second))
    state_a.pop("seconds"), state_b.pop("seconds")
    assert state_a == state_b


@cpu_only
def test_checkpoint_round_trip_is_exact(models, tmp_path):
    """What a checkpoint reads back equals what training held when it was written."""
    held = {}
    original = Checkpointer.save

    def save(self, run, elapsed):
        original(self, run, elapsed)
        parts = self.parts
        held[self.latest] = {"optimizer": copy.deepcopy(parts.optimizer.state_dict()),
                             "scheduler": copy.deepcopy(parts.scheduler.state_dict()),
                             "model": {k: v.detach().clone() for k, v in parts.core.trainable_state_dict().items()},
                             "rng": torch.get_rng_state(), "step": parts.accelerator.step, "run": copy.deepcopy(run)}

    recipe = recipe_from_dict(recipe_dict(models, epochs=1, keep_checkpoints=5))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "save", save)
        train(recipe, tmp_path / "run", progress=False, log=quiet)
    assert sorted(held) == ["step-00000002", "step-00000004", "step-00000006"]  # 6 batches: the 3rd is the epoch's
    folder = tmp_path / "run" / "checkpoints"
    assert load_latest(tmp_path / "run", recipe, quiet).path.name == "step-00000006"
    for name, expected in held.items():
        saved = read_checkpoint(folder / name)
        assert saved.path.name == name
        model = saved.part("model.")
        assert model.keys() == expected["model"].keys()
        assert all(torch.equal(model[k], expected["model"][k]) for k in model)
        optimizer = unflatten_optimizer(saved.state["optimizer"], saved.part("optimizer."),
                                        expected["optimizer"]["param_groups"])
        assert optimizer["param_groups"] == expected["optimizer"]["param_groups"]
        assert optimizer["state"].keys() == expected["optimizer"]["state"].keys()
        for index, entries in expected["optimizer"]["state"].items():
            assert optimizer["state"][index].keys() == entries.keys()
            assert all(torch.equal(optimizer["state"][index][k], v) for k, v in entries.items())
        assert saved.state["scheduler"] == expected["scheduler"]
        assert torch.equal(saved.tensors["rng.torch"], expected["rng"])
        run = expected["run"]
        assert (saved.state["epoch"], saved.state["batches"], saved.state["step"]) == (run.epoch, run.batches, run.step)
        assert saved.state["accumulation_step"] == expected["step"]
    best = read_checkpoint(folder / "step-00000006")
    assert best.part("best.").keys() == held["step-00000006"]["model"].keys()   # the best epoch's state
    assert not read_checkpoint(folder / "step-00000004").part("best.")  # none yet


def test_flattened_optimizer_loads_into_a_fresh_one_and_steps_identically():
    def build():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        return module, torch.optim.AdamW([{"params": module[0].parameters()},
                                          {"params": module[1].parameters(), "lr": 0.1}], lr=0.01)

    def step(module, optimizer, seed):
        optimizer.zero_grad()
        module(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        optimizer.step()

    first, optimizer = build()
    for seed in range(3):
        step(first, optimizer, seed)
    data, tensors = flatten_optimizer(optimizer.state_dict())
    data = json.loads(json.dumps(data))   # as state.json stores it
    second, fresh = build()
    second.load_state_dict(first.state_dict())
    fresh.load_state_dict(unflatten_optimizer(data, {k.split(".", 1)[1]: v.clone() for k, v in tensors.items()},
                                              fresh.param_groups))
    assert fresh.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    for seed in range(3, 6):
        step(first, optimizer, seed)
        step(second, fresh, seed)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


@cpu_only
@pytest.mark.parametrize("variant, stop_at", [
    ("shuffled", 10),   # last checkpoint at step 8, 2 batches into epoch 2; step 9 is trained again
    ("grouped", 4),     # last checkpoint at the end of epoch 1 (step 3)
])
def test_resumed_run_equals_uninterrupted(models, reference, tmp_path, variant, stop_at):
    expected = reference(variant)
    recipe = recipe_from_dict(recipe_dict(models, variant))
    train_until(recipe, tmp_path / "run", stop_at)
    lines = []
    resumed = train(recipe, tmp_path / "run", progress=False, log=lines.append, resume=True)
    assert any(line.startswith("peftmm: resuming from ") for line in lines)
    assert_same_run(expected.run_dir, tmp_path / "run", expected.metrics, resumed.metrics)


def files_recipe(models, folder: Path) -> dict:
    """A `files` data set whose train split has an undecodable image and an empty question."""
    (folder / "img").mkdir(parents=True)
    rows = [("train", i) for i in range(12)] + [("train", "corrupt"), ("train", "empty")] + \
        [("val", 20 + i) for i in range(4)] + [("test", 30 + i) for i in range(4)]
    lines = []
    for n, (split, kind) in enumerate(rows):
        name = f"img/{n}.png"
        if kind == "corrupt":
            (folder / name).write_bytes(b"not a png" * 20)
        else:
            Image.new("RGB", (32, 32), ((n * 37) % 256, (n * 91) % 256, 128)).save(folder / name)
        lines.append(json.dumps({"image": name, "split": split, "label": "circle" if n % 2 else "square",
                                 "text": "   " if kind == "empty" else "what shape is this?"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return {"name": "bad-samples", "vision": {"backbone": models["mobilenet_v2"], "cache_features": False},
            "text": {"backbone": models["bert"], "max_length": 16,
                     "methods": [{"type": "lora", "r": 2, "dropout": 0.1}]},
            "fusion": {"type": "concat-mlp", "dim": 16, "dropout": 0.1},
            "task": {"type": "classification", "hidden": 16, "dropout": 0.1},
            "data": {"source": "files", "path": str(folder / "data.jsonl")},
            "train": {"epochs": 3, "batch_size": 2, "eval_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0,
                      "patience": 5, "checkpoint_every": 2}}


@cpu_only
def test_resume_keeps_the_counts_of_skipped_examples(models, tmp_path):
    recipe = recipe_from_dict(files_recipe(models, tmp_path / "data"))
    expected = train(recipe, tmp_path / "whole", progress=False, log=quiet)
    assert (expected.metrics["skipped_train"], expected.metrics["steps"]) == (2, 21)  # 7 batches an epoch
    train_until(recipe, tmp_path / "run", 11)
    saved = load_latest(tmp_path / "run", recipe, quiet)
    # 3 batches into epoch 2, its empty text counted; the loader had made batch 4 already, whose
    # image cannot be decoded: not counted yet, as the resumed run will count it
    assert (saved.state["epoch"], saved.state["batches"]) == (2, 3)
    assert saved.state["skips"]["train"]["reasons"] == {"empty text": 1}
    assert saved.state["skips"]["train"]["ever"] == [12, 13]
    resumed = train(recipe, tmp_path / "run", progress=False, log=quiet, resume=True)
    assert_same_run(tmp_path / "whole", tmp_path / "run", expected.metrics, resumed.metrics)


@cpu_only
def test_keeps_the_last_checkpoints(reference):
    run_dir = reference("shuffled").run_dir
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [POINTER, "step-00000016", "step-00000018"]
    assert json.loads((folder / POINTER).read_text())["checkpoint"] == "step-00000018"


def test_prune_keeps_the_pointed_one_and_removes_leftovers(tmp_path):
    for step in range(1, 6):
        (tmp_path / f"step-{step:08d}").mkdir()
    (tmp_path / ".step-00000006.x1y2").mkdir()   # a write killed before its rename
    (tmp_path / POINTER).write_text(json.dumps({"checkpoint": "step-00000002"}))
    prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [POINTER, "step-00000002", "step-00000004", "step-00000005"]


@pytest.mark.parametrize("code,raised", [(errno.EINVAL, False), (errno.ENOTSUP, False), (errno.EIO, True)])
def test_fsync_dir_skips_only_what_the_system_cannot_do(tmp_path, monkeypatch, code, raised):
    """Checkpoints and the feature cache make their renames durable through io.fsync_dir: a file
    system that cannot fsync a folder is not an error, a failing disk is."""
    fsync_dir(tmp_path)                                  # a real folder on a real file system
    opened = []
    real_open = os.open

    def track(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", track)
    monkeypatch.setattr(os, "fsync", fail)
    if raised:
        with pytest.raises(OSError) as error:
            fsync_dir(tmp_path)
        assert error.value.errno == code
    else:
        fsync_dir(tmp_path)
    with pytest.raises(OSError):                         # the folder's descriptor was closed either way
        os.fstat(opened[0])


@cpu_only
def test_damaged_latest_checkpoint_falls_back_to_the_previous(models, reference, tmp_path):
    expected = reference("shuffled")
    recipe = recipe_from_dict(recipe_dict(models))
    run_dir = tmp_path / "run"
    train_until(recipe, run_dir, 10)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [POINTER, "step-00000006", "step-00000008"]
    tensors = run_dir / "checkpoints" / "step-00000008" / TENSORS
    tensors.write_bytes(tensors.read_bytes()[:-100])   # cut short, as by a full disk

    broken = tmp_path / "all-broken"
    shutil.copytree(run_dir, broken)
    (broken / "checkpoints" / "step-00000006" / STATE).write_text("{")
    with pytest.raises(PeftmmError, match="no complete checkpoint to resume from") as error:
        load_latest(broken, recipe, quiet)
    assert "step-00000008: tensors.safetensors" in str(error.value) and "step-00000006: state.json is not JSON" \
        in str(error.value)

    lines = []
    resumed = train(recipe, run_dir, progress=False, log=lines.append, resume=True)
    warnings = [line for line in lines if line.startswith("peftmm: warning:")]
    assert len(warnings) == 1 and "step-00000008: tensors.safetensors" in warnings[0] and \
        "does not match its sha256" in warnings[0] and warnings[0].endswith("resuming from step-00000006 instead")
    assert_same_run(expected.run_dir, run_dir, expected.metrics, resumed.metrics)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(models, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = VQATask.loss

    def loss(self, logits, targets):
        value = original(self, logits, targets)
        if torch.is_grad_enabled():   # training, not evaluation
            calls["n"] += 1
            if calls["n"] == 5:
                return value * math.nan
        return value

    monkeypatch.setattr(VQATask, "loss", loss)
    recipe = recipe_from_dict(recipe_dict(models))
    run_dir = tmp_path / "run"
    with pytest.raises(PeftmmError, match=r"the loss is nan at step 5 \(epoch 1\); that step was not applied "
                                          r"and no bundle was written; the last good checkpoint, .*step-00000004, "
                                          r"is kept") as error:
        train(recipe, run_dir, progress=False, log=quiet)
    assert "peftmm train --resume" in str(error.value)
    assert not (run_dir / "bundle").exists()
    assert load_latest(run_dir, recipe, quiet).path.name == "step-00000004"
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]


def test_resume_refuses_another_recipe_and_a_run_without_checkpoints(models, tmp_path):
    data = recipe_dict(models)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_from_dict(data).to_dict(), sort_keys=False))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**data, "train": {**data["train"], "lr": 0.01}}))
    runner = CliRunner()

    def train_cli(*args):
        return runner.invoke(main, ["train", *args, "--no-progress"])

    result = train_cli(str(other), "--resume", str(run_dir))
    assert result.exit_code == 2 and "differs at train.lr (run: 0.005, given: 0.01)" in result.output
    result = train_cli("--resume", str(run_dir), "--set", "train.epochs=4")
    assert result.exit_code == 2 and "differs at train.epochs (run: 3, given: 4)" in result.output
    result = train_cli("--resume", str(run_dir), "--output", str(tmp_path / "elsewhere"))
    assert result.exit_code == 2 and "leave out --output" in result.output
    result = train_cli("--resume", str(tmp_path))
    assert result.exit_code == 2 and "not a run directory (it has no recipe.yaml)" in result.output
    result = train_cli()
    assert result.exit_code == 2 and "missing RECIPE" in result.output
    # the same recipe (and a --set that changes nothing) passes; then there is nothing to resume
    result = train_cli("--resume", str(run_dir), "--set", "train.epochs=3")
    assert result.exit_code == 2 and "no complete checkpoint to resume from" in result.output, result.output
    assert "train it again without --resume" in result.output


SLOW_STEPS = """\
import time

import torch

_step = torch.optim.AdamW.step


def step(self, *args, **kwargs):  # slows training so the test can kill it in the middle
    time.sleep(0.25)
    return _step(self, *args, **kwargs)


torch.optim.AdamW.step = step
"""


def test_killed_cli_run_resumes_bit_identical(models, tmp_path):
    data = recipe_dict(models, epochs=4)
    data["vision"]["cache_features"] = False
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(data))
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}   # CPU, where resuming is bit-identical
    peftmm = [sys.executable, "-m", "peftmm", "train"]

    killed = tmp_path / "killed"
    slowed = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), env.get("PYTHONPATH")]))}
    process = subprocess.Popen([*peftmm, str(recipe), "--output", str(killed), "--no-progress"], env=slowed,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:   # a checkpoint, and a step logged after it: then kill mid-epoch
            assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()!r}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            pointer = killed / "checkpoints" / POINTER
            if pointer.exists():
                at = json.loads(pointer.read_text())["step"]
                steps = [json.loads(line).get("step") for line in (killed / "metrics.jsonl").read_text().splitlines()
                         if line.endswith("}") and '"loss"' in line]
                if steps and steps[-1] > at and steps[-1] % 6:
                    break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL and not (killed / "bundle").exists()

    resumed = subprocess.run([*peftmm, "--resume", str(killed), "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "peftmm: resuming from " in resumed.stderr
    uninterrupted = subprocess.run([*peftmm, str(recipe), "--output", str(tmp_path / "whole"), "--no-progress"],
                                   env=env, capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    summary = lambda out: json.loads(out[out.index("{"):])  # noqa: E731
    first, second = summary(uninterrupted.stdout), summary(resumed.stdout)
    assert second.pop("run_dir") == str(killed) and first.pop("run_dir") == str(tmp_path / "whole")
    first.pop("bundle"), second.pop("bundle")
    assert_same_run(tmp_path / "whole", killed, first, second)
