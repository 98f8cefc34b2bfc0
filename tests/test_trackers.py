"""train.report_to: the metrics.jsonl scalars reach the trackers (TensorBoard read back with its
own event reader; W&B offline when installed), and a tracker that is not installed is refused
before the run starts."""

from __future__ import annotations

import json

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


def test_wandb_offline_holds_the_same_losses(models, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(recipe_from_dict(recipe(models, ["wandb"])), run_dir, progress=False, log=lambda _: None)
    steps = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    (history,) = list(run_dir.rglob("offline-run-*/files/wandb-summary.json")) or [None]
    assert history is not None
    summary = json.loads(history.read_text())
    assert summary["loss"] == pytest.approx(steps[max(steps)], rel=1e-6)


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
