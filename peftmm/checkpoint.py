"""Training checkpoints: a run killed at any moment continues from its last one, exactly.

Every ``train.checkpoint_every`` optimizer steps (0: only at epoch ends) and at the end of
every epoch the trainer writes ``RUN_DIR/checkpoints/step-XXXXXXXX/``:

- ``tensors.safetensors``: the trainable tensors (``model.``; what
  MultimodalModel.trainable_state_dict names), the best epoch's so far (``best.``), the
  optimizer's state (``optimizer.<param index>.<key>``), and the random generators' states
  (``rng.``: torch, CUDA, numpy, and the sampler's generator as it was when the epoch began);
- ``state.json``: everything else as JSON: the position (epoch, batches of it done, optimizer
  step, accelerate's accumulation counter), early stopping (best score and epoch, epochs without
  gain), the optimizer's param groups and non-tensor state, the LR scheduler's state, Python's
  random state, skipped examples so far (indices into their split), how many ``metrics.jsonl``
  records belong to the run at that point, the training time so far, and the sha256 of the
  tensors file and of the recipe.

No pickle anywhere. A folder is written under a temporary name (files fsynced) and renamed;
then ``checkpoints/latest.json`` (the pointer: folder name and sha256 of its ``state.json``) is
replaced, last; then folders beyond the newest ``train.keep_checkpoints`` are removed.
``metrics.jsonl`` is fsynced before, so the records a checkpoint counts are on disk.

Resuming (``peftmm train --resume RUN_DIR``) rebuilds everything from the recipe (the feature
cache is deterministic), loads the checkpoint the pointer names (or, if that one is damaged,
the newest one that checks out, with a warning), cuts ``metrics.jsonl`` back to its records,
and trains on from the same batch with the same random numbers: on CPU in fp32 it ends with
the same weights and metrics as a run never interrupted (only ``train_seconds`` differs).
Under several processes only the main one's random state is kept, so there it is not exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .errors import PeftmmError, RecipeError
from .io import atomic_directory, atomic_write_text, fsync_dir
from .run_state import capture_rng, flatten_optimizer, log_state, restore_log, restore_rng, unflatten_optimizer

FORMAT, VERSION = "peftmm-checkpoint", 1
FOLDER, POINTER = "checkpoints", "latest.json"
TENSORS, STATE = "tensors.safetensors", "state.json"
NAME = re.compile(r"step-(\d{8,})")


@dataclass
class Progress:
    """Where a run is: what a checkpoint restores besides tensors and generators."""
    epoch: int = 1               # the epoch under way, or the next to begin
    batches: int = 0             # batches of that epoch already trained on
    step: int = 0                # optimizer steps taken
    stale: int = 0               # epochs without a better validation score
    best: dict = field(default_factory=lambda: {"score": -math.inf, "state": None, "epoch": 0})
    finished: bool = False       # early stopping or max_steps ended training: only the test is left
    seconds: float = 0.0         # training time before this process
    records: int = 0             # lines of metrics.jsonl written so far


@dataclass
class Saved:
    """A checkpoint read back and checked."""
    path: Path
    state: dict
    tensors: dict[str, torch.Tensor]

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def recipe_sha256(recipe) -> str:
    return _sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class RunParts:
    """What a :class:`Checkpointer` writes into a run's checkpoints and puts back, by name."""
    run_dir: Path
    recipe: Any                     # the validated recipe (its train section: how often, how many)
    accelerator: Any                # accelerate's: processes, and the accumulation counter
    core: Any                       # the model, unwrapped: its trainable tensors
    optimizer: torch.optim.Optimizer
    scheduler: Any                  # the learning-rate scheduler
    batches: Any                    # sampling.ResumableBatches: its generator orders each epoch
    tracker: Any                    # run_state.SkipTracker: the train skip log after each batch
    skips: dict                     # split name -> data.skips.SplitLog
    splits: Any                     # data.Splits (skipped examples are saved as indices into them)
    initialised: dict | None = None   # what init_from loaded (trainer._initialise), kept for a resume
    main: bool = True               # only the main process writes


class Checkpointer:
    """Writes a run's checkpoints, and puts a loaded one back into the objects it came from."""

    def __init__(self, parts: RunParts):
        self.parts = parts
        self.folder = Path(parts.run_dir) / FOLDER
        self.metrics = Path(parts.run_dir) / "metrics.jsonl"
        self.spec = parts.recipe.train
        self.order = None      # the sampler generator's state when the current epoch began
        self.latest: str | None = None

    def start(self) -> tuple[Progress, list[dict]]:
        """A new run: its recipe.yaml and an empty metrics.jsonl; an earlier run's checkpoints in
        the same folder are removed (they are not this run's)."""
        if self.parts.main:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.folder, ignore_errors=True)
            recipe = yaml.safe_dump(self.parts.recipe.to_dict(), sort_keys=False)
            atomic_write_text(self.folder.parent / "recipe.yaml", recipe)
            self.metrics.write_text("")
        return Progress(), []

    def resume(self, saved: Saved) -> tuple[Progress, list[dict]]:
        """Restore ``saved`` and the records it counts; the global random generators too when it
        is at an epoch's start (mid-epoch the trainer restores them after the loader has begun:
        it draws from them when an epoch starts)."""
        run = self.restore(saved)
        if not run.batches:
            restore_rng(saved)
        return run, read_records(self.folder.parent, run.records)

    def check_loss(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        """Stop on a loss that is not finite (under several processes: on any of them)."""
        ok = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.parts.accelerator.num_processes > 1:
            ok = self.parts.accelerator.gather(ok)
        if ok.min().item() == 0:
            raise self.diverged(loss.item(), step, epoch)

    def epoch_start(self, done: int) -> None:
        """Called before each epoch's batches: ``done`` of them were trained on before a resume."""
        self.order = self.parts.batches.generator.get_state()
        self.parts.batches.skip = done   # global batches: every process draws them all (distributed.py)
        self.parts.tracker.start(done)

    def due(self, run: Progress, batches_per_epoch: int, total_steps: int) -> bool:
        """A mid-epoch checkpoint after this step? Not on an epoch's last one: the epoch's own follows."""
        every = self.spec.checkpoint_every
        return bool(every) and run.step % every == 0 and run.batches < batches_per_epoch and run.step < total_steps

    def save(self, run: Progress, elapsed: float) -> None:
        """Checkpoint ``run``: mid-epoch (``run.batches`` > 0) or at an epoch's end (the position
        is then the next epoch's start)."""
        parts = self.parts
        if not parts.main:
            return
        middle = run.batches > 0
        order = self.order if middle else parts.batches.generator.get_state()
        train, val = parts.skips["train"], parts.skips["val"]
        train_log = parts.tracker.state_after(run.batches) if middle else \
            (train.seen, dict(train.reasons), train.first, train.ever)
        rng, tensors = capture_rng()
        optimizer, optimizer_tensors = flatten_optimizer(parts.optimizer.state_dict())
        tensors |= {"rng.order": order, **optimizer_tensors,
                    **{f"model.{k}": v for k, v in parts.core.trainable_state_dict().items()}}
        if run.best["state"] is not None:
            tensors |= {f"best.{k}": v for k, v in run.best["state"].items()}
        blob = save_tensors({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                            metadata={"format": FORMAT})
        state = {
            "format": FORMAT, "version": VERSION, "tensors_sha256": _sha256(blob),
            "recipe_sha256": recipe_sha256(parts.recipe),
            "epoch": run.epoch, "batches": run.batches, "step": run.step, "stale": run.stale,
            "finished": run.finished, "seconds": round(elapsed, 3), "records": run.records,
            "best_score": None if run.best["score"] == -math.inf else run.best["score"],
            "best_epoch": run.best["epoch"], "accumulation_step": parts.accelerator.step,
            "optimizer": optimizer, "scheduler": parts.scheduler.state_dict(), "rng": rng,
            "skips": {"train": log_state(train_log, parts.splits.train),
                      "val": log_state((val.seen, dict(val.reasons), val.first, val.ever), parts.splits.val)},
            "initialised": parts.initialised,
        }
        state_bytes = (json.dumps(state, indent=1) + "\n").encode()
        _fsync_file(self.metrics)  # the records this checkpoint counts are on disk before it is
        name = f"step-{run.step:08d}"
        with atomic_directory(self.folder / name, overwrite=True) as tmp:
            _write_synced(tmp / TENSORS, blob)
            _write_synced(tmp / STATE, state_bytes)
        fsync_dir(self.folder)
        atomic_write_text(self.folder / POINTER, json.dumps({"checkpoint": name, "step": run.step,
                                                             "state_sha256": _sha256(state_bytes)}) + "\n")
        fsync_dir(self.folder)
        self.latest = name
        prune(self.folder, self.spec.keep_checkpoints)

    def restore(self, saved: Saved) -> Progress:
        """Load ``saved`` into the model, optimizer, scheduler, sampler and skip logs; the global
        random generators are the caller's to restore (restore_rng), at the right moment."""
        state, parts = saved.state, self.parts
        parts.core.load_trainable_state_dict(saved.part("model."), str(saved.path))
        parts.optimizer.load_state_dict(unflatten_optimizer(state["optimizer"], saved.part("optimizer."),
                                                            parts.optimizer.param_groups))
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.accelerator.step = state["accumulation_step"]
        parts.batches.generator.set_state(saved.tensors["rng.order"])
        restore_log(parts.skips["train"], state["skips"]["train"], parts.splits.train)
        restore_log(parts.skips["val"], state["skips"]["val"], parts.splits.val)
        best = saved.part("best.")
        score = -math.inf if state["best_score"] is None else state["best_score"]
        self.latest = saved.path.name
        return Progress(epoch=state["epoch"], batches=state["batches"], step=state["step"], stale=state["stale"],
                        best={"score": score, "state": best or None, "epoch": state["best_epoch"]},
                        finished=state["finished"], seconds=state["seconds"], records=state["records"])

    def diverged(self, value: float, step: int, epoch: int) -> PeftmmError:
        kept = (f"the last good checkpoint, {self.folder / self.latest}, is kept (`peftmm train --resume "
                f"{self.folder.parent}` continues from it)" if self.latest else "no checkpoint was written yet")
        return PeftmmError(f"training stopped: the loss is {value} at step {step} (epoch {epoch}); that step "
                           f"was not applied and no bundle was written; {kept}. A lower train.lr, or "
                           "mixed_precision: no, usually avoids this", str(self.folder.parent))


def prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and the one the pointer names; remove leftovers of
    writes that were killed (temporary folders)."""
    pointed = _pointer(folder).get("checkpoint")
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.fullmatch(p.name)))
    for _, path in steps[:-keep]:
        if path.name != pointed:
            shutil.rmtree(path, ignore_errors=True)
    for path in folder.iterdir():
        if path.name.startswith(".step-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _pointer(folder: Path) -> dict:
    try:
        pointer = json.loads((folder / POINTER).read_text())
    except (OSError, ValueError):
        return {}
    return pointer if isinstance(pointer, dict) else {}


def read_checkpoint(path: Path, state_sha256: str | None = None) -> Saved:
    """Read a checkpoint folder, or raise ValueError saying what is wrong with it."""
    try:
        state_bytes = (path / STATE).read_bytes()
        blob = (path / TENSORS).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {Path(e.filename).name if e.filename else path.name}: {e.strerror}") from None
    if state_sha256 is not None and _sha256(state_bytes) != state_sha256:
        raise ValueError(f"{STATE} does not match the checksum in {POINTER}")
    try:
        state = json.loads(state_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{STATE} is not JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ValueError(f"{STATE} is not a version-{VERSION} peftmm checkpoint")
    if _sha256(blob) != state.get("tensors_sha256"):
        raise ValueError(f"{TENSORS} ({len(blob):,} bytes) does not match its sha256 in {STATE}: "
                         "truncated or damaged")
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{TENSORS} cannot be read ({e})") from None
    return Saved(path, state, tensors)


def resume_point(run_dir: Path, recipe, log) -> Saved:
    """For ``train(resume=True)``: the checkpoint to continue from, once the run directory is
    known to be an unfinished run of ``recipe``."""
    if (run_dir / "bundle").exists():
        raise PeftmmError("this run has finished (its bundle is written): nothing to resume", str(run_dir))
    difference = _first_difference(resume_recipe(run_dir).to_dict(), recipe.to_dict())
    if difference:
        raise RecipeError(f"resuming needs the recipe the run was started with; it differs at {difference}",
                          str(run_dir))
    saved = load_latest(run_dir, recipe, log)
    log(f"peftmm: resuming from {saved.path} (epoch {saved.state['epoch']}, step {saved.state['step']}, "
        f"{saved.state['batches']} batches into the epoch)")
    return saved


def load_latest(run_dir: str | Path, recipe, log) -> Saved:
    """The checkpoint to resume ``run_dir`` from: the one the pointer names, or, when that one is
    damaged or missing, the newest that checks out (with a warning through ``log``)."""
    folder = Path(run_dir) / FOLDER
    where = str(run_dir)
    names = sorted((p.name for p in folder.iterdir() if NAME.fullmatch(p.name)), reverse=True) \
        if folder.is_dir() else []
    pointer = _pointer(folder)
    pointed = pointer.get("checkpoint") if NAME.fullmatch(str(pointer.get("checkpoint"))) else None
    candidates = ([pointed] if pointed else []) + [n for n in names if n != pointed]
    problems = []
    for name in candidates:
        try:
            saved = read_checkpoint(folder / name, pointer.get("state_sha256") if name == pointed else None)
            if saved.state.get("recipe_sha256") != recipe_sha256(recipe):
                raise ValueError("it was written by another recipe than the run's recipe.yaml")
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if problems or name != pointed:
            log(f"peftmm: warning: {'; '.join(problems) or f'{POINTER} is missing or unreadable'}; "
                f"resuming from {name} instead")
        return saved
    why = (f"none of its checkpoints can be used ({'; '.join(problems)})" if problems else
           "checkpoints are written at every epoch end and every train.checkpoint_every steps, so this run "
           "stopped before its first one")
    raise PeftmmError(f"no complete checkpoint to resume from in {folder}: {why}; train it again without --resume",
                      where)


def read_records(run_dir: Path, count: int) -> list[dict]:
    """The first ``count`` records of ``metrics.jsonl`` (those a checkpoint counts), the file cut back
    to them: steps logged after the checkpoint are trained again."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()[:count]
        records = [json.loads(line) for line in lines]
    except (OSError, ValueError) as e:
        raise PeftmmError(f"cannot read the records the checkpoint counts ({e})", str(path)) from None
    if len(records) < count:
        raise PeftmmError(f"has {len(records)} records, the checkpoint counts {count}", str(path))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return records


def resume_recipe(run_dir: str | Path, recipe_path: str | None = None, overrides: list[str] = ()):
    """The recipe a run directory was started with (its ``recipe.yaml``). A recipe file or
    ``--set`` overrides given as well must not change it."""
    from .recipe import from_dict, load

    saved_path = Path(run_dir) / "recipe.yaml"
    if not saved_path.is_file():
        raise PeftmmError("not a run directory (it has no recipe.yaml)", str(run_dir))
    saved = load(saved_path)
    if recipe_path is not None or overrides:
        given = load(recipe_path, list(overrides)) if recipe_path is not None else \
            from_dict(saved.to_dict(), str(saved_path), list(overrides))
        difference = _first_difference(saved.to_dict(), given.to_dict())
        if difference:
            raise RecipeError(f"--resume continues a run with the recipe it was started with "
                              f"({saved_path}); the recipe given differs at {difference}. Drop the recipe and "
                              "--set to resume, or start a new run with another --output", recipe_path or str(run_dir))
    return saved


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{path}.{i}"))), None)
    return None if a == b else f"{path} (run: {a!r}, given: {b!r})"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    if path.exists():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
