"""The training loop, on HF accelerate (device placement, mixed precision, gradient
accumulation, and the same code under ``accelerate launch`` on several processes).

Only the trainable parameters reach the optimizer. A run directory receives
``metrics.jsonl`` (one JSON object per logged step and per evaluation), ``curves.png``,
``recipe.yaml`` (the validated recipe), ``checkpoints/`` (see checkpoint.py: a run killed at
any point resumes from there, ``resume=True``) and ``bundle/`` (the best epoch's adapter).
A loss that is not finite stops the run before that step is applied.

Examples that cannot be used (an unreadable image, an empty text the task needs) are left out
of their batch and counted per split, or end the run, as ``data.on_bad_sample`` says (see
data/skips.py); the counts go into the epoch records and the final metrics.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import trackers
from .batching import Batcher, image_workers
from .bundle import initialise_from, resolve_bundle, save_bundle
from .checkpoint import Checkpointer, RunParts, resume_point
from .data import load_splits
from .data.conversations import skipped_line
from .data.files import check_labels_in_train
from .data.skips import SplitLog, cache_on_bad
from .distributed import (
    all_have_examples,
    batch_loss,
    make_accelerator,
    prepare_for_training,
)
from .errors import DataError
from .evaluation import build_caches, evaluate, fill_caches
from .features import FeatureCache
from .model import MultimodalModel
from .plots import plot_curves
from .precision import device_facts, inference_context
from .precision import record as precision_record
from .run_state import SkipTracker, restore_rng
from .sampling import train_loader
from .tasks import TASKS
from .trackers import check_installed


@dataclass
class TrainResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict
    main: bool = True       # the process that wrote them (one of several: see distributed.py)


SPLITS = ("train", "val", "test")


def _scheduler(spec, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(spec.schedule, spec.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=int(spec.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def _classifies_into_labels(recipe) -> bool:
    """VQA and classification: one output per label, trained only on the labels of train."""
    return TASKS.get(recipe.task.type).classifies_into_labels


def _count_truncated(model, splits, names, counts: dict, log) -> None:
    for name in names:
        counts[name], warning = model.task.truncated(model.towers["text"].processor, splits[name], model.max_length)
        if warning:
            log(f"peftmm: {name}: {warning}")


def _initialise(model, recipe, log) -> dict | None:
    """``init_from``: start from an earlier stage's bundle (see bundle.initialise_from)."""
    if not recipe.init_from:
        return None
    relative = Path(recipe.source).parent / recipe.init_from if recipe.source else None
    where = relative if relative is not None and relative.is_dir() else resolve_bundle(recipe.init_from)
    done = initialise_from(model, resolve_bundle(where))
    log(f"peftmm: init_from {done['bundle']}: {done['loaded']} tensors loaded into {', '.join(done['parts'])}, "
        f"{done['skipped']} skipped (no match in this model)")
    return done


def default_run_dir(recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout stays free for results (the CLI's JSON)


def _silent(*args, **kwargs) -> None:
    """The log of every process but the main one: a message is written once."""


def train(recipe, run_dir: str | Path | None = None, progress: bool = True, log=_log,
          resume: bool = False) -> TrainResult:
    """``resume``: continue ``run_dir`` from its latest complete checkpoint; ``recipe`` must be
    the one it was started with (checkpoint.resume_recipe reads it from the run directory).

    The steps below run in this order on purpose: each one that draws random numbers (building
    the model, the loader, the epochs) must draw them as the run that is resumed did."""
    check_installed(recipe.train.report_to, recipe.source)   # before anything of the run is made
    ctx = _set_up(recipe, run_dir, progress, log)
    try:
        return _run(ctx, recipe, resume)
    finally:
        trackers.finish(ctx.accelerator, recipe.train.report_to)


def _run(ctx: _Context, recipe, resume: bool) -> TrainResult:
    saved = resume_point(ctx.run_dir, recipe, ctx.log) if resume else None
    splits = _load_checked_splits(recipe)
    if skipped_line(splits):   # records a source left out (data.on_bad_sample: skip): said once, up front
        ctx.log(skipped_line(splits))
    model = MultimodalModel.build(recipe, splits.labels, device=ctx.device)
    initialised = saved.state["initialised"] if saved else _initialise(model, recipe, ctx.log)
    parameters = _report_parameters(model, recipe, ctx.log)
    skips = {name: SplitLog(name, recipe.data.on_bad_sample) for name in SPLITS}
    truncated: dict[str, int] = {}
    _count_truncated(model, splits, ("train", "val"), truncated, ctx.log)
    caches = _cache_features_and_prepare_task(ctx, model, splits)
    loop = _prepare_loop(ctx, model, splits, caches, skips["train"])
    saver = Checkpointer(RunParts(ctx.run_dir, recipe, ctx.accelerator, loop.core, loop.optimizer, loop.scheduler,
                                  loop.batches, loop.tracker, skips, splits, initialised, ctx.main))
    # resumed at an epoch's start, the random generators are restored now; mid-epoch, by the first batch
    run, records = saver.resume(saved) if saved else saver.start()
    epochs = _Epochs(ctx, loop, saver, run, records, Batcher(loop.core, caches, skips["val"]), splits.val, skips)
    epochs.train(saved)
    train_seconds = epochs.elapsed()
    test, skipped = _test_best_epoch(ctx, loop.core, run.best, splits, caches, skips, truncated)
    metrics = _final_metrics(loop.core, test, run, parameters, train_seconds, skipped, truncated, initialised)
    epochs.record({"final": metrics})
    return _publish(ctx, loop.core, metrics, epochs.records, test)


@dataclass
class _Context:
    """What every step of one train() call reads: the recipe, and where and how it runs."""
    recipe: Any
    spec: Any                    # recipe.train
    accelerator: Any
    device: Any
    main: bool                   # the process that writes (one of several: see distributed.py)
    run_dir: Path
    log: Callable[[str], None]   # _silent on every process but the main one
    progress: bool               # progress bars (on the main process only)
    precision: dict              # precision.record: what the run trains and validates under


def _set_up(recipe, run_dir, progress: bool, log) -> _Context:
    """accelerate, the seed, and the run directory (every process takes the main one's name:
    clocks may tick between processes)."""
    from accelerate.utils import set_seed

    run_dir = Path(run_dir) if run_dir else default_run_dir(recipe)
    # the trackers' folder: only the main process's counts (no other one starts a tracker)
    accelerator = make_accelerator(recipe.train, run_dir / "trackers")
    set_seed(recipe.train.seed)
    main = accelerator.is_main_process
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    trackers.start(accelerator, recipe.train.report_to, recipe.to_dict(), run_dir)
    precision = precision_record(accelerator.mixed_precision, device_facts(accelerator.device))
    return _Context(recipe, recipe.train, accelerator, accelerator.device, main, run_dir,
                    log if main else _silent, progress and main, precision)


def _load_checked_splits(recipe):
    """The data set's splits, refused now (not after the whole training) when one is empty or,
    for label tasks, when val or test has a label train lacks."""
    splits = load_splits(recipe.data)
    for name in SPLITS:
        if not splits[name]:
            raise DataError(f"the {name} split is empty (data.source {recipe.data.source}); every run trains, "
                            "picks its best epoch on val and reports test: give each split examples")
    if _classifies_into_labels(recipe):
        check_labels_in_train(splits)
    return splits


def _report_parameters(model, recipe, log) -> tuple[int, int]:
    trainable, total = model.parameter_counts()
    log(f"peftmm: {recipe.name}: trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.3f}%)")
    return trainable, total


def _cache_features_and_prepare_task(ctx: _Context, model, splits) -> dict[str, FeatureCache]:
    """The frozen towers' features of train and val cached, then the task prepared: after
    caching, since captioning's memory reads the cached vision features; again on resume, from
    the same frozen features, so it comes out the same."""
    several = ctx.accelerator.num_processes > 1
    caches = build_caches(model, ctx.recipe, ctx.log, write=ctx.main,
                          shared=ctx.run_dir / "feature-cache" if several else None)
    on_bad = cache_on_bad(ctx.recipe.data.on_bad_sample)
    fill_caches(caches, model, splits.train + splits.val, ctx.device, ctx.progress, on_bad,
                ctx.precision, ctx.accelerator)
    with inference_context(ctx.precision, ctx.device):   # the memory encodes as inference will read it
        model.task.prepare(model, splits.train, Batcher(model, caches), ctx.device, ctx.progress)
    return caches


@dataclass
class _Loop:
    """A run's training objects, as accelerate prepared them (``model`` wrapped, ``core`` not)."""
    model: Any
    core: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    batches: Any           # sampling.ResumableBatches: the loader's batch sampler
    tracker: SkipTracker   # the loader's collate function
    total_steps: int


def _prepare_loop(ctx: _Context, model, splits, caches, train_skips) -> _Loop:
    """The train loader, AdamW over the trainable parameters and the learning-rate schedule."""
    spec, accelerator = ctx.spec, ctx.accelerator
    tracker = SkipTracker(Batcher(model, caches, train_skips, image_workers(spec.image_workers, caches)))
    loader, batches = train_loader(splits.train, spec, tracker, accelerator.num_processes,
                                   accelerator.process_index)
    optimizer = torch.optim.AdamW(model.parameter_groups(spec.lr), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / spec.grad_accum)
    total_steps = min(spec.max_steps or 10**12, spec.epochs * steps_per_epoch)
    scheduler = _scheduler(spec, optimizer, total_steps)
    model, optimizer, loader, scheduler = prepare_for_training(accelerator, model, optimizer, loader, scheduler)
    return _Loop(model, accelerator.unwrap_model(model), optimizer, scheduler, loader, batches, tracker, total_steps)


class _Epochs:
    """The epochs of a run, from where ``run`` (checkpoint.Progress) stands: each trains, is
    validated and checkpointed; ``record`` appends to ``metrics.jsonl``."""

    def __init__(self, ctx: _Context, loop: _Loop, saver: Checkpointer, run, records: list[dict], val_batcher,
                 val: list[dict], skips: dict):
        self.ctx, self.loop, self.saver, self.run, self.records = ctx, loop, saver, run, records
        self.val_batcher, self.val, self.skips = val_batcher, val, skips
        self.metrics_path, self.started = ctx.run_dir / "metrics.jsonl", time.perf_counter()

    def elapsed(self) -> float:
        """Training time, that of the run's earlier processes included."""
        return self.run.seconds + time.perf_counter() - self.started

    def record(self, entry: dict) -> None:
        self.records.append(entry)
        self.run.records = len(self.records)
        if self.ctx.main:  # appended entry by entry: a run that stops early keeps what it logged, no file left open
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        trackers.log(self.ctx.accelerator, self.ctx.spec.report_to, entry)   # the main process's trackers

    def train(self, saved) -> None:
        """Until the last epoch, early stopping or ``train.max_steps``; ``saved``: the checkpoint
        resumed from (its random generators are restored at the first batch when it is mid-epoch)."""
        run = self.run
        for epoch in range(run.epoch, 0 if run.finished else self.ctx.spec.epochs + 1):
            saved = self._train_epoch(epoch, saved)
            self._validate_epoch(epoch)
            if run.finished:
                break

    def _train_epoch(self, epoch: int, saved):
        """One epoch's batches (the rest of it, when resumed mid-epoch); returns ``saved`` while
        it has not been needed yet."""
        ctx, loop, run, saver, accelerator = self.ctx, self.loop, self.run, self.saver, self.ctx.accelerator
        loop.model.train()
        if not run.batches:
            self.skips["train"].new_epoch()
        saver.epoch_start(run.batches)
        bar = tqdm(total=len(loop.loader), initial=run.batches, desc=f"epoch {epoch}/{ctx.spec.epochs}",
                   unit="batch", disable=not ctx.progress, dynamic_ncols=True)
        tick, seen = time.perf_counter(), 0
        for batch in loop.loader:
            if saved and run.batches:  # resumed mid-epoch: the generators as they were after this batch
                restore_rng(saved)
            saved = None
            run.batches += 1
            if not all_have_examples(batch, accelerator):  # every example was skipped: no step
                bar.update(1)
                continue
            with accelerator.accumulate(loop.model):
                loss, logged = batch_loss(loop.core.task, loop.model(batch), batch["labels"], accelerator)
                saver.check_loss(loss, run.step + 1, epoch)  # not finite: stop before this step
                accelerator.backward(loss)
                loop.optimizer.step()
                loop.scheduler.step()
                loop.optimizer.zero_grad(set_to_none=True)
            seen += len(batch["labels"])
            if accelerator.sync_gradients:
                run.step += 1
                rate = seen / max(time.perf_counter() - tick, 1e-9)
                self.record({"step": run.step, "epoch": epoch, "loss": logged,
                             "lr": loop.scheduler.get_last_lr()[0],
                             "samples_per_s": round(rate * accelerator.num_processes, 2)})
                bar.set_postfix(loss=f"{logged:.4f}", samples_s=f"{rate * accelerator.num_processes:.0f}")
                if saver.due(run, len(loop.loader), loop.total_steps):
                    saver.save(run, self.elapsed())
            bar.update(1)
            if run.step >= loop.total_steps:
                break
        bar.close()
        return saved

    def _validate_epoch(self, epoch: int) -> None:
        """The epoch's skip counts and validation, the best weights so far, early stopping, and
        the epoch's checkpoint."""
        ctx, run, core, accelerator = self.ctx, self.run, self.loop.core, self.ctx.accelerator
        trained = self.skips["train"].merged(accelerator)
        if trained.seen and trained.skipped == trained.seen:
            raise trained.all_skipped_error()
        if trained.line(f"epoch {epoch}"):
            ctx.log(trained.line(f"epoch {epoch}"))
        val = evaluate(core, self.val, self.val_batcher, ctx.spec.eval_batch_size, ctx.device, desc="val",
                       accelerator=accelerator)
        validated = self.skips["val"].merged(accelerator)
        if validated.line(f"epoch {epoch}"):
            ctx.log(validated.line(f"epoch {epoch}"))
        score = val[core.task.primary_metric]
        self.record({"epoch": epoch, "step": run.step, **{f"val_{k}": v for k, v in val.items()},
                     "skipped_train": trained.skipped, "skipped_val": validated.skipped})
        ctx.log(f"epoch {epoch}: val {core.task.primary_metric} {score:.4f} over {val['examples']:,} examples, "
                f"val loss {val['loss']:.4f}")
        if score > run.best["score"]:
            run.best = {"score": score, "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in core.trainable_state_dict().items()}}
            run.stale = 0
        else:
            run.stale += 1
        run.finished = run.stale >= ctx.spec.patience or run.step >= self.loop.total_steps
        run.epoch, run.batches = epoch + 1, 0
        self.saver.save(run, self.elapsed())


def _test_best_epoch(ctx: _Context, core, best: dict, splits, caches, skips: dict,
                     truncated: dict) -> tuple[dict, dict]:
    """The best epoch's weights back, the task finished with them, and the test split evaluated.
    Returns the test metrics and every split's skip log as all processes saw it together."""
    core.load_trainable_state_dict(best["state"])
    # with the best weights (retrieval's pair memory embeds the train split with them); again on
    # resume, from the same weights. A log of its own: training's skip counts are final.
    with inference_context(ctx.precision, ctx.device):
        core.task.finish(core, splits.train, Batcher(core, caches, SplitLog("train")), ctx.device, ctx.progress)
    _count_truncated(core, splits, ("test",), truncated, ctx.log)
    fill_caches(caches, core, splits.test, ctx.device, ctx.progress, cache_on_bad(ctx.recipe.data.on_bad_sample),
                ctx.precision, ctx.accelerator)
    test = evaluate(core, splits.test, Batcher(core, caches, skips["test"]), ctx.spec.eval_batch_size,
                    ctx.device, progress=ctx.progress, desc="test", accelerator=ctx.accelerator)
    # what every process left out, together (one gather per split: see SplitLog.merged)
    merged = {name: skips[name].merged(ctx.accelerator) for name in SPLITS}
    if merged["test"].line("test"):
        ctx.log(merged["test"].line("test"))
    return test, merged


def _final_metrics(core, test: dict, run, parameters: tuple[int, int], train_seconds: float, skipped: dict,
                   truncated: dict, initialised: dict | None) -> dict:
    """What the bundle's card and the CLI report: test metrics, the best epoch, sizes, counts."""
    trainable, total = parameters
    best = run.best
    return {f"test_{k}": v for k, v in test.items()} | {
        f"val_{core.task.primary_metric}": best["score"], "best_epoch": best["epoch"],
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "train_seconds": round(train_seconds, 1), "steps": run.step,
        # distinct examples left out over the whole run, and texts cut at text.max_length, per split
        **{f"skipped_{name}": len(log_.ever) for name, log_ in skipped.items()},
        **{f"truncated_{name}": n for name, n in truncated.items()},
    } | ({"init_from": initialised["bundle"]} if initialised else {})


def _publish(ctx: _Context, core, metrics: dict, records: list[dict], test: dict) -> TrainResult:
    """The bundle and the training curves (main process), once every process is done."""
    bundle_dir = ctx.run_dir / "bundle"
    if ctx.main:
        save_bundle(core, ctx.recipe, bundle_dir, metrics, precision=ctx.precision)
        plot_curves(records, ctx.run_dir / "curves.png", title=ctx.recipe.name)
    ctx.log(f"test {core.task.primary_metric} {test[core.task.primary_metric]:.4f} over {test['examples']:,} "
            f"examples; bundle: {bundle_dir}")
    ctx.accelerator.wait_for_everyone()
    return TrainResult(ctx.run_dir, bundle_dir, metrics, ctx.main)
