"""train.report_to: the metrics.jsonl scalars reach the trackers (TensorBoard read back with its
own event reader; W&B offline when installed), and a tracker that is not installed is refused
before the run starts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tiny

from peftmm import RecipeError, recipe_from_dict
from peftmm.trackers import INSTALLED, hyperparameters
from peftmm.trainer import train

pytestmark = pytest.mark.usefixtures("keep_torch_rng")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(tiny.build(kind, root / kind)) for kind in ("vit", "bert")}


def recipe(models, report_to: list[str]) -> dict:
    return tiny.recipe(models["vit"], models["bert"], text_methods=[{"type": "lora", "r": 2}],
                       train={"epochs": 2, "batch_size": 16, "report_to": report_to},
                       data={"max_train_samples": 48, "max_eval_samples": 16})


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_every_step_loss(models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(recipe_from_dict(recipe(models, ["tensorboard"])), run_dir, progress=False, log=lambda _: None)
    logged = records(run_dir)
    steps = {r["step"]: r["loss"] for r in logged if "loss" in r}
    (folder,) = [p.parent for p in (run_dir / "trackers").rglob("events.out.tfevents.*")
                 if p.parent.parent == run_dir / "trackers"]
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("loss")}
    assert len(steps) >= 4 and losses.keys() == steps.keys()
    assert all(losses[s] == pytest.approx(steps[s], rel=1e-6) for s in steps)
    val = [r for r in logged if "val_accuracy" in r]
    assert [e.value for e in events.Scalars("val_accuracy")] == pytest.approx([r["val_accuracy"] for r in val])
    final = logged[-1]["final"]
    assert events.Scalars("final/test_accuracy")[0].value == pytest.approx(final["test_accuracy"])
    assert folder.name == run_dir.name   # the run's name


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (``run-*.wandb``): a ``:W&B`` header, then
    LevelDB-log chunks (crc32, length, type) in 32 KiB blocks; wandb 0.31 ships no reader of it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:            # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):      # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_same_values(models, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(recipe_from_dict(recipe(models, ["wandb"])), run_dir, progress=False, log=lambda _: None)
    logged = records(run_dir)
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    for _ in range(120):   # wandb's service process may still be writing the file's last records
        if "exit" in [r.WhichOneof("record_type") for r in wandb_records(path)]:
            break
        time.sleep(0.5)
    rows, names, config = {}, [], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":   # W&B merges what is logged at one step into one row
            rows.setdefault(record.history.step.num, {}).update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            names.append(record.run.display_name)
        elif kind == "config":
            config |= {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update}
    steps = [r for r in logged if "loss" in r]
    assert len(steps) >= 4 and all(rows.get(r["step"], {}).get("loss") == r["loss"] for r in steps)
    assert all(rows[r["step"]]["val_accuracy"] == r["val_accuracy"] for r in logged if "val_accuracy" in r)
    assert rows[logged[-1]["final"]["steps"]]["final/test_accuracy"] == logged[-1]["final"]["test_accuracy"]
    assert names[0] == run_dir.name and config["train.lr"] == 5e-3


def test_a_tracker_that_is_not_installed_is_refused_before_the_run(models, tmp_path, monkeypatch):
    monkeypatch.setitem(INSTALLED._parts, "mlflow", lambda: False)
    with pytest.raises(RecipeError, match=r"train.report_to names 'mlflow', which is not installed here: "
                                          r"pip install 'peftmm\[mlflow\]'"):
        train(recipe_from_dict(recipe(models, ["tensorboard", "mlflow"])), tmp_path / "run", progress=False,
              log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_names_are_recipe_errors(models):
    with pytest.raises(RecipeError, match="train.report_to.0 = 'tensorbord' is not allowed"):
        recipe_from_dict(recipe(models, ["tensorbord"]))


def test_hyperparameters_are_flat_scalars():
    flat = hyperparameters({"train": {"lr": 0.001, "report_to": ["tensorboard"], "max_steps": None},
                            "vision": {"backbone": "vit"}})
    assert flat == {"train.lr": 0.001, "train.report_to": '["tensorboard"]', "train.max_steps": "null",
                    "vision.backbone": "vit"}
