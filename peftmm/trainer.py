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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbones import TOWERS
from .batching import Batcher
from .bundle import initialise_from, resolve_bundle, save_bundle
from .checkpoint import Checkpointer, resume_point
from .run_state import SkipTracker, restore_rng
from .data import load_splits
from .data.files import check_labels_in_train
from .data.skips import SplitLog, cache_on_bad, needed_text_error
from .distributed import batch_loss, check_engine, gather_rows, ignore_frozen, process_slice
from .errors import DataError
from .feature_store import cache_root
from .features import FeatureCache
from .model import MultimodalModel
from .plots import plot_curves
from .sampling import train_loader
from .tasks import TASKS


@dataclass
class TrainResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict
    main: bool = True       # the process that wrote them (one of several: see distributed.py)


def _accelerator(spec):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    mixed = spec.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # split_batches: processes share each batch (distributed.py), so the scheduler steps once per step
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=spec.grad_accum,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def _prepare(accelerator, model, optimizer, loader, scheduler):
    """DDP (or what accelerate's config says) around the model; the loader is only wrapped for
    device placement and accumulation bookkeeping: it already yields this process's slices."""
    from accelerate.data_loader import prepare_data_loader

    check_engine(accelerator)
    if accelerator.num_processes > 1:
        ignore_frozen(model)
    # Backbones were loaded on the right device already (bitsandbytes weights must not be moved).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler,
                                                      device_placement=[False, True, True])
    loader = prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                 put_on_device=True, rng_types=None)
    return model, optimizer, loader, scheduler


def _scheduler(spec, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(spec.schedule, spec.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=int(spec.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def build_caches(model, recipe, log=None, write: bool = True) -> dict[str, FeatureCache]:
    """A cache for every tower that has nothing to train (unless the recipe opts out), kept on
    disk too under ``train.feature_cache_dir`` (feature_store.py). ``write``: whether this process
    adds entries there (the main one; the others only read it); ``log``: where a damaged
    cache is reported."""
    names = [name for name in TOWERS if not model.has_trainable(name) and getattr(recipe, name).cache_features
             and name in model.task.cached_towers]
    folder = cache_root(recipe.train.feature_cache_dir, recipe.source, create=bool(names) and write)
    return {name: FeatureCache(model.towers[name], model.max_length, folder=folder, write=write, log=log)
            for name in names}


def fill_caches(caches: dict[str, FeatureCache], model, examples, device, progress=True, on_bad=None) -> None:
    """``on_bad``: see FeatureCache.fill (None: an unreadable image raises)."""
    for name, cache in caches.items():
        if name == "vision":
            keys = [str(e["image"]) for e in examples]
        else:  # texts the batcher will skip (empty, or none at all) are not worth a cache entry
            keys = [model.task.text_of(e) for e in examples if needed_text_error(model.task, e) is None]
        cache.fill(keys, device, progress, on_bad=on_bad)


@torch.no_grad()
def evaluate(model, examples, batcher, batch_size: int, device, progress=False, desc="eval",
             accelerator=None) -> dict:
    """Loss and task metrics over ``examples`` (sorted by image so each image is encoded once),
    and how many examples they were computed over (``examples``). A batcher with a skip log
    leaves out the examples it cannot use and counts them there (reset here first).

    Under several processes (``accelerator``) each computes the outputs of its slice of the
    sorted examples and all of them the metrics over the gathered outputs. A task with its own
    ``evaluate`` (captioning) runs it whole on every process."""
    skips = getattr(batcher, "skips", None)
    if skips is not None:
        skips.new_epoch()
    if model.task.own_evaluation:  # a task whose metrics need more than outputs (captioning generates)
        if skips is not None:  # it batches the examples more than once (loss, captions): screen them once
            examples, batcher = batcher.screen(examples), Batcher(batcher.model, batcher.caches)
        if not examples:
            raise skips.all_skipped_error() if skips is not None and skips.seen else _nothing(desc)
        return model.task.evaluate(model, examples, batcher, batch_size, device, progress=progress,
                                   desc=desc) | {"examples": len(examples)}
    model.eval()
    examples = sorted(examples, key=lambda e: str(e["image"]))
    several = accelerator is not None and accelerator.num_processes > 1
    if several:
        examples = process_slice(examples, accelerator.num_processes, accelerator.process_index)
    logits, targets = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False):
        batch = batcher(examples[start: start + batch_size])
        if not batch:  # every example of this batch was skipped
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        logits.append(model(batch).float().cpu())
        targets.append(batch["labels"].cpu())
    if several:   # every process gets every output, in the order of the sorted examples
        logits = gather_rows(torch.cat(logits) if logits else torch.zeros(0), accelerator).cpu()
        targets = gather_rows(torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long), accelerator).cpu()
        logits, targets = ([logits], [targets]) if len(logits) else ([], [])
    if not logits:
        raise skips.all_skipped_error() if skips is not None and skips.seen else _nothing(desc)
    logits, targets = torch.cat(logits), torch.cat(targets)
    return {"loss": model.task.loss(logits, targets).item(), **model.task.metrics(logits, targets),
            "examples": len(logits)}


def _nothing(split: str) -> DataError:
    return DataError(f"the {split} split has no examples to evaluate")


def _classifies_into_labels(recipe) -> bool:
    """VQA and classification: one output per label, trained only on the labels of train."""
    return TASKS.get(recipe.task.type).classifies_into_labels


def _count_truncated(model, splits, names, counts: dict, log) -> None:
    for name in names:
        counts[name], warning = model.task.truncated(model.towers["text"].processor, splits[name], model.max_length)
        if warning:
            log(f"peftmm: {name}: {warning}")


def _all_have_examples(batch: dict, accelerator) -> bool:
    """Whether to step on this batch. Under several processes they must agree, or the ones that
    step would wait for the others' gradients forever: a batch left empty on one skips all."""
    if accelerator.num_processes == 1:
        return bool(batch)
    flag = torch.tensor([1.0 if batch else 0.0], device=accelerator.device)
    return accelerator.gather(flag).min().item() > 0


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


def train(recipe, run_dir: str | Path | None = None, progress: bool = True, log=_log,
          resume: bool = False) -> TrainResult:
    """``resume``: continue ``run_dir`` from its latest complete checkpoint; ``recipe`` must be
    the one it was started with (checkpoint.resume_recipe reads it from the run directory)."""
    from accelerate.utils import set_seed

    spec = recipe.train
    accelerator = _accelerator(spec)
    set_seed(spec.seed)
    main = accelerator.is_main_process
    log = log if main else (lambda *a, **k: None)
    run_dir = Path(run_dir) if run_dir else default_run_dir(recipe)
    if accelerator.num_processes > 1:   # the main process's name: clocks may tick between processes
        from accelerate.utils import broadcast_object_list

        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    saved = resume_point(run_dir, recipe, log) if resume else None

    splits = load_splits(recipe.data)
    for name in ("train", "val", "test"):  # found now, not after the whole training
        if not splits[name]:
            raise DataError(f"the {name} split is empty (data.source {recipe.data.source}); every run trains, "
                            "picks its best epoch on val and reports test: give each split examples")
    if _classifies_into_labels(recipe):
        check_labels_in_train(splits)
    model = MultimodalModel.build(recipe, splits.labels, device=accelerator.device)
    initialised = saved.state["initialised"] if saved else _initialise(model, recipe, log)
    trainable, total = model.parameter_counts()
    log(f"peftmm: {recipe.name}: trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.3f}%)")
    skips = {name: SplitLog(name, recipe.data.on_bad_sample) for name in ("train", "val", "test")}
    truncated: dict[str, int] = {}
    _count_truncated(model, splits, ("train", "val"), truncated, log)
    caches = build_caches(model, recipe, log, write=main)
    on_bad = cache_on_bad(recipe.data.on_bad_sample)
    fill_caches(caches, model, splits.train + splits.val, accelerator.device, progress and main, on_bad)
    # After caching (captioning's memory reads the cached vision features); again on resume, from
    # the same frozen features, so it comes out the same.
    model.task.prepare(model, splits.train, Batcher(model, caches), accelerator.device, progress and main)
    tracker = SkipTracker(Batcher(model, caches, skips["train"]))
    loader, batches = train_loader(splits.train, spec, tracker, accelerator.num_processes,
                                   accelerator.process_index)
    optimizer = torch.optim.AdamW(model.parameter_groups(spec.lr), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / spec.grad_accum)
    total_steps = min(spec.max_steps or 10**12, spec.epochs * steps_per_epoch)
    scheduler = _scheduler(spec, optimizer, total_steps)
    model, optimizer, loader, scheduler = _prepare(accelerator, model, optimizer, loader, scheduler)
    core = accelerator.unwrap_model(model)

    saver = Checkpointer(run_dir, recipe, accelerator, core, optimizer, scheduler, batches, tracker, skips,
                         splits, initialised, main)
    # resumed at an epoch's start, the random generators are restored now; mid-epoch, below
    run, records = saver.resume(saved) if saved else saver.start()
    metrics_path, started = run_dir / "metrics.jsonl", time.perf_counter()

    def record(entry):
        records.append(entry)
        run.records = len(records)
        if main:  # appended entry by entry: a run that stops early keeps what it logged, no file left open
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    val_batcher = Batcher(core, caches, skips["val"])
    for epoch in range(run.epoch, 0 if run.finished else spec.epochs + 1):
        model.train()
        if not run.batches:
            skips["train"].new_epoch()
        saver.epoch_start(run.batches)
        bar = tqdm(total=len(loader), initial=run.batches, desc=f"epoch {epoch}/{spec.epochs}", unit="batch",
                   disable=not (progress and main), dynamic_ncols=True)
        tick, seen = time.perf_counter(), 0
        for batch in loader:
            if saved and run.batches:  # resumed mid-epoch: the generators as they were after this batch
                restore_rng(saved)
            saved = None
            run.batches += 1
            if not _all_have_examples(batch, accelerator):  # every example was skipped: no step
                bar.update(1)
                continue
            with accelerator.accumulate(model):
                loss, logged = batch_loss(core.task, model(batch), batch["labels"], accelerator)
                saver.check_loss(loss, run.step + 1, epoch)  # not finite: stop before this step
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            seen += len(batch["labels"])
            if accelerator.sync_gradients:
                run.step += 1
                rate = seen / max(time.perf_counter() - tick, 1e-9)
                record({"step": run.step, "epoch": epoch, "loss": logged, "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": round(rate * accelerator.num_processes, 2)})
                bar.set_postfix(loss=f"{logged:.4f}", samples_s=f"{rate * accelerator.num_processes:.0f}")
                if saver.due(run, len(loader), total_steps):
                    saver.save(run, run.seconds + time.perf_counter() - started)
            bar.update(1)
            if run.step >= total_steps:
                break
        bar.close()
        trained = skips["train"].merged(accelerator)
        if trained.seen and trained.skipped == trained.seen:
            raise trained.all_skipped_error()
        if trained.line(f"epoch {epoch}"):
            log(trained.line(f"epoch {epoch}"))
        val = evaluate(core, splits.val, val_batcher, spec.eval_batch_size, accelerator.device, desc="val",
                       accelerator=accelerator)
        validated = skips["val"].merged(accelerator)
        if validated.line(f"epoch {epoch}"):
            log(validated.line(f"epoch {epoch}"))
        score = val[core.task.primary_metric]
        record({"epoch": epoch, "step": run.step, **{f"val_{k}": v for k, v in val.items()},
                "skipped_train": trained.skipped, "skipped_val": validated.skipped})
        log(f"epoch {epoch}: val {core.task.primary_metric} {score:.4f} over {val['examples']:,} examples, "
            f"val loss {val['loss']:.4f}")
        if score > run.best["score"]:
            run.best = {"score": score, "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in core.trainable_state_dict().items()}}
            run.stale = 0
        else:
            run.stale += 1
        run.finished = run.stale >= spec.patience or run.step >= total_steps
        run.epoch, run.batches = epoch + 1, 0
        saver.save(run, run.seconds + time.perf_counter() - started)
        if run.finished:
            break

    train_seconds = run.seconds + time.perf_counter() - started
    best = run.best
    core.load_trainable_state_dict(best["state"])
    # with the best weights (retrieval's pair memory embeds the train split with them); again on
    # resume, from the same weights. A log of its own: training's skip counts are final.
    core.task.finish(core, splits.train, Batcher(core, caches, SplitLog("train")), accelerator.device,
                     progress and main)
    _count_truncated(core, splits, ("test",), truncated, log)
    fill_caches(caches, core, splits.test, accelerator.device, progress and main, on_bad)
    test = evaluate(core, splits.test, Batcher(core, caches, skips["test"]), spec.eval_batch_size,
                    accelerator.device, progress=progress and main, desc="test", accelerator=accelerator)
    # what every process left out, together (one gather per split: see SplitLog.merged)
    merged = {name: skips[name].merged(accelerator) for name in ("train", "val", "test")}
    if merged["test"].line("test"):
        log(merged["test"].line("test"))
    metrics = {f"test_{k}": v for k, v in test.items()} | {
        f"val_{core.task.primary_metric}": best["score"], "best_epoch": best["epoch"],
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "train_seconds": round(train_seconds, 1), "steps": run.step,
        # distinct examples left out over the whole run, and texts cut at text.max_length, per split
        **{f"skipped_{name}": len(log_.ever) for name, log_ in merged.items()},
        **{f"truncated_{name}": n for name, n in truncated.items()},
    } | ({"init_from": initialised["bundle"]} if initialised else {})
    record({"final": metrics})
    bundle_dir = run_dir / "bundle"
    if main:
        save_bundle(core, recipe, bundle_dir, metrics)
        plot_curves(records, run_dir / "curves.png", title=recipe.name)
    log(f"test {core.task.primary_metric} {test[core.task.primary_metric]:.4f} over {test['examples']:,} "
        f"examples; bundle: {bundle_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, bundle_dir, metrics, main)
