"""Retrieval (dual projection + InfoNCE), zero-shot labels, and classification with a fixed prompt
(the image alone) or without one (image and text)."""

import json

import pytest
import tiny
import torch
from click.testing import CliRunner
from helpers import batch_of, build, logits, overfit

from peftmm import RecipeError, recipe_from_dict
from peftmm.bundle import save_bundle
from peftmm.cli import main
from peftmm.predict import Predictor
from peftmm.tasks.labels import macro_f1
from peftmm.tasks.retrieval import RetrievalTask, split_embeddings


def _retrieval(tiny_models, **methods):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], **methods)
    data["task"] = {"type": "retrieval"}
    data["fusion"] = {"type": "dual-projection", "dim": 16}
    return data


def test_recall_counts_rank_of_the_positive():
    task = RetrievalTask(RetrievalTask.Config(), [])
    eye = torch.eye(4)
    assert task.metrics(torch.cat([eye, eye], 1), None)["i2t_r1"] == 1.0
    texts = eye[[1, 0, 2, 3]]  # images 0 and 1 swapped their texts: each ranks its own second
    metrics = task.metrics(torch.cat([eye, texts], 1), None)
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 0.5 and metrics["i2t_r5"] == 1.0


def test_infonce_trains_and_reloads_exactly(tiny_models, tmp_path):
    torch.manual_seed(0)  # the projections' initialisation, whatever ran before
    data = _retrieval(tiny_models, text_methods=[{"type": "lora", "r": 2}])
    recipe, model, splits = build(data)
    examples = []  # distinct images and distinct texts: one positive per row and column
    for e in splits.train:
        if all(e["image"] != x["image"] and e["text"] != x["text"] for x in examples):
            examples.append(e)
    examples = examples[:8]
    batch = batch_of(model, examples)
    assert torch.equal(batch["labels"], torch.arange(8))
    scale_before = model.head.scale().item()
    losses = overfit(model, batch, steps=30)
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.head.scale().item() != scale_before  # the temperature trains
    images, texts = split_embeddings(logits(model, batch))
    assert torch.allclose(images.norm(dim=-1), torch.full((8,), model.head.scale().sqrt().item()), atol=1e-4)
    save_bundle(model, recipe, tmp_path / "bundle")
    predictor = Predictor.load(tmp_path / "bundle", device="cpu")
    assert torch.equal(logits(predictor.model, batch_of(predictor.model, examples)), logits(model, batch))


def test_locked_text_side_keeps_the_text_towers_space(tiny_models, tmp_path):
    """text_projection: false: texts embed as the frozen text tower's own pooled output; only the
    image side (and the temperature) trains, into that space."""
    torch.manual_seed(0)
    data = _retrieval(tiny_models)
    data["fusion"]["text_projection"] = False
    recipe, model, splits = build(data)
    assert not any(name.startswith("fusion.text_proj") for name, p in model.named_parameters() if p.requires_grad)
    examples = []
    for e in splits.train:
        if all(e["image"] != x["image"] and e["text"] != x["text"] for x in examples):
            examples.append(e)
    batch = batch_of(model, examples[:8])
    images_before, texts_before = split_embeddings(logits(model, batch))
    assert images_before.shape[-1] == model.towers["text"].info.hidden_size   # images land in the text space
    losses = overfit(model, batch, steps=30)
    assert losses[-1] < 0.7 * losses[0], losses
    images_after, texts_after = split_embeddings(logits(model, batch))
    normalised = torch.nn.functional.normalize
    assert torch.allclose(normalised(texts_after, dim=-1), normalised(texts_before, dim=-1), atol=1e-6)
    assert not torch.allclose(normalised(images_after, dim=-1), normalised(images_before, dim=-1), atol=1e-3)
    save_bundle(model, recipe, tmp_path / "bundle")
    predictor = Predictor.load(tmp_path / "bundle", device="cpu")
    assert torch.equal(logits(predictor.model, batch_of(predictor.model, examples[:8])), logits(model, batch))


def test_retrieval_needs_dual_projection(tiny_models):
    data = _retrieval(tiny_models)
    data["fusion"] = {"type": "gated-cross-attention", "dim": 32, "heads": 2}
    with pytest.raises(RecipeError, match="cannot serve task 'retrieval'; use dual-projection"):
        recipe_from_dict(data)


def test_zero_shot_labels_from_a_retrieval_bundle(tiny_models, tmp_path):
    recipe, model, splits = build(_retrieval(tiny_models))
    save_bundle(model, recipe, tmp_path / "bundle")
    image = splits.test[0]["image"]
    result = Predictor.load(tmp_path / "bundle", device="cpu").classify(image, ["circle", "triangle", "square"],
                                                                        "a {} shape")
    assert sorted(s["answer"] for s in result["scores"]) == ["circle", "square", "triangle"]
    assert abs(sum(s["score"] for s in result["scores"]) - 1) < 1e-4
    assert result["answer"] == result["scores"][0]["answer"]
    out = CliRunner().invoke(main, ["predict", str(tmp_path / "bundle"), "--image", image,
                                    "--labels", "circle,triangle", "--template", "a {} shape"])
    assert out.exit_code == 0 and "answer: " in out.output, out.output
    vqa = CliRunner().invoke(main, ["predict", str(tmp_path / "bundle"), "--image", image, "--labels", "one"])
    assert vqa.exit_code == 2 and "at least two labels" in vqa.output


def test_classification_reads_a_fixed_prompt(tiny_models):
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"])
    data["task"] = {"type": "classification", "hidden": 16, "prompt": "which shape?"}
    _, model, splits = build(data)
    batch = batch_of(model, splits.train[:8])
    assert batch["input_ids"].shape[0] == 1  # one distinct text: the prompt
    assert model.task.text_of(splits.train[0]) == "which shape?"


def test_classification_without_prompt_reads_image_and_text(tiny_models):
    """Image-text classification (recipes/emoji-group-image-text.yaml): each example's own text
    reaches the fusion, so the same image with another text gets other logits, and it learns."""
    torch.manual_seed(0)
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"])
    data["task"] = {"type": "classification", "hidden": 16}
    _, model, splits = build(data)
    examples = splits.train[:8]
    assert model.task.text_of(examples[0]) == examples[0]["text"]
    batch = batch_of(model, examples)
    texts = {e["text"] for e in examples}
    assert len(texts) > 1 and batch["input_ids"].shape[0] == len(texts)
    other = [dict(e, text=e["text"] + " again") for e in examples]
    assert not torch.allclose(logits(model, batch), logits(model, batch_of(model, other)))
    losses = overfit(model, batch, steps=12)
    assert losses[-1] < 0.5 * losses[0]


def test_predict_reads_the_text_of_an_image_text_classifier(tiny_models, tmp_path):
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"])
    data["task"] = {"type": "classification", "hidden": 16}
    recipe, model, splits = build(data)
    save_bundle(model, recipe, tmp_path / "bundle")
    example = splits.test[0]
    expected = Predictor.load(tmp_path / "bundle", device="cpu").predict(example["image"], example["text"])
    args = ["predict", str(tmp_path / "bundle"), "--image", example["image"]]
    out = CliRunner().invoke(main, args + ["--text", example["text"], "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["answer"] == expected["answer"] and json.loads(out.output)["text"] == example["text"]
    missing = CliRunner().invoke(main, args)
    assert missing.exit_code != 0 and "needs the text read with the image (--text)" in missing.output
    both = CliRunner().invoke(main, args + ["--text", "a", "--question", "b"])
    assert both.exit_code == 2 and "give one" in both.output


def test_macro_f1_known_values():
    predicted, targets = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    # class 0: tp1 fp1 -> 2/3; class 1: tp1 fn1 -> 2/3; class 2: 1
    assert abs(macro_f1(predicted, targets, 3) - (2 / 3 + 2 / 3 + 1) / 3) < 1e-9
