"""Captioning bundles in the multi-adapter runtime, the server and `peftmm predict`.

Two captioning bundles (LoRA + greedy; prefix tuning + vision LoRA + beam search) and a VQA and
a retrieval bundle, all four on one tiny LlamaForCausalLM checkpoint and one tiny ViT. The
captioners load the LM with its output layer, the others as an encoder: each caption and answer
must equal what the bundle gives loaded alone, whatever else is registered.

The captions must depend on the image and on the adapter, or a wrong slot or image would go
unseen: hence a ViT (the tiny MobileNetV2 gives every 32 px image the same near-zero token),
random trainable weights at scale 1, all 17 vision tokens in the LM's input, and an LM
vocabulary cut to the tokenizer's 32 words (at tiny.py's 64, most generated ids are no word and
decode to an empty caption).
"""

import base64

import pytest
import tiny
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from helpers import build, perturb
from serving import live_server
from test_serve_browser import browser  # noqa: F401  (the headless Chromium fixture, skipped as there)

from peftmm import DataError, recipe_from_dict
from peftmm.bundle import save_bundle
from peftmm.cli import main
from peftmm.model import MultimodalModel
from peftmm.predict import Predictor
from peftmm.runtime import Runtime
from peftmm.serve import create_app

PROMPT = "what is in the image?"  # words of the tiny tokenizer's vocabulary
CAPTIONERS = ("caption-lora", "caption-prefix")
OTHERS = ("vqa-llama", "retrieval-llama")


# these bundles are seeded; leave torch's global random state as this module found it
pytestmark = pytest.mark.usefixtures("keep_torch_rng_module")


def _lm_of_the_tokenizers_size(folder):
    from transformers import LlamaForCausalLM

    tiny.build("llama_lm", folder)
    lm = LlamaForCausalLM.from_pretrained(folder)
    lm.resize_token_embeddings(len(tiny._vocab()), mean_resizing=False)
    lm.save_pretrained(folder)
    return str(folder)


def _caption_recipe(models, name, text_methods, vision_methods=(), **task):
    return {
        "name": name,
        "vision": {"backbone": models["vit"], "methods": list(vision_methods)},
        "text": {"backbone": models["llama_lm"], "methods": list(text_methods), "max_length": 12},
        "fusion": {"type": "projector"},
        "task": {"type": "captioning", "prompt": PROMPT, **task},
        "data": {"source": "easy-vqa"},
    }


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    import easy_vqa

    models = {**tiny_models, "llama_lm": _lm_of_the_tokenizers_size(tmp_path_factory.mktemp("lm") / "llama_lm")}
    root = tmp_path_factory.mktemp("adapters")
    captioners = {
        "caption-lora": _caption_recipe(models, "caption-lora", [{"type": "lora", "r": 2}], max_new_tokens=5),
        "caption-prefix": _caption_recipe(models, "caption-prefix", [{"type": "prefix", "length": 3, "reparam": False}],
                                          [{"type": "lora", "r": 2}], num_beams=3, max_new_tokens=4),
    }
    for seed, (name, data) in enumerate(captioners.items()):
        torch.manual_seed(seed)  # the initial weights too, whatever ran before
        recipe = recipe_from_dict(data)
        model = MultimodalModel.build(recipe, [])
        perturb(model, scale=1.0)
        save_bundle(model, recipe, root / name)
    vqa = tiny.recipe(models["vit"], models["llama_lm"], text_methods=[{"type": "lora", "r": 2}])
    retrieval = tiny.recipe(models["vit"], models["llama_lm"], text_methods=[{"type": "lora", "r": 2}])
    retrieval.update(task={"type": "retrieval"}, fusion={"type": "dual-projection", "dim": 16})
    for seed, (name, data) in enumerate(zip(OTHERS, (vqa, retrieval)), start=2):
        torch.manual_seed(seed)
        recipe, model, splits = build(data)
        perturb(model, scale=1.0)
        save_bundle(model, recipe, root / name)
    examples = [{"image": e["image"], "text": e["text"]} for e in splits.test[:4]]
    paths = easy_vqa.get_test_image_paths()  # image id -> file
    images = [paths[i] for i in range(6)]
    runtime = Runtime(device="cpu", root=root)
    for name in (*CAPTIONERS, *OTHERS):
        runtime.register(name)
    alone = {name: Predictor.load(root / name, device="cpu") for name in (*CAPTIONERS, *OTHERS)}
    return root, runtime, alone, images, examples


def _close(a: dict, b: dict) -> bool:
    """Same result to float noise: caption and answer exactly, scores and similarity to 1e-4."""
    if set(a) != set(b) or a.get("caption") != b.get("caption") or a.get("answer") != b.get("answer"):
        return False
    if "similarity" in a and abs(a["similarity"] - b["similarity"]) > 1e-4:
        return False
    return all(s["answer"] == t["answer"] and abs(s["score"] - t["score"]) < 1e-4
               for s, t in zip(a.get("scores", []), b.get("scores", [])))


def _strip(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "adapter"} for r in results]


def test_captions_equal_the_bundle_loaded_alone(setup):
    _, runtime, alone, images, _ = setup
    captions = {}
    for name in CAPTIONERS:
        expected = alone[name].predict_batch([{"image": i, "text": None} for i in images])
        served = runtime.predict([{"adapter": name, "image": i} for i in images])
        assert all(r["adapter"] == name for r in served)
        assert _strip(served) == expected
        assert [alone[name].predict(i) for i in images[:2]] == expected[:2]  # the CLI's path, one image each
        captions[name] = [r["caption"] for r in served]
    # Not vacuous: images get other captions, and so do the two bundles (other slots and settings).
    assert all(len(set(cs)) > 1 for cs in captions.values()), captions
    assert all(a != b for a, b in zip(captions["caption-lora"], captions["caption-prefix"])), captions


def test_each_bundle_keeps_its_own_generation_settings(setup):
    _, runtime, _, images, _ = setup
    served = runtime.predict([{"adapter": n, "image": images[0]} for n in CAPTIONERS])
    tok = runtime._adapters["caption-lora"].model.towers["text"].processor
    lengths = [len(tok(r["caption"], add_special_tokens=False)["input_ids"]) for r in served]
    assert lengths[0] <= 5 and lengths[1] <= 4
    task = runtime._adapters["caption-prefix"].model.task
    assert (task.config.num_beams, task.config.max_new_tokens) == (3, 4)


def test_a_mixed_call_answers_each_request_as_its_bundle_alone(setup):
    _, runtime, alone, images, examples = setup
    requests = []
    for i, example in enumerate(examples):
        requests.append({"adapter": CAPTIONERS[i % 2], "image": images[i]})
        requests.append({"adapter": OTHERS[i % 2], **example})
        requests.append({"adapter": "caption-lora", "image": example["image"]})
    requests.append(dict(requests[0]))  # the same image twice for one captioner: captioned once, both answered
    mixed = runtime.predict(requests)
    assert [r["adapter"] for r in mixed] == [r["adapter"] for r in requests]
    for request, result in zip(requests, mixed):
        example = {"image": request["image"], "text": request.get("text")}
        expected = alone[request["adapter"]].predict_batch([example])[0]
        assert _close({k: v for k, v in result.items() if k != "adapter"}, expected), (request, result, expected)
    assert "caption" in mixed[0] and "similarity" in mixed[4] and "answer" in mixed[1]


def test_causal_lm_and_encoder_loads_are_separate_backbones(setup):
    _, runtime, _, _, _ = setup
    text = [b for b in runtime.backbones() if b["tower"] == "text"]
    assert len({b["fingerprint"] for b in text}) == 1  # the same weights ...
    by_kind = {b["causal_lm"]: b["adapters"] for b in text}  # ... loaded twice, once per kind
    assert by_kind == {True: sorted(CAPTIONERS), False: sorted(OTHERS)}
    lm = runtime._adapters["caption-lora"].model.towers["text"]
    encoder = runtime._adapters["vqa-llama"].model.towers["text"]
    assert lm.causal_lm and not encoder.causal_lm and lm is runtime._adapters["caption-prefix"].model.towers["text"]
    assert runtime.describe("caption-lora")["question"] == "refused"
    assert runtime.describe("vqa-llama")["question"] == "required"


def _parameters(runtime) -> int:
    return sum(p.numel() for t in runtime._towers.values() for p in t.parameters())


def test_register_and_unregister_leave_other_answers_unchanged(setup):
    root, _, _, images, examples = setup
    runtime = Runtime(device="cpu", root=root)
    runtime.register("vqa-llama")
    question = [{"adapter": "vqa-llama", **examples[0]}]
    before, size = runtime.predict(question), _parameters(runtime)
    runtime.register("caption-lora")
    caption = [{"adapter": "caption-lora", "image": images[1]}]
    first = runtime.predict(caption)
    assert _close(runtime.predict(question)[0], before[0])
    runtime.register("caption-prefix")
    runtime.register("retrieval-llama")
    assert runtime.predict(caption) == first
    runtime.unregister("caption-prefix")
    runtime.unregister("retrieval-llama")
    assert runtime.predict(caption) == first and _close(runtime.predict(question)[0], before[0])
    runtime.unregister("caption-lora")  # the last user of the causal LM: it is unloaded
    assert [b["causal_lm"] for b in runtime.backbones() if b["tower"] == "text"] == [False]
    assert _parameters(runtime) == size and _close(runtime.predict(question)[0], before[0])
    runtime.unregister("vqa-llama")
    assert runtime.backbones() == []


def test_a_question_for_a_captioner_is_refused(setup):
    _, runtime, _, images, _ = setup
    with pytest.raises(DataError, match="describes the image itself"):
        runtime.predict([{"adapter": "caption-lora", "image": images[0], "text": "what shape?"}])
    blank = runtime.predict([{"adapter": "caption-lora", "image": images[0], "text": " "}])  # as no text at all
    assert blank == runtime.predict([{"adapter": "caption-lora", "image": images[0]}])


def test_the_server_returns_the_caption(setup):
    _, runtime, alone, images, examples = setup
    data = open(images[0], "rb").read()
    encoded = base64.b64encode(data).decode()
    expected = alone["caption-prefix"].predict(images[0])
    with TestClient(create_app(runtime)) as client:
        for response in (client.post("/api/predict", json={"adapter": "caption-prefix", "image_base64": encoded}),
                         client.post("/api/predict", data={"adapter": "caption-prefix", "question": ""},
                                     files={"image": ("x.png", data, "image/png")})):
            assert response.status_code == 200, response.text
            assert response.json() == {"adapter": "caption-prefix", "question": None, **expected}
        asked = client.post("/api/predict", json={"adapter": "caption-lora", "question": "what?",
                                                  "image_base64": encoded})
        assert asked.status_code == 400 and "describes the image itself" in asked.json()["error"]
        missing = client.post("/api/predict", json={"adapter": "vqa-llama", "image_base64": encoded})
        assert missing.status_code == 422 and "question: Field required" in missing.json()["error"]
        question = examples[0]["text"]
        similarity = client.post("/api/predict", json={"adapter": "retrieval-llama", "question": question,
                                                       "image_base64": encoded})
        assert similarity.status_code == 200, similarity.text
        assert _close({k: v for k, v in similarity.json().items() if k not in ("adapter", "question")},
                      alone["retrieval-llama"].predict(images[0], question))
        listed = {a["name"]: a for a in client.get("/api/adapters").json()["adapters"]}
        assert listed["caption-lora"]["question"] == "refused" and listed["caption-lora"]["task"] == "captioning"


def test_the_page_hides_the_question_and_shows_the_caption(setup, browser):
    _, runtime, alone, images, _ = setup
    expected = alone["caption-lora"].predict(images[2])["caption"]
    with live_server(create_app(runtime)) as base:
        context = browser.new_context(viewport={"width": 900, "height": 900})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(base + "/")
        page.wait_for_selector("#adapter option[value='caption-lora']", state="attached", timeout=10_000)
        page.select_option("#adapter", "vqa-llama")
        assert page.locator("#question").is_visible()
        page.select_option("#adapter", "caption-lora")
        assert page.locator("#question").is_hidden() and "captioning" in page.inner_text("#adapter-info")
        assert page.inner_text("#submit") == "Describe"
        page.set_input_files("#image", images[2])
        page.click("#submit")
        page.wait_for_selector("#result", state="visible", timeout=20_000)
        assert page.inner_text("#result-title").lower() == "caption"
        assert page.locator("#answer").text_content() == expected
        assert page.locator("#scores li").count() == 0 and page.locator("#error").is_hidden()
        context.close()
    assert not errors, errors


def test_cli_predict_prints_the_caption(setup):
    root, _, alone, images, _ = setup
    result = CliRunner().invoke(main, ["predict", str(root / "caption-lora"), "--image", images[0]])
    assert result.exit_code == 0, result.output
    assert result.output == f"image: {images[0]}\ncaption: {alone['caption-lora'].predict(images[0])['caption']}\n"
