"""Retrieval-augmented captioning (task.retrieved_captions): the caption memory is built from the
training split, an example never reads its own caption, the LM reads the neighbours' words, the
memory travels in the bundle (not counted as trainable), and the CLI trains and predicts with it.
Tiny LlamaForCausalLM + tiny ViT (the tiny MobileNetV2's outputs are ~1e-26: no similarity to
rank by), the tiny-captions data of test_captioning."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import overfit, perturb
from safetensors.torch import save as save_tensors
from test_captioning import caption_recipe, tiny_models  # noqa: F401  (the module's fixture)

from peftmm import DataError, RecipeError, recipe_from_dict
from peftmm.batching import Batcher
from peftmm.bundle import BundleError, bundle_summary, load_bundle, read_tensors, save_bundle
from peftmm.data import load_splits
from peftmm.fusion import masked_mean
from peftmm.model import MultimodalModel
from peftmm.tasks.captioning.memory import key_hash


def _recipe(tiny_models, methods=({"type": "lora", "r": 2},), **task) -> dict:
    data = caption_recipe(tiny_models, list(methods), **task)
    data["vision"]["backbone"] = tiny_models["vit"]
    return data


def _build(tiny_models, k=2, **task):
    # words of the tiny vocabulary; its tokenizer knows no ";", which reads as [UNK]
    data = _recipe(tiny_models, retrieved_captions=k, retrieved_prefix="in the image", **task)
    recipe = recipe_from_dict(data)
    splits = load_splits(recipe.data)
    model = MultimodalModel.build(recipe, [])
    model.task.prepare(model, splits.train, Batcher(model), "cpu")
    return recipe, model, splits


def _context_words(model, batch) -> list[str]:
    """What the LM reads between the vision tokens and the prompt, per example, as text."""
    task = model.task
    vision, mask = model.encode("vision", batch)
    ids, attended, _ = task._retrieved(masked_mean(vision, mask)[batch["image_index"]], batch.get("exclude_hash"))
    return [task.tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(ids, attended)]


def test_memory_holds_each_training_caption_once_with_its_image_feature(tiny_models):
    _, model, splits = _build(tiny_models)
    memory = model.task.memory
    captions = list(dict.fromkeys((e["image"], e["text"]) for e in splits.train))
    assert len(memory) == len(captions)
    assert memory.keys.dtype == torch.float16 and torch.allclose(memory.keys.float().norm(dim=-1),
                                                                 torch.ones(len(memory)), atol=1e-2)
    tok = model.towers["text"].processor
    first = tok(" " + captions[0][1], add_special_tokens=False)["input_ids"]
    assert memory.captions_ids(0) == first
    # an image's own entry is its nearest one, unless its caption is excluded
    batch = Batcher(model)([splits.train[0]])
    vision, mask = model.encode("vision", batch)
    pooled = masked_mean(vision, mask)
    assert memory.nearest(pooled, 1).item() == 0
    assert memory.nearest(pooled, 1, torch.tensor([key_hash(captions[0][1])])).item() != 0


def test_unreadable_and_uncaptioned_examples_stay_out_of_the_memory(tiny_models, tmp_path):
    _, model, splits = _build(tiny_models)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    extra = [{"image": str(broken), "text": "a broken image", "label": "circle"},
             {"image": splits.val[0]["image"], "text": "", "label": "circle"}]
    model.task.prepare(model, splits.train + extra, Batcher(model), "cpu")
    assert len(model.task.memory) == len(splits.train)


def test_an_example_never_reads_its_own_caption_and_prediction_reads_neighbours(tiny_models):
    _, model, splits = _build(tiny_models, k=3)
    model.eval()
    examples = splits.train[:6]
    with torch.no_grad():
        contexts = _context_words(model, Batcher(model)(examples))
        for example, context in zip(examples, contexts):
            assert context.startswith("in the image ")
            items = [item.strip() for item in context[len("in the image "):].split("[UNK]")]
            assert len(items) == 3 and example["text"] not in items
        # without a caption to exclude (prediction), an image of the training split finds its own first
        contexts = _context_words(model, Batcher(model)([{"image": examples[0]["image"], "text": None}]))
    assert examples[0]["text"] in contexts[0]


def test_retrieved_exclude_keeps_an_examples_whole_group_out(tiny_models):
    """retrieved_exclude: label (the shape here, as family is for emoji): a circle's context holds
    no circle at all, while without it other circles are its nearest entries."""
    _, model, splits = _build(tiny_models, k=3, retrieved_exclude="label")
    model.eval()
    examples = splits.train[:8]
    with torch.no_grad():
        contexts = _context_words(model, Batcher(model)(examples))
    for example, context in zip(examples, contexts):
        assert example["label"] not in context, (example, context)
    _, model, _ = _build(tiny_models, k=3)
    model.eval()
    with torch.no_grad():
        contexts = _context_words(model, Batcher(model)(examples))
    assert any(e["label"] in c for e, c in zip(examples, contexts))
    with pytest.raises(DataError, match="retrieved_exclude = 'family': the examples have no such field"):
        _build(tiny_models, k=3, retrieved_exclude="family")


def test_training_with_retrieved_captions_lowers_the_loss(tiny_models):
    torch.manual_seed(0)
    _, model, splits = _build(tiny_models)
    batch = Batcher(model)(splits.train[:8])
    losses = overfit(model, batch, steps=20, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_bundle_carries_the_memory_and_captions_identically(tiny_models, tmp_path):
    recipe, model, splits = _build(tiny_models)
    perturb(model)
    model.eval()
    path = save_bundle(model, recipe, tmp_path / "bundle")
    tensors = read_tensors(path)
    assert {"memory.keys", "memory.ids", "memory.hashes"} <= set(tensors)
    summary = bundle_summary(path)
    trainable, _ = model.parameter_counts()
    assert summary["trainable_params"] == trainable      # the memory is not counted as trained
    assert summary["memory_values"] == sum(tensors[k].numel() for k in tensors if k.startswith("memory."))
    assert "caption memory" in (path / "README.md").read_text()
    reloaded, _, _ = load_bundle(path)
    images = [{"image": e["image"], "text": None} for e in splits.test[:4]]
    assert torch.equal(reloaded(Batcher(reloaded)(images)), model(Batcher(model)(images)))
    # the multi-adapter runtime captions with the memory too, as the bundle loaded alone does
    from peftmm.predict import Predictor
    from peftmm.runtime import Runtime

    runtime = Runtime(device="cpu", root=tmp_path)
    runtime.register("bundle")
    served = runtime.predict([{"adapter": "bundle", "image": e["image"]} for e in images])
    expected = Predictor.load(path, device="cpu").predict_batch(images)
    assert [{k: v for k, v in r.items() if k != "adapter"} for r in served] == expected

    del tensors["memory.ids"]                            # a bundle without its memory is refused
    (path / "adapter_model.safetensors").write_bytes(save_tensors(tensors, metadata=_metadata(path)))
    with pytest.raises(BundleError, match="memory.ids"):
        load_bundle(path)


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return f.metadata()


def test_retrieved_captions_need_a_frozen_vision_tower(tiny_models):
    data = _recipe(tiny_models, retrieved_captions=2)
    data["vision"]["methods"] = [{"type": "adapter"}]
    with pytest.raises(RecipeError, match="retrieved_captions needs a frozen vision tower"):
        recipe_from_dict(data)


def test_train_and_predict_from_the_cli(tiny_models, tmp_path):
    import easy_vqa

    from peftmm.cli import main

    recipe = tmp_path / "caption.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_models, retrieved_captions=2)))
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["test_images"] == 8 and isinstance(summary["test_unigram_f1"], float)
    image = easy_vqa.get_test_image_paths()[0]
    predicted = runner.invoke(main, ["predict", str(tmp_path / "run"), "--image", image])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.startswith(f"image: {image}\ncaption: ")


def test_plan_counts_the_retrieved_context(tiny_models):
    """peftmm plan builds no memory from data: a shape-only one of the longest context stands in,
    so a training step with retrieved captions is planned larger than without."""
    from peftmm.plan import Planner

    steps = {}
    for k in (0, 3):
        estimate = Planner(recipe_from_dict(_recipe(tiny_models, retrieved_captions=k))).estimate(device="cpu")
        steps[k] = estimate.details["phases"]["a training step"]
    assert steps[3] > steps[0]


@pytest.mark.integration
def test_retrieved_captions_on_smollm2_and_mobilenet(tmp_path):
    """The real zoo models: the memory keys are MobileNetV2's pooled int8 features, the retrieved
    names are read by SmolLM2; training lowers the loss and the bundle captions the same."""
    from test_captioning import _tiny_captions

    data = {"name": "zoo-caption-retrieved", "vision": {"backbone": "mobilenet-v2", "precision": "int8"},
            "text": {"backbone": "smollm2-135m", "precision": "int8", "max_length": 16,
                     "methods": [{"type": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}]},
            "fusion": {"type": "projector", "max_tokens": 8},
            "task": {"type": "captioning", "prompt": "Describe the image:", "max_new_tokens": 6,
                     "retrieved_captions": 2},
            "data": {"source": "easy-vqa"}}
    recipe = recipe_from_dict(data)
    model = MultimodalModel.build(recipe, [])
    train = _tiny_captions()[:12]
    model.task.prepare(model, train, Batcher(model), "cpu")
    assert len(model.task.memory) == 12
    batch = Batcher(model)(train[:2])
    losses = overfit(model, batch, steps=3, lr=1e-4)
    assert losses[-1] < losses[0]
    model.eval()
    images = [{"image": e["image"], "text": None} for e in train[:2]]
    captions = model.task.decode(model(Batcher(model)(images)))
    path = save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, _ = load_bundle(path)
    assert reloaded.task.decode(reloaded(Batcher(reloaded)(images))) == captions
