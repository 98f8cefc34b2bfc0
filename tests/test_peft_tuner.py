"""{type: peft}: any injectable peft tuner as a method. (IA)3 end to end on both towers (training,
bundle, merging, the multi-adapter runtime), LoHa and LoKr through bundles, and refusals by name."""

import pytest
import tiny
import torch
from helpers import batch_of, build, logits, overfit, perturb
from serving import make_bundle

from peftmm import PeftmmError, RecipeError, recipe_from_dict
from peftmm.bundle import load_bundle, read_config, save_bundle
from peftmm.predict import Predictor
from peftmm.runtime import Runtime

pytestmark = pytest.mark.usefixtures("keep_torch_rng")

FEEDFORWARD = r".*layer\.\d\.output\.dense"
IA3 = dict(vision_methods=[{"type": "peft", "tuner": "ia3", "targets": ["expand_1x1.convolution"]}],
           text_methods=[{"type": "peft", "tuner": "IA3", "targets": ["key", "value", FEEDFORWARD],
                          "options": {"feedforward_modules": [FEEDFORWARD]}}])


def _recipe(tiny_models, **methods):
    return tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], **methods)


def test_ia3_trains_saves_and_merges_on_both_towers(tiny_models, tmp_path):
    torch.manual_seed(0)
    recipe, model, splits = build(_recipe(tiny_models, **IA3))
    state = model.trainable_state_dict()
    vision = sorted(k for k in state if k.startswith("vision."))
    assert vision and all(k.endswith("expand_1x1.convolution.ia3_l.default") for k in vision)
    text = {k.rsplit(".ia3_l", 1)[0]: tuple(v.shape) for k, v in state.items() if k.startswith("text.")}
    # IA3 scales a feedforward layer's input and any other layer's output
    assert text["text.encoder.layer.0.output.dense"] == (1, 64)
    assert text["text.encoder.layer.0.attention.self.key"] == (32, 1)
    assert len(text) == 6
    assert all(v.requires_grad for n, v in model.named_parameters() if "ia3_l" in n)

    batch = batch_of(model, splits.train[:16])
    losses = overfit(model, batch, steps=10)
    assert losses[-1] < 0.7 * losses[0], losses
    perturb(model)  # (IA)3 starts at ones: make both towers' vectors differ from any fresh start
    before = logits(model, batch)
    bundle = save_bundle(model, recipe, tmp_path / "ia3")
    saved = read_config(bundle)["recipe"]["text"]["methods"][0]
    assert saved["tuner"] == "IA3" and saved["options"] == {"feedforward_modules": [FEEDFORWARD]}

    reloaded, _, _ = load_bundle(bundle)
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-6)
    assert reloaded.merge_methods() == ["vision.peft", "text.peft"]
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-5)


@pytest.mark.parametrize("methods", [
    dict(text_methods=[{"type": "peft", "tuner": "loha", "options": {"r": 4, "alpha": 4}}]),
    dict(vision_methods=[{"type": "peft", "tuner": "lokr", "targets": ["expand_1x1.convolution"],
                          "options": {"r": 2}}]),
    dict(text_methods=[{"type": "peft", "tuner": "lokr", "targets": ["query"]}, {"type": "lora", "r": 2}]),
], ids=["loha-text", "lokr-conv", "lokr-beside-lora"])
def test_lycoris_tuners_round_trip_through_bundles(tiny_models, tmp_path, methods):
    torch.manual_seed(1)
    recipe, model, splits = build(_recipe(tiny_models, **methods))
    batch = batch_of(model, splits.train[:16])
    losses = overfit(model, batch, steps=6)
    assert losses[-1] < losses[0]
    perturb(model)
    before = logits(model, batch)
    reloaded, _, _ = load_bundle(save_bundle(model, recipe, tmp_path / "b"))
    assert set(reloaded.trainable_state_dict()) == set(model.trainable_state_dict())
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-6)
    reloaded.merge_methods()
    assert torch.allclose(logits(reloaded, batch), before, atol=1e-4)


def test_runtime_serves_ia3_beside_lora_on_shared_towers(tiny_models, tmp_path):
    make_bundle(tiny_models, tmp_path, "ia3", 3, **{k: [dict(m) for m in v] for k, v in IA3.items()})
    _, splits = make_bundle(tiny_models, tmp_path, "lora", 4, text_methods=[{"type": "lora", "r": 2}])
    examples = [{"image": e["image"], "text": e["text"]} for e in splits.test[:6]]
    runtime = Runtime(device="cpu", root=tmp_path)
    runtime.register("ia3")
    runtime.register("lora")
    assert len(runtime.backbones()) == 2  # one vision and one text tower for both
    mixed = runtime.predict([{"adapter": ("ia3", "lora")[i % 2], **e} for i, e in enumerate(examples)])
    for name in ("ia3", "lora", "ia3"):  # switching back and forth
        alone = Predictor.load(tmp_path / name, device="cpu").predict_batch(examples)
        served = runtime.predict([{"adapter": name, **e} for e in examples])
        assert [r["answer"] for r in served] == [r["answer"] for r in alone]
        assert all(abs(s["score"] - t["score"]) < 1e-5 for x, y in zip(served, alone)
                   for s, t in zip(x["scores"], y["scores"]))
        assert all(m["scores"] == s["scores"]
                   for i, (m, s) in enumerate(zip(mixed, served)) if ("ia3", "lora")[i % 2] == name)
    text = runtime._adapters["lora"].model.towers["text"]
    runtime.unregister("ia3")
    assert not [n for n, _ in text.model.named_parameters() if "ia3_" in n]


@pytest.mark.parametrize("method,message", [
    ({"tuner": "ia4"}, "tuner = 'ia4' is not a peft tuner (did you mean 'IA3'?); choose one of: "),
    ({"tuner": "prefix_tuning"}, "tuner = 'prefix_tuning' cannot be used: it is prompt learning"),
    ({"tuner": "vera"}, "tuner = 'vera' cannot be used: it keeps state shared by all layers"),
    ({"tuner": "lora"}, "tuner = 'lora' cannot be used: it is LoRA: use {type: lora}"),
    ({"tuner": "ia3", "options": {"feedforward_modulez": ["x"]}},
     "options.feedforward_modulez is not an option of peft's IA3Config (did you mean 'feedforward_modules'?); "
     "valid options: fan_in_fan_out, feedforward_modules, init_ia3_weights"),
    ({"tuner": "ia3", "options": {"target_modules": ["key"]}}, "peftmm sets target_modules itself (use targets)"),
    ({"tuner": "loha", "options": {"r": "four"}}, "'text.methods.0': options.r must be an integer, got 'four'"),
    ({}, "missing required key 'text.methods.0.tuner'"),
])
def test_recipe_refusals(tiny_models, method, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(_recipe(tiny_models, text_methods=[{"type": "peft", **method}]))
    assert message in str(error.value)


@pytest.mark.parametrize("precision,method,message", [
    ("nf4", {"tuner": "loha"}, "text.methods peft (LOHA): peft cannot apply LOHA to these targets at precision "
                               "nf4 (layer types: Linear4bit)"),
    ("fp32", {"tuner": "ia3", "targets": ["key"], "options": {"feedforward_modules": ["value"]}},
     "text.methods peft (IA3) options.feedforward_modules: encoder.layer.0.attention.self.value is not among"),
    ("fp32", {"tuner": "ia3", "targets": ["nothing"]}, "text tower targets: 'nothing' matches no module of bert"),
])
def test_model_build_refusals(tiny_models, precision, method, message):
    data = _recipe(tiny_models, text_methods=[{"type": "peft", **method}])
    data["text"]["precision"] = precision
    with pytest.raises(PeftmmError) as error:
        build(data)
    assert message in str(error.value)
