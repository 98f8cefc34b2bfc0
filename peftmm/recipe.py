"""Recipes: the whole description of a training run, as data.

A recipe is a YAML file (or a dict) with the sections below. Loading validates every key and
value, so a typo fails before any backbone is loaded, with the file, key path and allowed values.
Method, fusion and task settings are validated by the part the ``type:`` names.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import schema
from .augment import AugmentSpec
from .errors import RecipeError
from .images import parse_background
from .safe_load import load_yaml, short_repr, utf8_text
from .schema import MAX_BATCH

Precision = Literal["int8", "nf4", "bf16", "fp32"]


@dataclass
class TowerSpec:
    backbone: str                      # zoo name, hub id or local folder
    precision: Precision = "fp32"
    methods: list[dict] = field(default_factory=list)   # each {type: lora|adapter|prefix|full, ...}
    cache_features: bool = True        # reuse outputs of a tower with no trainable modules
    image_size: int | None = field(default=None, metadata={"min": 16, "max": 1024})  # vision only
    max_length: int = field(default=32, metadata={"min": 4, "max": 4096})             # text only
    augment: AugmentSpec = field(default_factory=AugmentSpec)  # vision only, training only (augment.py)
    # Activation checkpointing in a tower with trainable modules: keep only each block's input
    # and run the block again in backward (less memory, one more forward pass; Tower.enable_checkpointing)
    gradient_checkpointing: bool = False
    # Vision only: the colour transparent pixels are composited onto (a name, #rrggbb or rgb(...)).
    # Saved with the bundle, so prediction sees images as training did; part of the feature-cache key.
    background: str = "white"

    def validate(self):
        try:
            parse_background(self.background)
        except ValueError:
            raise ValueError(f"background = {short_repr(self.background)} is not a colour: give a name such as "
                             "white, #rrggbb or rgb(r, g, b)") from None


@dataclass
class DataColumns:
    """data.source hf: which column of the data set is which part of an example (null: the
    column of that name when the data set has one; see data/hf.py)."""
    image: str | None = None
    text: str | None = None
    label: str | None = None
    conversation: str | None = None


@dataclass
class DataSplits:
    """data.source hf: the data set's split for each of peftmm's (null: train, validation/val,
    test when present; a missing val or test is cut from train)."""
    train: str | None = None
    val: str | None = None
    test: str | None = None


@dataclass
class DataSpec:
    source: str = "easy-vqa"
    val_fraction: float = field(default=0.1, metadata={"gt": 0.0, "max": 0.5})
    max_train_samples: int | None = field(default=None, metadata={"min": 1})
    max_eval_samples: int | None = field(default=None, metadata={"min": 1})
    # Share held out as test by sources without a fixed test split (emoji, files).
    test_fraction: float = field(default=0.1, metadata={"gt": 0.0, "max": 0.5})
    path: str | None = None    # files / llava / messages: the data file, relative to the recipe file
    # llava / messages: the folder the records' image paths are relative to (default: the data
    # file's folder); relative to the recipe file
    image_root: str | None = None
    # The generative view of a built-in source (easy-vqa, emoji): each example a conversation of
    # questions and answer words (data/conversation_views.py); llava and messages are conversations already
    conversations: bool = False
    # emoji: which Unicode category is the label; "group > subgroup": subgroups as paths under their
    # group, for task.parent_labels (train on subgroups, answer groups)
    label: Literal["group", "subgroup", "group > subgroup"] = "group"
    # An example whose image is missing or unreadable, or whose needed text is empty: "skip"
    # leaves it out and counts it (one warning per epoch and split), "stop" ends the run there.
    on_bad_sample: Literal["skip", "stop"] = "skip"
    # hf: the configuration (data set "name") and revision of a Hub data set; the column and split mappings
    name: str | None = None
    revision: str | None = None
    columns: DataColumns = field(default_factory=DataColumns)
    splits: DataSplits = field(default_factory=DataSplits)

    def validate(self):
        needs = {"files": "a .jsonl or .csv file", "llava": "a .json file", "messages": "a .jsonl file",
                 "hf": "a Hub data set id, a local data set folder or a data file"}
        if self.source in needs and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r} ({needs[self.source]})")
        if self.image_root is not None and not self.image_root.strip():
            raise ValueError("data.image_root must name a folder, or be null (image paths relative to data.path)")

    def resolve_paths(self, where: str | None) -> None:
        """Make ``path`` and ``image_root`` absolute: relative to the recipe file, or to the working
        folder without one."""
        base = Path(where).parent if where else Path()
        if self.path and not Path(self.path).is_absolute():
            local = os.path.normpath(base.absolute() / self.path)
            # hf: a path that is no local file or folder stays a Hub data set id
            if self.source != "hf" or os.path.exists(local) or self.path.startswith((".", "~")):
                self.path = local
        if self.image_root and not Path(self.image_root).is_absolute():
            self.image_root = os.path.normpath(base.absolute() / self.image_root)


@dataclass
class TrainSpec:
    epochs: int = field(default=3, metadata={"min": 1, "max": 1000})
    batch_size: int = field(default=64, metadata={"min": 1, "max": MAX_BATCH})
    eval_batch_size: int = field(default=256, metadata={"min": 1, "max": MAX_BATCH})
    grad_accum: int = field(default=1, metadata={"min": 1, "max": 10_000})
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.01, metadata={"min": 0.0, "max": 1.0})
    warmup_ratio: float = field(default=0.05, metadata={"min": 0.0, "max": 1.0})
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_steps: int | None = field(default=None, metadata={"min": 1})
    patience: int = field(default=2, metadata={"min": 1, "max": 1000})      # epochs without val gain before stopping
    seed: int = 0
    group_by_image: bool = False   # batch all questions of an image together (see sampling.py)
    # Threads decoding and resizing a training batch's images where the vision tower trains (no
    # feature cache); null: up to 4, as the machine's cores allow; 0: on the training loop's own
    # thread. The batch and its skip accounting stay the same (batching.Batcher).
    image_workers: int | None = field(default=None, metadata={"min": 0, "max": 64})
    # auto: bf16 on GPUs that compute it natively (compute capability 8.0 and up), fp16 with a gradient
    # scaler on 7.x, fp32 on CPU and older GPUs (precision.py); the bundle records what was used
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # A checkpoint (checkpoint.py) every this many optimizer steps, and at every epoch end
    # (0: only at epoch ends); the newest keep_checkpoints are kept. `peftmm train --resume`.
    checkpoint_every: int = field(default=0, metadata={"min": 0, "max": 10**9})
    keep_checkpoints: int = field(default=2, metadata={"min": 1, "max": 1000})
    # Keep the frozen-feature cache (towers with nothing to train) on disk in this folder, for
    # later runs and epochs; null: in memory, for this run only. Entries are keyed by backbone
    # weights, precision and preprocessing, checked and rebuilt when damaged (feature_store.py). A
    # relative path is relative to the recipe file (to the working folder without one); ~ is home.
    feature_cache_dir: str | None = None
    # Experiment trackers the run's metrics.jsonl scalars and recipe go to (trackers.py), each an
    # optional extra; [] (default): none
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=list)

    def validate(self):
        if self.feature_cache_dir is not None and not self.feature_cache_dir.strip():
            raise ValueError("train.feature_cache_dir must name a folder, or be null to cache in memory only")

    def resolve_paths(self, where: str | None) -> None:
        """Make ``feature_cache_dir`` absolute, as DataSpec does ``path``."""
        path = self.feature_cache_dir
        if path and (path == "~" or path.startswith("~/")):
            path = os.path.expanduser(path)
        if path and not Path(path).is_absolute():
            base = Path(where).parent if where else Path()
            path = os.path.normpath(base.absolute() / path)
        self.feature_cache_dir = path


@dataclass
class Recipe:
    vision: TowerSpec
    text: TowerSpec
    name: str = "run"
    task: dict = field(default_factory=lambda: {"type": "vqa"})
    fusion: dict = field(default_factory=lambda: {"type": "gated-cross-attention"})
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    # Stage chaining: start from the trained modules of an earlier bundle (same backbones), e.g.
    # alignment pre-training before task fine-tuning. A bundle folder, run directory or name
    # under ./adapters; a relative path is tried relative to the recipe file first.
    init_from: str | None = None
    source: str | None = field(default=None, init=False)  # the file it came from, for errors

    def resolve_parts(self):
        # Part-specific sections are validated by their registries (imported late: parts
        # import recipe types, not the other way round).
        from .data import CONVERSATION_VIEWS, DATASETS
        from .fusion import FUSIONS
        from .methods import METHODS, check_method_combination
        from .tasks import TASKS

        DATASETS.get(self.data.source, "data.source", self.source)
        if self.data.conversations:
            CONVERSATION_VIEWS.get(self.data.source, "data.source (with data.conversations: true)", self.source)
        self.task = TASKS.config(self.task, "task", self.source)
        self.fusion = FUSIONS.config(self.fusion, "fusion", self.source)
        allowed = TASKS.get(self.task.type).fusions
        if allowed and self.fusion.type not in allowed:
            raise RecipeError(f"fusion.type = {self.fusion.type!r} cannot serve task {self.task.type!r}; "
                              f"use {' or '.join(allowed)}", self.source)
        TASKS.get(self.task.type).check_recipe(self)
        if self.text.augment.active:
            raise RecipeError("text.augment: augmentation applies to images; set it under vision", self.source)
        for tower_name in ("vision", "text"):
            tower = getattr(self, tower_name)
            tower.methods = [METHODS.config(m, f"{tower_name}.methods.{i}", self.source)
                             for i, m in enumerate(tower.methods)]
            check_method_combination(tower.methods, f"{tower_name}.methods", self.source)
            for i, config in enumerate(tower.methods):
                METHODS.get(config.type).check_precision(config, tower.precision, f"{tower_name}.methods.{i}",
                                                         self.source)

    def to_dict(self) -> dict:
        data = schema.to_dict(self)
        return data


def from_dict(data: dict, source: str | None = None, overrides: list[str] = ()) -> Recipe:
    data = copy.deepcopy(data)
    if data is None:  # an empty file: the missing sections are named below
        data = {}
    for item in overrides:
        apply_override(data, item, source)
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of sections", source)
    recipe = schema.build(Recipe, data, "", source)
    recipe.source = source
    recipe.resolve_parts()
    return recipe


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot read recipe: {e.strerror}", str(path)) from None
    data = load_yaml(utf8_text(raw, str(path), RecipeError), str(path), RecipeError)
    return from_dict(data, str(path), overrides)



def apply_override(data: dict, item: str, source: str | None = None) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to nested ``data``; list items by index."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r} must look like key.path=value", source)
    if not isinstance(data, dict):
        raise RecipeError(f"--set {item!r}: a recipe must be a mapping of sections", source)
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw, source, RecipeError) if raw.strip() else None
    except RecipeError as e:
        reason = e.message.split(": ", 1)[-1]
        raise RecipeError(f"--set {key}: the value {short_repr(raw)} is not valid YAML ({reason})", source) from None
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {here} has no item {part}", source)
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {key}: {here} is a value, not a section", source)
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"--set {key}: no item {last}", source)
        node[int(last)] = value
    else:
        node[last] = value
