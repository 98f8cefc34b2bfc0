"""Bad input during training (data.on_bad_sample): unreadable or missing images and empty texts
are skipped and counted (or stop the run), texts cut at text.max_length are counted, val/test
labels that train never has are refused, and init_from on other backbones is refused. Tiny
MobileNetV2 + BERT (+ a tiny Llama LM for captioning) on a small `files` data set."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from peftmm import DataError, RecipeError, recipe_from_dict
from peftmm.batching import Batcher
from peftmm.bundle import save_bundle
from peftmm.cli import main
from peftmm.features import FeatureCache
from peftmm.images import load_image
from peftmm.model import MultimodalModel
from peftmm.trainer import train

CORRUPT, TRUNCATED, MISSING = "corrupt", "truncated", "missing"
TRAIN_LINE = "skipped 4 of 12 train examples (empty text: 1, image cannot be decoded: 2, image not found: 1); first: "


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(tiny.build(kind, root / kind)) for kind in ("mobilenet_v2", "bert", "llama_lm")}


# these runs seed torch; later modules' seeded expectations must not depend on them
pytestmark = pytest.mark.usefixtures("keep_torch_rng")


def write_data(folder: Path, rows: list[tuple]) -> Path:
    """``rows``: (split, image kind, text, label or None); image kind is an int (a distinct good
    image) or CORRUPT / TRUNCATED / MISSING. Returns the JSONL file."""
    (folder / "img").mkdir(parents=True)
    records, missing = [], []
    for n, (split, kind, text, label) in enumerate(rows):
        name = f"img/{n}-{kind}.png"
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), ((n * 37) % 256, (n * 91) % 256, 128)).save(buffer, format="PNG")
        data = buffer.getvalue()
        if kind == CORRUPT:
            data = random.Random(n).randbytes(300)
        elif kind == TRUNCATED:
            data = data[: len(data) // 2]
        (folder / name).write_bytes(data)
        if kind == MISSING:
            missing.append(folder / name)
        records.append({"image": name, "split": split, **({"text": text} if text is not None else {}),
                        **({"label": label} if label is not None else {})})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for image in missing:   # written with the file, then deleted: as a data set that lost an image
        image.unlink()
    return path


def classification_rows() -> list[tuple]:
    good = [("train", i, "what shape is this?", "circle" if i % 2 else "square") for i in range(8)]
    return good + [("train", CORRUPT, "what shape is this?", "circle"),
                   ("train", TRUNCATED, "what shape is this?", "square"),
                   ("train", MISSING, "what shape is this?", "circle"),
                   ("train", 8, "   ", "square")] + \
        [("val", 10 + i, "what shape is this?", "circle" if i % 2 else "square") for i in range(4)] + \
        [("val", CORRUPT, "what shape is this?", "circle")] + \
        [("test", 20 + i, "what shape is this?", "circle" if i % 2 else "square") for i in range(4)] + \
        [("test", MISSING, "what shape is this?", "square")]


def base_recipe(models, path: Path, **sections) -> dict:
    data = {
        "name": "bad-samples",
        "vision": {"backbone": models["mobilenet_v2"]},
        "text": {"backbone": models["bert"], "max_length": 16},
        "fusion": {"type": "concat-mlp", "dim": 16, "dropout": 0.0},
        "task": {"type": "classification", "hidden": 16, "dropout": 0.0},
        "data": {"source": "files", "path": str(path)},
        "train": {"epochs": 2, "batch_size": 4, "eval_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0,
                  "patience": 5},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return data


def run(recipe: dict, run_dir: Path):
    lines: list[str] = []
    result = train(recipe_from_dict(recipe), run_dir, progress=False, log=lines.append)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.metrics, lines, [r for r in records if "val_loss" in r]


def test_classification_skips_bad_examples_and_counts_them_exactly(models, tmp_path):
    path = write_data(tmp_path / "data", classification_rows())
    # batch size 1: a bad example leaves its batch empty, which must be skipped without a step;
    # no vision cache: images are decoded (and found bad) in the batcher
    recipe = base_recipe(models, path, vision={"cache_features": False}, train={"batch_size": 1})
    metrics, lines, epochs = run(recipe, tmp_path / "run")
    assert metrics["steps"] == 2 * 8   # one step per good train example and epoch
    assert (metrics["skipped_train"], metrics["skipped_val"], metrics["skipped_test"]) == (4, 1, 1)
    assert metrics["test_examples"] == 4 and metrics["truncated_train"] == 0
    for epoch in (1, 2):
        train_lines = [x for x in lines if x.startswith(f"peftmm: epoch {epoch}: skipped") and " train " in x]
        val_lines = [x for x in lines if x.startswith(f"peftmm: epoch {epoch}: skipped") and " val " in x]
        assert len(train_lines) == 1 and train_lines[0].startswith(f"peftmm: epoch {epoch}: {TRAIN_LINE}")
        assert val_lines == [f"peftmm: epoch {epoch}: skipped 1 of 5 val examples (image cannot be decoded: 1); "
                             f"first: {path.parent / 'img' / '16-corrupt.png'}: cannot decode image "
                             "(UnidentifiedImageError: cannot identify image file "
                             f"'{path.parent / 'img' / '16-corrupt.png'}')"]
        assert any(x.startswith(f"epoch {epoch}: val accuracy ") and " over 4 examples" in x for x in lines)
    missing = path.parent / "img" / "21-missing.png"
    assert f"peftmm: test: skipped 1 of 5 test examples (image not found: 1); first: {missing}: image file not found" \
        in lines
    assert [(e["skipped_train"], e["skipped_val"], e["val_examples"]) for e in epochs] == [(4, 1, 4)] * 2
    assert (tmp_path / "run" / "bundle" / "adapter_model.safetensors").is_file()


def test_retrieval_skips_with_a_vision_cache_and_counts_long_captions(models, tmp_path):
    long = "what is the color of the shape in the image and what shape is it and where is it?"
    rows = [("train", i, f"a {c} shape", None) for i, c in enumerate(["red", "blue", "green", "gray", "black",
                                                                        "yellow", "teal", "brown"])]
    rows += [("train", CORRUPT, "a red shape", None), ("train", 8, "", None), ("train", 9, long, None)]
    rows += [("val", 10 + i, f"a {c} circle", None) for i, c in enumerate(["red", "blue", "green"])]
    rows += [("test", 20 + i, f"a {c} square", None) for i, c in enumerate(["red", "blue", "green"])]
    path = write_data(tmp_path / "data", rows)   # text only: retrieval needs no label column
    recipe = base_recipe(models, path, text={"methods": [{"type": "lora", "r": 2}]},
                         fusion={"type": "dual-projection", "dim": 16}, task={"type": "retrieval"})
    recipe["fusion"].pop("dropout")
    recipe["task"] = {"type": "retrieval"}
    metrics, lines, epochs = run(recipe, tmp_path / "run")
    assert (metrics["skipped_train"], metrics["skipped_val"], metrics["skipped_test"]) == (2, 0, 0)
    assert metrics["truncated_train"] == 1 and metrics["truncated_val"] == metrics["truncated_test"] == 0
    assert lines.count("peftmm: train: 1 caption longer than text.max_length=16 tokens was truncated; "
                       "raise text.max_length") == 1
    for epoch in (1, 2):
        skipped = [x for x in lines if x.startswith(f"peftmm: epoch {epoch}: skipped")]
        assert len(skipped) == 1 and skipped[0].startswith(
            f"peftmm: epoch {epoch}: skipped 2 of 11 train examples (empty text: 1, image cannot be decoded: 1)")
    assert metrics["test_examples"] == 3 and 0.0 <= metrics["test_mean_recall"] <= 1.0
    assert [e["skipped_train"] for e in epochs] == [2, 2]


def test_captioning_skips_empty_captions_and_unreadable_images_in_evaluation(models, tmp_path):
    captions = ["a red circle", "a blue square", "a green triangle", "a gray circle", "a black square",
                "a yellow triangle"]
    rows = [("train", i, c, None) for i, c in enumerate(captions)]
    rows += [("train", 6, " ", None), ("train", TRUNCATED, "a red square", None)]
    rows += [("val", 10 + i, c, None) for i, c in enumerate(captions[:3])] + [("val", CORRUPT, "a red circle", None)]
    rows += [("test", 20 + i, c, None) for i, c in enumerate(captions[3:])]
    rows += [("test", 23, "a red circle and a blue square and a green triangle", None)]
    path = write_data(tmp_path / "data", rows)
    recipe = base_recipe(models, path, text={"backbone": models["llama_lm"], "max_length": 12,
                                             "methods": [{"type": "lora", "r": 2}]})
    recipe["fusion"] = {"type": "projector", "max_tokens": 4}
    recipe["task"] = {"type": "captioning", "prompt": "what is in the image?", "max_new_tokens": 4}
    metrics, lines, epochs = run(recipe, tmp_path / "run")
    assert (metrics["skipped_train"], metrics["skipped_val"], metrics["skipped_test"]) == (2, 1, 0)
    assert metrics["truncated_test"] == 1 and metrics["truncated_train"] == 0
    assert metrics["test_examples"] == metrics["test_images"] == 4
    assert [(e["skipped_val"], e["val_examples"], e["val_images"]) for e in epochs] == [(1, 3, 3)] * 2
    assert sum(x.startswith("peftmm: test: 1 caption longer than the ") for x in lines) == 1
    for epoch in (1, 2):
        assert sum(x.startswith(f"peftmm: epoch {epoch}: skipped 2 of 8 train examples (empty text: 1, "
                                "image cannot be decoded: 1)") for x in lines) == 1


STOPS = {
    # vision cache: found while caching, before training
    "corrupt image, cached": ([("train", CORRUPT, "what shape?", "circle")], {},
                              "{folder}/img/8-corrupt.png: cannot decode image (UnidentifiedImageError"),
    # no cache: found by the batcher, mid-epoch
    "truncated image, batched": ([("train", TRUNCATED, "what shape?", "square")], {"cache_features": False},
                                 "{folder}/img/8-truncated.png: cannot decode image (OSError"),
    # the files source checks each record's image as it reads the file
    "missing image": ([("train", MISSING, "what shape?", "square")], {},
                      "{folder}/data.jsonl:9: image file not found: img/8-missing.png"),
}


@pytest.mark.parametrize("case", STOPS, ids=list(STOPS))
def test_stop_ends_the_run_with_one_line_naming_the_file(models, tmp_path, case):
    bad, vision, message = STOPS[case]
    rows = [("train", i, "what shape?", "circle" if i % 2 else "square") for i in range(8)] + bad + \
        [("val", 10, "what shape?", "circle"), ("test", 11, "what shape?", "square")]
    folder = tmp_path / "data"
    path = write_data(folder, rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(models, path, vision=vision, data={"on_bad_sample": "stop"})))
    result = CliRunner().invoke(main, ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: " + message.format(folder=folder)), result.output
    assert "Traceback" not in result.output
    if case != "missing image":
        assert "stopped because data.on_bad_sample is 'stop'" in errors[0]
    assert not (tmp_path / "run" / "bundle").exists()


def test_a_label_only_in_val_or_test_is_refused_with_file_line_and_known_labels(models, tmp_path):
    rows = [("train", i, "what shape?", "circle" if i % 2 else "square") for i in range(6)] + \
        [("val", 10, "what shape?", "circle"), ("test", 11, "what shape?", "triangle"),
         ("test", 12, "what shape?", "star")]
    path = write_data(tmp_path / "data", rows)
    with pytest.raises(DataError) as err:
        train(recipe_from_dict(base_recipe(models, path)), tmp_path / "run", progress=False, log=lambda _: None)
    assert str(err.value) == (
        f"{path}:8: label 'triangle' of this test record never occurs in train, so the classifier is never trained "
        "to predict it; 1 more val/test records have labels not in train; labels in train: circle, square. "
        "Give it train records (or assign splits with a 'split' column)")
    assert not (tmp_path / "run").exists()   # refused before anything is written


def test_an_empty_split_is_refused_before_training(models, tmp_path):
    path = write_data(tmp_path / "data", [("train", i, "what shape?", "circle" if i % 2 else "square")
                                          for i in range(6)] + [("val", 6, "what shape?", "circle")])
    with pytest.raises(DataError, match=r"^the test split is empty \(data.source files\)"):
        train(recipe_from_dict(base_recipe(models, path)), tmp_path / "run", progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_on_bad_sample_is_validated():
    with pytest.raises(RecipeError, match="data.on_bad_sample = 'ignore' is not allowed; choose one of: skip, stop"):
        recipe_from_dict({"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"},
                          "data": {"on_bad_sample": "ignore"}})


def test_retrieval_batches_of_text_only_records_have_their_pair_targets(models, tmp_path):
    path = write_data(tmp_path / "data", [("train", i, f"a shape {i}", None) for i in range(3)])
    recipe = base_recipe(models, path, fusion={"type": "dual-projection", "dim": 16})
    recipe["fusion"].pop("dropout")
    recipe["task"] = {"type": "retrieval"}
    model = MultimodalModel.build(recipe_from_dict(recipe), [])
    examples = [{"image": str(path.parent / f"img/{i}-{i}.png"), "text": f"a shape {i}"} for i in range(3)]
    assert torch.equal(Batcher(model)(examples)["labels"], torch.arange(3))


def test_the_feature_cache_keeps_nothing_for_an_unreadable_image(models, tmp_path):
    rows = [("train", 0, "what shape?", "circle"), ("train", CORRUPT, "what shape?", "circle")]
    path = write_data(tmp_path / "data", rows)
    model = MultimodalModel.build(recipe_from_dict(base_recipe(models, path)), ["circle"])
    good, bad = str(path.parent / "img/0-0.png"), str(path.parent / "img/1-corrupt.png")
    cache = FeatureCache(model.towers["vision"])
    with pytest.raises(DataError, match="cannot decode image"):   # no on_bad: raises, as for prediction
        cache.fill([good, bad], "cpu", progress=False)
    reported = []
    cache.fill([good, bad], "cpu", progress=False, on_bad=lambda key, error: reported.append(key))
    assert list(cache.store) == [good] and list(cache.failed) == [bad] and reported == [bad]
    cache.fill([bad], "cpu", progress=False, on_bad=lambda key, error: reported.append(key))
    assert reported == [bad]   # known bad: not decoded and reported again


def test_an_image_claiming_too_many_pixels_is_a_data_error(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 64 x 64 is over twice this: PIL refuses it
    with pytest.raises(DataError, match=r"big\.png: image over Pillow's pixel limit \(Image size \(4096 pixels\)"):
        load_image(tmp_path / "big.png")


def test_init_from_a_bundle_on_other_backbones_is_one_clear_error(models, tmp_path):
    path = write_data(tmp_path / "data", [(split, i, "what shape?", "circle" if i % 2 else "square")
                                          for i, split in enumerate(["train"] * 4 + ["val", "test"])])
    stage1 = base_recipe(models, path, text={"methods": [{"type": "lora", "r": 2}]})
    recipe = recipe_from_dict(stage1)
    save_bundle(MultimodalModel.build(recipe, ["circle", "square"]), recipe, tmp_path / "stage1")
    other = tiny.build("vit", tmp_path / "vit")
    stage2 = base_recipe(models, path, vision={"backbone": str(other)}, text={"methods": [{"type": "lora", "r": 2}]})
    stage2["init_from"] = str(tmp_path / "stage1")
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    result = CliRunner().invoke(main, ["train", str(tmp_path / "stage2.yaml"), "--output", str(tmp_path / "run"),
                                       "--no-progress"])
    assert result.exit_code == 2
    errors = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "init_from: the vision backbone" in errors[0]
    assert "belongs to other weights" in errors[0]
    assert not (tmp_path / "run").exists()
