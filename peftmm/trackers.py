"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, trackio,
through accelerate's trackers, on the main process only.

What ``metrics.jsonl`` holds goes to each tracker as scalars: per optimizer step (``loss``,
``lr``, ``samples_per_s``), per epoch (``val_*``, skip counts), and the final test metrics
(``final/...``), each at its step. The recipe, flattened (``train.lr``, ``vision.backbone``,
...), is the run's hyperparameters; the run directory's name is the run's name. TensorBoard
writes under ``<run_dir>/trackers/<run name>``; W&B keeps its files under the run directory too.

Each tracker is an optional extra (``pip install 'peftmm[tensorboard]'``, ``[wandb]``,
``[mlflow]``, ``[trackio]``); :func:`check_installed` refuses a recipe naming one that is not
installed before anything of the run starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

from .errors import RecipeError
from .registry import Registry

NAMES = ("tensorboard", "wandb", "mlflow", "trackio")
PROJECT = "peftmm"
# name -> whether it is installed (accelerate's own checks: what its trackers import)
INSTALLED = Registry("tracker")
for _name, _check in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available),
                      ("mlflow", is_mlflow_available), ("trackio", is_trackio_available)):
    INSTALLED.register(_name)(_check)


def check_installed(names: list[str], where: str | None = None) -> None:
    """One RecipeError for the first tracker of ``names`` that is not installed."""
    for name in names:
        if not INSTALLED.get(name, "train.report_to")():
            package = "tensorboard" if name == "tensorboard" else name
            raise RecipeError(f"train.report_to names {name!r}, which is not installed here: pip install "
                              f"'peftmm[{name}]' (or pip install {package}), or leave it out of train.report_to",
                              where)


def start(accelerator, names: list[str], recipe: dict, run_dir: Path) -> None:
    """Start the trackers (main process: accelerate starts none elsewhere) with the recipe as
    hyperparameters and the run directory's name as the run's name."""
    if not names:
        return
    run = run_dir.name
    accelerator.init_trackers(run if "tensorboard" in names else PROJECT, config=hyperparameters(recipe),
                              init_kwargs={"wandb": {"name": run, "dir": str(run_dir)},
                                           "mlflow": {"run_name": run}, "trackio": {"name": run}})


def log(accelerator, names: list[str], entry: dict) -> None:
    """One ``metrics.jsonl`` entry's scalars, at its step (the final entry's under ``final/``)."""
    if not names:
        return
    if "final" in entry:
        values = {f"final/{k}": v for k, v in entry["final"].items() if _scalar(v)}
        step = entry["final"].get("steps")
    else:
        values = {k: v for k, v in entry.items() if _scalar(v) and k != "step"}
        step = entry.get("step")
    if values:
        accelerator.log(values, step=step)


def finish(accelerator, names: list[str]) -> None:
    if names:
        accelerator.end_training()


def hyperparameters(recipe: dict, prefix: str = "") -> dict:
    """The recipe flattened to the scalars every tracker takes (lists as JSON text)."""
    flat = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= hyperparameters(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:   # None, lists: TensorBoard's hparams take scalars and text only
            flat[name] = json.dumps(value, default=str)
    return flat


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
