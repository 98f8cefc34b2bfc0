"""Reference points for the emoji tasks, computed from frozen features (no training of adapters).

    .venv/bin/python bench/emoji_baselines.py            # writes bench/results/emoji_baselines.json
    .venv/bin/python bench/emoji_baselines.py --threads 2 --precision fp32

On the split every emoji recipe uses (``data: {source: emoji}`` with its defaults, read from
recipes/emoji-caption.yaml and checked against the other emoji recipes):

- retrieval chance: a random ranking finds the positive in its top K with probability K/N;
- nearest-neighbour captioning: each test image gets the caption of the most cosine-similar
  train image (pooled MobileNetV2 features), scored by peftmm.tasks.captioning.metrics, the very
  function the captioning task reports; plus the oracle "best train caption" unigram F1 (an
  upper bound for any method that copies a train caption);
- majority class: the most frequent train group predicted for every test image;
- linear probe: multinomial logistic regression on standardised pooled features, L2 strength
  chosen on val, accuracy and macro-F1 (the classification task's own macro_f1) on test;
- image-text probe: the same logistic regression on each example's pooled image features
  concatenated with its caption's frozen MiniLM embedding (recipes/emoji-group-image-text.yaml
  reads both too), and on the caption's embedding alone;
- the pair memory's bridge alone, nothing trained: retrieval scored only through the training
  pairs (peftmm.tasks.retrieval.memory with recipes/emoji-retrieval-adapters.yaml's K and
  temperature), each side in its frozen tower's own space (pooled MobileNetV2 features for
  images, MiniLM's mean-pooled output for texts, as the locked text side embeds them).

Features come from the vision tower as peftmm loads it (backbones.load_tower, the recipes'
backbone, precision and image_size) through the trainer's FeatureCache; they are the tokens the
recipes' frozen vision tower feeds its fusion, average-pooled over the 7x7 positions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["emoji-caption", "emoji-retrieval-projection", "emoji-retrieval", "emoji-group", "emoji-group-image-text"]
BRIDGE_RECIPE = "emoji-retrieval-adapters"   # its text tower and pair-memory settings
# Decades and half-decades: wide enough that the chosen strength is never at the edge
# (checked: the result records the grid and the choice).
L2_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]


def load_split(recipe_names: list[str]):
    """The split of the emoji recipes; all of them must describe the same one."""
    from peftmm.data import load_splits
    from peftmm.recipe import load

    recipes = [load(ROOT / "recipes" / f"{name}.yaml") for name in recipe_names]
    keys = ("source", "val_fraction", "test_fraction", "max_train_samples", "max_eval_samples")
    first = recipes[0]
    for recipe in recipes[1:]:
        for key in keys:
            if getattr(recipe.data, key) != getattr(first.data, key):
                raise SystemExit(f"{recipe.name} and {first.name} differ in data.{key}: not one split")
    return first, load_splits(first.data)


@torch.no_grad()
def pooled_features(recipe, examples_by_split: dict, precision: str) -> tuple[dict[str, torch.Tensor], object]:
    from peftmm.backbones import load_tower
    from peftmm.features import FeatureCache

    spec = recipe.vision
    tower = load_tower("vision", spec.backbone, precision, image_size=spec.image_size)
    cache = FeatureCache(tower, batch_size=32)
    out = {}
    for split, examples in examples_by_split.items():
        keys = [str(e["image"]) for e in examples]
        cache.fill(keys, "cpu", progress=False)
        # [N_tokens, D] per image -> [D]: global average pooling, MobileNetV2's own classifier input
        out[split] = torch.stack([cache.store[k].mean(0) for k in keys]).double()
    # bitsandbytes int8 replaces nn.Linear layers only: a CNN without any keeps fp32 convolutions.
    quantised = sum(type(m).__module__.startswith("bitsandbytes") for m in tower.model.modules())
    return out, tower.info, quantised


@torch.no_grad()
def pooled_text_features(recipe, examples_by_split: dict) -> dict[str, torch.Tensor]:
    """The text tower's mean-pooled output per example (the locked text side's embedding)."""
    from peftmm.backbones import load_tower
    from peftmm.features import FeatureCache

    spec = recipe.text
    tower = load_tower("text", spec.backbone, spec.precision)
    cache = FeatureCache(tower, batch_size=64, max_length=spec.max_length)
    out = {}
    for split, examples in examples_by_split.items():
        keys = [e["text"] for e in examples]
        cache.fill(keys, "cpu", progress=False)
        out[split] = torch.stack([cache.store[k].float().mean(0) for k in keys])   # padding was dropped
    return out


def bridge_retrieval(vision: dict, text: dict, task) -> dict:
    """Test recall of the pair memory's bridge over frozen features: nothing trained."""
    from peftmm.tasks.retrieval import recall_metrics
    from peftmm.tasks.retrieval.memory import PairMemory

    normalise = lambda x: torch.nn.functional.normalize(x.float(), dim=-1)   # noqa: E731
    memory = PairMemory.build(vision["train"], text["train"])
    similarity = memory.bridge(normalise(vision["test"]), normalise(text["test"]), task.memory_neighbours,
                               task.memory_temperature)
    return {**recall_metrics(similarity), "memory_neighbours": task.memory_neighbours,
            "memory_temperature": task.memory_temperature, "pairs": len(memory)}


def retrieval_chance(n: int) -> dict:
    return {f"{d}_r{k}": min(k / n, 1.0) for d in ("i2t", "t2i") for k in (1, 5, 10)}


def nearest_neighbour_captions(features: dict, splits) -> dict:
    from peftmm.tasks.captioning.metrics import caption_metrics, unigram_f1, words

    train, test = splits.train, splits.test
    a = torch.nn.functional.normalize(features["test"], dim=-1)
    b = torch.nn.functional.normalize(features["train"], dim=-1)
    nearest = (a @ b.T).argmax(-1).tolist()
    # As CaptioningTask.evaluate: one hypothesis per distinct test image, against all its captions.
    references: dict[str, list[str]] = {}
    hypothesis: dict[str, str] = {}
    for example, j in zip(test, nearest):
        caption = " ".join(str(example["text"] or "").split())
        if caption:
            references.setdefault(str(example["image"]), []).append(caption)
            hypothesis.setdefault(str(example["image"]), train[j]["text"])
    images = list(references)
    scores = caption_metrics([hypothesis[i] for i in images], [references[i] for i in images])
    train_words = [words(e["text"]) for e in train]
    oracle = [max(max(unigram_f1(t, words(r)) for r in references[i]) for t in train_words) for i in images]
    examples = [{"image": Path(i).name, "reference": references[i][0], "nearest_train_caption": hypothesis[i]}
                for i in images[:5]]
    return {**scores, "oracle_best_train_caption_unigram_f1": sum(oracle) / len(oracle), "images": len(images),
            "examples": examples}


def majority(splits) -> dict:
    from peftmm.tasks.labels import macro_f1

    labels = splits.labels
    counts = torch.bincount(torch.tensor([labels.index(e["label"]) for e in splits.train]), minlength=len(labels))
    top = int(counts.argmax())
    targets = torch.tensor([labels.index(e["label"]) for e in splits.test])
    predicted = torch.full_like(targets, top)
    # The family split leaves test with other group shares than train: the test's own most
    # frequent group, for reference (not a baseline: it looks at the test labels).
    test_top = int(torch.bincount(targets, minlength=len(labels)).argmax())
    return {"label": labels[top], "train_share": counts[top].item() / counts.sum().item(),
            "test_majority_label": labels[test_top],
            "test_majority_share": (targets == test_top).double().mean().item(),
            "accuracy": (predicted == targets).double().mean().item(),
            "macro_f1": macro_f1(predicted, targets, len(labels))}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2/2 * |W|^2 (bias unpenalised),
    full-batch L-BFGS from zero: convex, so the optimum does not depend on a seed."""
    w = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def linear_probe(features: dict, splits, fine: str | None = None) -> dict:
    """``fine``: an example field with finer labels (emoji: "subgroup") to fit the probe on; its
    answers are then the groups, each group's probability the sum of its subgroups' (what
    ClassificationTask does with parent_labels)."""
    from peftmm.tasks.labels import macro_f1

    labels = splits.labels
    y = {s: torch.tensor([labels.index(e["label"]) for e in splits[s]]) for s in ("train", "val", "test")}
    fit_y, to_parent = y, None
    if fine:
        children = sorted({e[fine] for s in ("train", "val", "test") for e in splits[s]})
        parent = {e[fine]: e["label"] for s in ("train", "val", "test") for e in splits[s]}
        fit_y = {s: torch.tensor([children.index(e[fine]) for e in splits[s]]) for s in ("train", "val", "test")}
        to_parent = torch.zeros(len(children), len(labels), dtype=torch.float64)
        to_parent[torch.arange(len(children)), torch.tensor([labels.index(parent[c]) for c in children])] = 1
    mean, std = features["train"].mean(0), features["train"].std(0).clamp(min=1e-6)  # train statistics only
    x = {s: (features[s] - mean) / std for s in ("train", "val", "test")}

    def scores(w, b, split):
        logits = x[split] @ w + b
        predicted = (logits.softmax(-1) @ to_parent if fine else logits).argmax(-1)
        return {"accuracy": (predicted == y[split]).double().mean().item(),
                "macro_f1": macro_f1(predicted, y[split], len(labels))}

    classes = to_parent.shape[0] if fine else len(labels)
    grid = []
    for l2 in L2_GRID:
        w, b = fit_logistic(x["train"], fit_y["train"], classes, l2)
        grid.append({"l2": l2, **{f"val_{k}": v for k, v in scores(w, b, "val").items()}, "weights": (w, b)})
    # best val accuracy; ties go to val macro-F1, then to the stronger penalty (the simpler model)
    best = max(grid, key=lambda g: (g["val_accuracy"], g["val_macro_f1"], g["l2"]))
    test = scores(*best["weights"], "test")
    return {**test, "l2": best["l2"], "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
            "fitted_on": fine or "label", "classes": classes,
            "chosen_at_grid_edge": best["l2"] in (L2_GRID[0], L2_GRID[-1]),
            "grid": [{k: v for k, v in g.items() if k != "weights"} for g in grid]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default=None, help="vision tower precision (default: the recipes', int8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other core free)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/emoji_baselines.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from peftmm.recipe import load

    recipe, splits = load_split(RECIPES + [BRIDGE_RECIPE])
    precision = args.precision or recipe.vision.precision
    features, info, quantised = pooled_features(recipe, {s: splits[s] for s in ("train", "val", "test")}, precision)
    retrieval = load(ROOT / "recipes" / f"{BRIDGE_RECIPE}.yaml")
    texts = pooled_text_features(retrieval, {s: splits[s] for s in ("train", "val", "test")})
    feature_seconds = time.perf_counter() - started
    group_counts = {s: {label: sum(e["label"] == label for e in splits[s]) for label in splits.labels}
                    for s in ("train", "val", "test")}
    result = {
        "split": {"recipes": RECIPES, "data": {"source": recipe.data.source, "val_fraction": recipe.data.val_fraction,
                                               "test_fraction": recipe.data.test_fraction, "label": recipe.data.label},
                  "sizes": {s: len(splits[s]) for s in ("train", "val", "test")},
                  "labels": splits.labels, "group_counts": group_counts},
        "features": {"backbone": info.source, "model_type": info.model_type, "precision": precision,
                     "fingerprint": info.fingerprint, "image_size": recipe.vision.image_size,
                     "dim": features["train"].shape[1],
                     "quantised_modules": quantised,
                     "how": "backbones.load_tower + features.FeatureCache (the recipes' preprocessing), "
                            "tokens average-pooled over the feature map's positions"},
        "retrieval_chance": {**retrieval_chance(len(splits.test)), "n": len(splits.test),
                             "how": "K/N: the probability that a uniformly random ranking of the N test "
                                    "candidates puts the one positive in the top K"},
        "nearest_neighbour_captioning": {
            **nearest_neighbour_captions(features, splits),
            "how": "each test image gets the caption of the train image with the highest cosine similarity of "
                   "pooled features; scored by peftmm.tasks.captioning.metrics.caption_metrics against the image's "
                   "captions, as CaptioningTask.evaluate does. oracle: per test image the best unigram F1 of any "
                   "train caption"},
        "majority_class": {**majority(splits), "how": "the most frequent train label predicted for every test "
                                                      "image; macro-F1 by peftmm.tasks.labels.macro_f1"},
        "linear_probe": {**linear_probe(features, splits),
                         "how": "multinomial logistic regression (torch L-BFGS, float64, bias unpenalised) on pooled "
                                "features standardised with train mean/std; fitted on train only, L2 strength "
                                "picked by val accuracy from the grid; macro-F1 by peftmm.tasks.labels.macro_f1"},
        "subgroup_probe": {**linear_probe(features, splits, fine="subgroup"),
                           "how": "the same logistic regression fitted on the examples' subgroups; a test image's "
                                  "answer is the group whose subgroups' probabilities sum highest"},
        "image_text_probe": {**linear_probe({s: torch.cat([features[s], texts[s].to(features[s].dtype)], -1)
                                             for s in ("train", "val", "test")}, splits),
                             "text_features": f"{retrieval.text.backbone} {retrieval.text.precision}, mean-pooled",
                             "how": "the same logistic regression on pooled image features concatenated with the "
                                    "caption's frozen text embedding (the image and its name)"},
        "text_probe": {**linear_probe(texts, splits),
                       "text_features": f"{retrieval.text.backbone} {retrieval.text.precision}, mean-pooled",
                       "how": "the same logistic regression on the caption's frozen text embedding alone"},
        "pair_memory_bridge": {**bridge_retrieval(features, texts, retrieval.task),
                               "text_features": f"{retrieval.text.backbone} {retrieval.text.precision}, mean-pooled",
                               "how": "retrieval scored through the training pairs alone (PairMemory.bridge, the "
                                      f"settings of recipes/{BRIDGE_RECIPE}.yaml), images as pooled frozen vision "
                                      "features, texts as the frozen text tower's mean-pooled output; nothing "
                                      "trained; recall by peftmm.tasks.retrieval.recall_metrics"},
        "timing": {"feature_seconds": round(feature_seconds, 1),
                   "total_seconds": round(time.perf_counter() - started, 1), "threads": args.threads,
                   "machine": f"{platform.machine()}, torch {torch.__version__}"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    short = {k: {m: v for m, v in result[k].items() if isinstance(v, float)} for k in
             ("retrieval_chance", "pair_memory_bridge", "nearest_neighbour_captioning", "majority_class",
              "linear_probe", "subgroup_probe", "image_text_probe", "text_probe")}
    print(json.dumps({"sizes": result["split"]["sizes"], **short, "timing": result["timing"]}, indent=2))


if __name__ == "__main__":
    main()
