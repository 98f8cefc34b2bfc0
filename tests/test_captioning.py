"""Captioning with a decoder LM: labels on caption tokens only, training with every method,
greedy and beam generation, exact bundle reload, metrics against reference values, bad captions,
and the CLI. Tiny LlamaForCausalLM + tiny MobileNetV2; the real zoo models run in the last tests."""

import json
import warnings

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import overfit, perturb

from peftmm import DataError, RecipeError, recipe_from_dict
from peftmm.batching import Batcher
from peftmm.bundle import load_bundle, save_bundle
from peftmm.data import DATASETS, Splits
from peftmm.fusion.projector import pool_tokens
from peftmm.model import MultimodalModel
from peftmm.tasks.captioning.metrics import caption_metrics, cider_d, words

PROMPT = "what is in the image?"  # words of the tiny tokenizer's vocabulary


def _tiny_captions() -> list[dict]:
    """easy-VQA images captioned "a <colour> <shape>" from their own question answers."""
    import easy_vqa

    texts, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    shape, colour = {}, {}
    for t, a, i in zip(texts, answers, ids):
        if t == "what shape is in the image?":
            shape[i] = a
        elif t == "what color is the shape?":
            colour[i] = a
    both = sorted(set(shape) & set(colour))[:48]
    return [{"image": paths[i], "text": f"a {colour[i]} {shape[i]}", "label": shape[i]} for i in both]


if "tiny-captions" not in DATASETS.names():
    @DATASETS.register("tiny-captions")
    def _load(spec):
        data = _tiny_captions()
        return Splits(train=data[:32], val=data[32:40], test=data[40:], labels=[])


# leave torch's global random state as this module found it: later modules' seeded
# expectations should not depend on whether these tests ran
pytestmark = pytest.mark.usefixtures("keep_torch_rng_module")


@pytest.fixture(scope="module")
def tiny_models(tiny_models, tmp_path_factory):
    """The session's tiny backbones plus a tiny LlamaForCausalLM."""
    import tiny

    return {**tiny_models, "llama_lm": str(tiny.build("llama_lm", tmp_path_factory.mktemp("lm") / "llama_lm"))}


def caption_recipe(tiny_models, methods=(), precision="fp32", **task) -> dict:
    return {
        "name": "tiny-caption",
        "vision": {"backbone": tiny_models["mobilenet_v2"]},
        "text": {"backbone": tiny_models["llama_lm"], "precision": precision, "methods": list(methods),
                 "max_length": 12},
        "fusion": {"type": "projector", "max_tokens": 4},
        "task": {"type": "captioning", "prompt": PROMPT, "max_new_tokens": 4, **task},
        "data": {"source": "tiny-captions"},
        "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "lr": 3e-2, "warmup_ratio": 0.0},
    }


def build(data: dict):
    recipe = recipe_from_dict(data)
    return recipe, MultimodalModel.build(recipe, [])


EXAMPLES = _tiny_captions()[:4]
IMAGES = [{"image": e["image"], "text": None} for e in EXAMPLES]


def test_labels_are_the_caption_tokens_and_eos_only(tiny_models):
    _, model = build(caption_recipe(tiny_models, [{"type": "lora", "r": 2}]))
    tok = model.towers["text"].processor
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    examples = [dict(EXAMPLES[0], text="a red circle"), dict(EXAMPLES[1], text="a blue triangle is present")]
    batch = Batcher(model)(examples)
    sep = tok.sep_token_id  # the tiny BERT vocabulary's end-of-sequence
    red = tok(" a red circle", add_special_tokens=False)["input_ids"] + [sep]
    assert batch["input_ids"][0].tolist() == prompt + red + [tok.pad_token_id] * 2
    assert batch["labels"][0].tolist() == red + [-100, -100]       # prompt and padding: no loss
    assert batch["attention_mask"][0].tolist() == [1] * (len(prompt) + 4) + [0, 0]
    # The returned logits are exactly the full LM's at the positions just before each caption token:
    # nothing of the vision prefix or the prompt is scored.
    perturb(model)
    model.eval()
    with torch.no_grad():
        scored = model(batch)
        lm = model.towers["text"].model
        embeds, mask, _ = model.task._inputs(model, lm, batch, batch["input_ids"], batch["attention_mask"])
        full = lm(inputs_embeds=embeds, attention_mask=mask).logits
    first = embeds.shape[1] - batch["labels"].shape[1] - 1  # the last prompt position
    assert scored.shape[:2] == batch["labels"].shape
    assert torch.allclose(scored, full[:, first: first + batch["labels"].shape[1]], atol=1e-5)


@pytest.mark.parametrize("methods", [[{"type": "lora", "r": 4}], [{"type": "prefix", "length": 4}],
                                     [{"type": "adapter"}], []], ids=["lora", "prefix", "adapter", "projector-only"])
def test_overfitting_one_batch_lowers_the_loss(tiny_models, methods):
    torch.manual_seed(0)
    _, model = build(caption_recipe(tiny_models, methods))
    batch = Batcher(model)(_tiny_captions()[:8])
    losses = overfit(model, batch, steps=20, lr=1e-2)
    # measured: about 0.25 of the first loss with a method in the LM, 0.55 with the projector alone
    assert losses[-1] < (0.5 if methods else 0.8) * losses[0], losses
    if methods:  # the LM's own modules trained, not just the projector
        assert any(p.requires_grad for p in model.towers["text"].model.parameters())


def test_greedy_and_beam_generation_give_strings(tiny_models):
    _, model = build(caption_recipe(tiny_models, [{"type": "lora", "r": 2}]))
    perturb(model)
    model.eval()
    batch = Batcher(model)(IMAGES)
    greedy = model.task.decode(model(batch))
    model.task.config.num_beams = 3
    beam = model.task.decode(model(batch))
    for out in (greedy, beam):
        assert len(out) == len(IMAGES) and all(isinstance(o["caption"], str) for o in out)
    lm = model.towers["text"].model  # greedy is what the LM's own argmax continues with
    with torch.no_grad():
        embeds, mask, _ = model.task._inputs(model, lm, batch, batch["input_ids"], batch["attention_mask"])
        first = lm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].argmax(-1)
    model.task.config.num_beams = 1
    assert torch.equal(model(batch)[:, 0], first)


@pytest.mark.parametrize("methods", [[{"type": "lora", "r": 2}], [{"type": "prefix", "length": 3}]],
                         ids=["lora", "prefix"])
def test_bundle_reload_gives_identical_captions(tiny_models, tmp_path, methods):
    recipe, model = build(caption_recipe(tiny_models, methods, num_beams=2))
    perturb(model)
    model.eval()
    path = save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, config = load_bundle(path)
    assert config["task"] == "captioning" and reloaded.towers["text"].causal_lm
    assert torch.equal(reloaded(Batcher(reloaded)(IMAGES)), model(Batcher(model)(IMAGES)))
    batch = Batcher(model)(EXAMPLES)
    with torch.no_grad():
        assert torch.allclose(reloaded(Batcher(reloaded)(EXAMPLES)), model(batch), atol=1e-5)
    assert "image-to-text" in (path / "README.md").read_text()


@pytest.mark.parametrize("precision", ["int8", "nf4", "bf16"])
def test_quantised_and_bf16_lms_train_and_generate(tiny_models, precision):
    _, model = build(caption_recipe(tiny_models, [{"type": "lora", "r": 2}], precision=precision))
    batch = Batcher(model)(EXAMPLES)
    losses = overfit(model, batch, steps=3, lr=3e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    assert all(isinstance(o["caption"], str) for o in model.task.decode(model(Batcher(model)(IMAGES))))


def test_empty_and_long_captions_are_counted_not_fatal(tiny_models):
    _, model = build(caption_recipe(tiny_models, [{"type": "lora", "r": 2}]))
    examples = [dict(EXAMPLES[0], text="  "), dict(EXAMPLES[1], text="a red circle " * 5), EXAMPLES[2]]
    with pytest.warns(UserWarning, match="empty caption") as caught:
        batch = Batcher(model)(examples)
    assert any("cut there" in str(w.message) for w in caught)
    assert (batch["labels"][0] == -100).all() and batch["input_ids"].shape[1] == 12  # text.max_length
    loss = model.task.loss(model(batch), batch["labels"])
    assert torch.isfinite(loss)
    only_empty = Batcher(model)([dict(EXAMPLES[0], text="")])
    assert model.task.loss(model(only_empty), only_empty["labels"]).item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = model.task.evaluate(model, examples, Batcher(model), 2, "cpu")
    assert result["skipped_empty"] == 1 and result["truncated"] == 1 and result["images"] == 2


def test_a_prompt_longer_than_max_length_is_a_clear_error(tiny_models):
    _, model = build(caption_recipe(tiny_models, prompt=" ".join([PROMPT] * 3)))
    with pytest.raises(DataError, match="leaves no room for a caption; raise text.max_length"):
        Batcher(model)(EXAMPLES)


def test_captioning_needs_the_projector(tiny_models):
    data = caption_recipe(tiny_models)
    data["fusion"] = {"type": "concat-mlp"}
    with pytest.raises(RecipeError, match="cannot serve task 'captioning'; use projector"):
        recipe_from_dict(data)


def test_projector_pools_tokens_under_their_mask():
    tokens = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    mask = torch.tensor([[True, True, True, True, False, False]])
    pooled, pooled_mask = pool_tokens(tokens, mask, 3)
    assert pooled_mask.tolist() == [[True, True, False]]
    assert pooled[0, :2].tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert pool_tokens(tokens, mask, 8)[0] is tokens


def test_metrics_on_known_inputs():
    refs = [["grinning face"], ["red heart", "heart"], ["face with tears of joy"], ["flag united kingdom"],
            ["smiling face with smiling eyes"], ["dog face"], ["man"], ["thumbs up"]]
    same = caption_metrics([r[0] for r in refs], refs)
    assert same["exact_match"] == 1.0 and same["unigram_f1"] == 1.0 and same["bleu4"] == pytest.approx(1.0)
    hyps = ["Grinning face!", "red heart", "cat face with tears of joy", "flag united states", "smiling face",
            "dog", "a", "thumbs up sign"]
    # CIDEr-D per example from the COCO caption toolkit's CiderScorer on the same captions
    toolkit = [5.0, 3.3716921748800703, 8.496951038583052, 2.916666666666667, 3.0634153313545536,
               2.3389955501837667, 0.0, 3.7564711970301365]
    mine = cider_d([words(h) for h in hyps], [[words(r) for r in rs] for rs in refs])
    assert mine == pytest.approx(toolkit, abs=1e-9)
    scores = caption_metrics(hyps, refs)
    assert scores["exact_match"] == 0.25 and scores["cider_d"] == pytest.approx(sum(toolkit) / 8)
    assert scores["bleu4"] == pytest.approx(0.6051012507653831, rel=1e-8)  # the toolkit's BleuScorer
    longer = [r[0] for r in refs][:3] + ["smiling face with smiling"]
    assert caption_metrics(longer, refs[:4])["bleu4"] == pytest.approx(0.6554913609413059, rel=1e-8)
    # unigram F1: 1, 1, 10/11, 2/3, 4/7, 2/3, 0, 4/5 (precision and recall over words)
    assert scores["unigram_f1"] == pytest.approx((2 + 10 / 11 + 2 / 3 + 4 / 7 + 2 / 3 + 4 / 5) / 8)
    assert caption_metrics(["", ""], [["a cat"], ["a dog"]]) == {"exact_match": 0.0, "bleu4": 0.0,
                                                                 "cider_d": 0.0, "unigram_f1": 0.0}


def test_train_eval_and_predict_from_the_cli(tiny_models, tmp_path):
    import easy_vqa

    from peftmm.cli import main

    recipe = tmp_path / "caption.yaml"
    recipe.write_text(yaml.safe_dump(caption_recipe(tiny_models, [{"type": "lora", "r": 2}])))
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    for key in ("test_exact_match", "test_bleu4", "test_cider_d", "test_unigram_f1", "val_cider_d"):
        assert isinstance(summary[key], float), key
    assert summary["test_images"] == 8 and summary["test_skipped_empty"] == 0
    evaluated = runner.invoke(main, ["eval", str(tmp_path / "run"), "--split", "test"])
    assert evaluated.exit_code == 0, evaluated.output
    measured = json.loads(evaluated.output[evaluated.output.index("{"):])
    assert measured["cider_d"] == pytest.approx(summary["test_cider_d"])
    image = easy_vqa.get_test_image_paths()[0]
    predicted = runner.invoke(main, ["predict", str(tmp_path / "run"), "--image", image])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.startswith(f"image: {image}\ncaption: ")


# -- the real zoo models ------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_zoo_model_completes_a_fact():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftmm import zoo

    folder = zoo.resolve("smollm2-135m")
    tok, lm = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]) == " Paris."
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)


@pytest.mark.integration
def test_captioning_on_smollm2_and_mobilenet(tmp_path):
    import easy_vqa

    data = {"name": "zoo-caption", "vision": {"backbone": "mobilenet-v2", "precision": "int8"},
            "text": {"backbone": "smollm2-135m", "precision": "int8", "max_length": 16,
                     "methods": [{"type": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}]},
            "fusion": {"type": "projector", "max_tokens": 8},
            "task": {"type": "captioning", "prompt": "Describe the image:", "max_new_tokens": 6},
            "data": {"source": "easy-vqa"}}
    recipe, model = build(data)
    assert model.towers["text"].info.hidden_size == 576 and model.fusion.out_dim == 576
    paths = [easy_vqa.get_train_image_paths()[i] for i in (0, 1)]
    batch = Batcher(model)([{"image": p, "text": "a red circle"} for p in paths])
    losses = overfit(model, batch, steps=3, lr=1e-4)
    assert losses[-1] < losses[0]
    model.eval()
    captions = model.task.decode(model(Batcher(model)([{"image": p, "text": None} for p in paths])))
    assert all(isinstance(c["caption"], str) for c in captions)
    path = save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, _ = load_bundle(path)
    assert reloaded.task.decode(reloaded(Batcher(reloaded)([{"image": paths[0], "text": None}]))) == captions[:1]
