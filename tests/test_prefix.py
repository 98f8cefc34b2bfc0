"""Prefix tuning: masks stay right (padding, causality), every attention family trains and
round-trips exactly, the MLP re-parameterisation is folded on save, and bad recipes are refused."""

import pytest
import tiny
import torch
from helpers import batch_of, build, logits, overfit
from safetensors.torch import load_file
from torch import nn

from peftmm import PeftmmError, RecipeError
from peftmm.bundle import WEIGHTS, load_bundle, read_config, save_bundle
from peftmm.methods.base import ActiveSlots
from peftmm.methods.prefix import PrefixKV, prefix_attention

TEXTS = ["what color is the shape ?", "is there a blue circle in the image ?"]


def _text_tower(tiny_models, text, **settings):
    _, model, _ = build(tiny.recipe(tiny_models["vit"], tiny_models[text],
                                    text_methods=[{"type": "prefix", "length": 4, **settings}]))
    return model.towers["text"]


@torch.no_grad()
def _encode(tower, texts):
    inputs = tower.processor(texts, padding=True, return_tensors="pt")
    hidden, _ = tower(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return hidden, inputs["attention_mask"]


def _without_prefix(tower, run):
    """Run with plain sdpa, which ignores the prefixes: the frozen backbone's own output."""
    tower.model.set_attn_implementation("sdpa")
    try:
        return run()
    finally:
        tower.model.set_attn_implementation("peftmm_prefix")


def _prefix_params(model):
    return {n: p for n, p in model.named_parameters() if "peftmm_prefix" in n}


# -- the attention function itself -------------------------------------------------------------

def _reference(query, key, value, prefix, keep):
    """Plain softmax attention over [prefix; keys], the prefix columns always visible."""
    pk, pv = (t.expand(query.shape[0], -1, -1, -1) for t in prefix())
    scores = query @ torch.cat([pk, key], 2).transpose(-1, -2) * query.shape[-1] ** -0.5
    visible = torch.cat([keep.new_ones(*keep.shape[:-1], pk.shape[2]), keep], -1)
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ torch.cat([pv, value], 2)
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_a_reference_for_every_mask_form(causal):
    torch.manual_seed(0)
    module = nn.Module()
    module.is_causal = causal
    module.peftmm_prefix = nn.ModuleDict({"default": PrefixKV(kv_heads=2, length=3, head_dim=8)})
    module.peftmm_slots = ActiveSlots()
    query, key, value = (torch.randn(2, 2, 5, 8) for _ in range(3))
    triangle = torch.ones(5, 5, dtype=torch.bool).tril() if causal else torch.ones(5, 5, dtype=torch.bool)
    keep = triangle.expand(2, 1, 5, 5).clone()
    keep[1, ..., 3:] = False  # the second sequence has two padded key positions
    expected = _reference(query, key, value, module.peftmm_prefix["default"], keep)

    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    for mask in (keep, additive):  # sdpa_mask's bool form, and the additive form eager masks use
        out, _ = prefix_attention(module, query, key, value, mask, scaling=8 ** -0.5)
        assert torch.allclose(out, expected, atol=1e-5)
    # No mask (no padding): a causal model still gets its triangle, and no key is cropped.
    out, _ = prefix_attention(module, query, key, value, None, scaling=8 ** -0.5)
    reference = _reference(query, key, value, module.peftmm_prefix["default"], triangle[None, None])
    assert torch.allclose(out, reference, atol=1e-5)


# -- masks inside real models ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["bert", "llama"])
def test_padding_does_not_change_outputs(tiny_models, text):
    tower = _text_tower(tiny_models, text, reparam=False)
    alone, _ = _encode(tower, TEXTS[:1])           # no padding: the model passes no mask
    batch, mask = _encode(tower, TEXTS)            # padded: a bool mask with masked key columns
    n = alone.shape[1]
    assert not mask[0].all() and mask[0, :n].all()
    assert torch.allclose(batch[0, :n], alone[0], atol=1e-5)
    assert not torch.allclose(_without_prefix(tower, lambda: _encode(tower, TEXTS[:1])[0]), alone, atol=1e-3)


def test_llama_prefix_keeps_causality(tiny_models):
    tower = _text_tower(tiny_models, "llama")
    ids = tower.processor(TEXTS[:1], return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, 4:] = (changed[0, 4:] + 7) % 500 + 10  # different later tokens, same length
    with torch.no_grad():
        first, _ = tower(input_ids=ids, attention_mask=torch.ones_like(ids))
        second, _ = tower(input_ids=changed, attention_mask=torch.ones_like(ids))
    assert torch.allclose(first[0, :4], second[0, :4], atol=1e-6)
    assert not torch.allclose(first[0, 4:], second[0, 4:], atol=1e-3)


# -- every attention family: changes outputs, trains, round-trips ------------------------------

PAIRS = [("vit", "bert"), ("clip", "llama"), ("siglip", "bert"), ("dinov2", "llama")]


@pytest.mark.parametrize("vision,text", PAIRS)
@pytest.mark.parametrize("vision_reparam", [True, False])
def test_prefix_trains_and_round_trips(tiny_models, tmp_path, vision, text, vision_reparam):
    # Each pair runs twice, swapping which tower re-parameterises: every family sees both.
    data = tiny.recipe(tiny_models[vision], tiny_models[text],
                       vision_methods=[{"type": "prefix", "length": 3, "reparam": vision_reparam,
                                        "reparam_hidden": 16}],
                       text_methods=[{"type": "prefix", "length": 3, "reparam": not vision_reparam,
                                      "reparam_hidden": 16}])
    recipe, model, splits = build(data)
    batch = batch_of(model, splits.train[:16])
    for tower in model.towers.values():
        inputs = ({"pixel_values": batch["pixel_values"]} if tower.name == "vision"
                  else {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        with torch.no_grad():
            plain = _without_prefix(tower, lambda tower=tower, inputs=inputs: tower(**inputs)[0])
            assert not torch.allclose(tower(**inputs)[0], plain, atol=1e-3), f"{tower.name} prefix has no effect"

    params = _prefix_params(model)
    assert params and all(p.requires_grad for p in params.values())
    start = {n: p.detach().clone() for n, p in params.items()}
    losses = overfit(model, batch, steps=6)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(not torch.equal(p, start[n]) for n, p in params.items()), "a prefix parameter did not train"

    before = logits(model, batch)
    save_bundle(model, recipe, tmp_path / "bundle")
    saved = load_file(tmp_path / "bundle" / WEIGHTS)
    prefix_keys = [k for k in saved if "peftmm_prefix" in k]
    assert prefix_keys
    assert all(k.endswith(("peftmm_prefix.default.key", "peftmm_prefix.default.value")) for k in prefix_keys)
    for name in ("vision", "text"):  # the MLP is folded: plain prefixes, and a recipe without it
        assert read_config(tmp_path / "bundle")["recipe"][name]["methods"][0]["reparam"] is False
        kv_heads, head_dim = 2, 16
        assert all(saved[k].shape == (kv_heads, 3, head_dim) for k in prefix_keys if k.startswith(name))
    assert recipe.vision.methods[0].reparam is vision_reparam  # the training recipe is untouched

    reloaded, _, _ = load_bundle(tmp_path / "bundle")
    assert torch.equal(logits(reloaded, batch_of(reloaded, splits.train[:16])), before)


def test_lora_and_prefix_in_one_tower_round_trip(tiny_models, tmp_path):
    recipe, model, splits = build(tiny.recipe(
        tiny_models["mobilenet_v2"], tiny_models["bert"],
        text_methods=[{"type": "lora", "r": 4}, {"type": "prefix", "length": 2, "reparam_hidden": 16}]))
    trainable = model.trainable_state_dict()
    assert any("lora_" in k for k in trainable) and any("peftmm_prefix.default.mlp" in k for k in trainable)
    batch = batch_of(model, splits.train[:16])
    losses = overfit(model, batch, steps=4)
    assert losses[-1] < losses[0]
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)

    before = logits(model, batch)
    save_bundle(model, recipe, tmp_path / "bundle")
    methods = read_config(tmp_path / "bundle")["recipe"]["text"]["methods"]
    assert [m["type"] for m in methods] == ["lora", "prefix"] and methods[0]["r"] == 4
    reloaded, _, _ = load_bundle(tmp_path / "bundle")
    assert torch.equal(logits(reloaded, batch_of(reloaded, splits.train[:16])), before)


def test_prefix_on_an_int8_backbone(tiny_models):
    import bitsandbytes as bnb

    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "prefix", "length": 4}])
    data["text"]["precision"] = "int8"
    _, model, splits = build(data)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.towers["text"].model.modules())
    batch = batch_of(model, splits.train[:16])
    logits(model, batch)
    losses = overfit(model, batch, steps=4)
    assert losses[-1] < losses[0]
    params = _prefix_params(model.towers["text"])
    assert params and all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0
                          for p in params.values())


def test_selected_layers_only(tiny_models):
    _, model, _ = build(tiny.recipe(tiny_models["vit"], tiny_models["llama"],
                                    text_methods=[{"type": "prefix", "layers": [1], "reparam": False}]))
    assert sorted(_prefix_params(model.towers["text"].model)) == ["layers.1.self_attn.peftmm_prefix.default.key",
                                                                  "layers.1.self_attn.peftmm_prefix.default.value"]


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("methods,error,message", [
    ({"vision_methods": [{"type": "prefix"}]}, PeftmmError,
     "vision.methods prefix: mobilenet_v2 has no attention layers; prefix tuning needs attention"),
    ({"text_methods": [{"type": "prefix", "length": 0}]}, RecipeError,
     "text.methods.0.length = 0 is out of range: must be >= 1"),
    ({"text_methods": [{"type": "prefix", "layers": [2]}]}, PeftmmError,
     "text.methods prefix layers: 2 is out of range; bert has 2 attention layers"),
    ({"text_methods": [{"type": "prefix", "layers": [0, 0]}]}, RecipeError, "must list distinct layer numbers"),
])
def test_bad_prefix_recipes_are_refused(tiny_models, methods, error, message):
    with pytest.raises(error) as err:
        build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], **methods))
    assert message in str(err.value)
