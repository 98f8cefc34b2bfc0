"""Bottleneck adapters: exact identity when untrained, Houlsby/Pfeiffer placement in every
tower family, training, exact reload, quantised and bf16 backbones, stacking with LoRA."""

import bitsandbytes as bnb
import pytest
import tiny
import torch
from helpers import batch_of, build, logits, overfit

from peftmm import PeftmmError, RecipeError, recipe_from_dict
from peftmm.backbones import load_tower
from peftmm.bundle import load_bundle, save_bundle
from peftmm.methods import METHODS, build_method
from peftmm.methods.adapter import AdapterLayer

# (attention sub-layer, feed-forward output) of block {i}, as named inside each tiny tower.
SUBLAYERS = {
    "vit": ("layers.{i}.attention.o_proj", "layers.{i}.mlp.fc2"),
    "clip": ("encoder.layers.{i}.self_attn.out_proj", "encoder.layers.{i}.mlp.fc2"),
    "siglip": ("encoder.layers.{i}.self_attn.out_proj", "encoder.layers.{i}.mlp.fc2"),  # not head.mlp.fc2
    "dinov2": ("encoder.layer.{i}.attention.o_proj", "encoder.layer.{i}.mlp.fc2"),
    "bert": ("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"),
    "llama": ("layers.{i}.self_attn.o_proj", "layers.{i}.mlp.down_proj"),
}
STAGES = {"mobilenet_v2": [f"layer.{i}" for i in range(16)], "convnext": [f"encoder.stages.{i}" for i in range(4)]}
CASES = [(kind, placement, "fp32") for kind in SUBLAYERS for placement in ("houlsby", "pfeiffer")]
CASES += [(kind, "pfeiffer", "fp32") for kind in STAGES]
CASES += [("bert", "houlsby", "bf16"), ("mobilenet_v2", "pfeiffer", "bf16")]


def adapter(**settings):
    return build_method(METHODS.config({"type": "adapter", **settings}, "methods.0"))


def tower_inputs(tower) -> dict:
    torch.manual_seed(0)
    if tower.name == "vision":
        return {"pixel_values": torch.randn(2, 3, tiny.IMAGE, tiny.IMAGE)}
    ids = torch.randint(6, 200, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding must not change the identity either
    return {"input_ids": ids, "attention_mask": mask}


def adapted(module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, AdapterLayer)}


@pytest.mark.parametrize("kind,placement,precision", CASES)
def test_untrained_adapter_is_identity_in_every_block(tiny_models, kind, placement, precision):
    name = "vision" if kind in tiny.VISION else "text"
    tower = load_tower(name, tiny_models[kind], precision)
    inputs = tower_inputs(tower)
    with torch.no_grad():
        before, _ = tower(**inputs)
    adapter(placement=placement, reduction_factor=4).inject(tower)
    layers = adapted(tower.model)
    ran = []
    for layer_name, layer in layers.items():
        layer.peftmm_adapter["default"].register_forward_hook(lambda *_, n=layer_name: ran.append(n))
    after, _ = tower(**inputs)
    assert torch.equal(after, before)
    assert sorted(ran) == sorted(layers)  # every adapter is on the forward path, once

    if kind in STAGES:  # one adapter after each CNN block/stage, over its channels
        assert sorted(layers, key=STAGES[kind].index) == STAGES[kind]
    else:
        attention, ffn = SUBLAYERS[kind]
        blocks = tower.model.config.num_hidden_layers
        expected = {ffn.format(i=i) for i in range(blocks)}
        if placement == "houlsby":
            expected |= {attention.format(i=i) for i in range(blocks)}
        assert set(layers) == expected
        assert len(layers) == blocks * (2 if placement == "houlsby" else 1)
    for layer in layers.values():  # fp32 adapters whatever the backbone's dtype
        assert all(p.dtype == torch.float32 for p in layer.peftmm_adapter.parameters())

    # Each adapter's update reaches the output: its up-projection bias gets a gradient. (Not
    # checked on the random tiny CNNs, whose gradients underflow to 0 in early blocks.)
    if kind not in STAGES:
        after.square().mean().backward()
        for layer_name, layer in layers.items():
            assert layer.peftmm_adapter["default"].up.bias.grad.abs().sum() > 0, layer_name


def test_width_comes_from_each_targets_output(tiny_models):
    tower = load_tower("text", tiny_models["bert"])
    adapter(targets=[r"encoder\.layer\.\d+\.intermediate\.dense"], reduction_factor=8, layer_norm=True).inject(tower)
    layers = adapted(tower.model)
    assert set(layers) == {"encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"}
    bottleneck = layers["encoder.layer.0.intermediate.dense"].peftmm_adapter["default"]
    assert (bottleneck.down.in_features, bottleneck.down.out_features) == (64, 8)  # intermediate_size 64
    assert isinstance(bottleneck.norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("vision,text,vision_adapter,text_adapter", [
    ("vit", "bert", {"placement": "houlsby"}, {"placement": "pfeiffer"}),
    ("convnext", "llama", {"reduction_factor": 4},
     {"placement": "houlsby", "non_linearity": "gelu", "layer_norm": True}),
])
def test_adapters_train_and_round_trip(tiny_models, tmp_path, vision, text, vision_adapter, text_adapter):
    recipe, model, splits = build(tiny.recipe(tiny_models[vision], tiny_models[text],
                                              vision_methods=[{"type": "adapter", **vision_adapter}],
                                              text_methods=[{"type": "adapter", **text_adapter}]))
    adapter_params = {n for n, _ in model.towers.named_parameters() if ".peftmm_adapter." in n}
    assert {n for n, p in model.towers.named_parameters() if p.requires_grad} == adapter_params
    assert {k for k in model.trainable_state_dict() if k.startswith(("vision.", "text."))} == \
        {n.replace(".model.", ".", 1) for n in adapter_params}

    batch = batch_of(model, splits.train[:16])
    losses = overfit(model, batch)
    assert losses[-1] < 0.7 * losses[0], losses
    with_grads = {n for n, p in model.towers.named_parameters() if p.grad is not None}
    assert with_grads == adapter_params
    # Every adapter's update reaches the loss (its weights can sit behind dead ReLU units:
    # the tiny towers leave only 2 hidden units).
    up_biases = [p.grad for n, p in model.towers.named_parameters() if n.endswith(".peftmm_adapter.default.up.bias")]
    assert len(up_biases) == len(adapted(model.towers)) and all(g.abs().sum() > 0 for g in up_biases)

    before = logits(model, batch)
    save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, _ = load_bundle(tmp_path / "bundle")
    assert torch.equal(logits(reloaded, batch_of(reloaded, splits.train[:16])), before)


@pytest.mark.parametrize("precision,layer", [("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)])
def test_adapters_train_on_quantised_backbones(tiny_models, precision, layer):
    # GELU, not ReLU: every adapter weight then gets a gradient, none sits behind a dead unit.
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"],
                       vision_methods=[{"type": "adapter", "non_linearity": "gelu", "reduction_factor": 4}],
                       text_methods=[{"type": "adapter", "placement": "houlsby", "non_linearity": "gelu"}])
    data["vision"]["precision"] = data["text"]["precision"] = precision
    _, model, splits = build(data)
    for tower in model.towers.values():
        layers = adapted(tower.model)
        assert layers and all(isinstance(m.base_layer, layer) for m in layers.values())
    batch = batch_of(model, splits.train[:16])
    logits(model, batch)  # an eval pass first: bitsandbytes must still allow training afterwards
    losses = overfit(model, batch, steps=6)
    assert losses[-1] < losses[0]
    grads = {n: p.grad for n, p in model.named_parameters() if ".peftmm_adapter." in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()


def test_bf16_backbone_trains_adapters(tiny_models):
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                       vision_methods=[{"type": "adapter", "reduction_factor": 4}], text_methods=[{"type": "adapter"}])
    data["vision"]["precision"] = data["text"]["precision"] = "bf16"
    _, model, splits = build(data)
    assert next(model.towers["text"].model.parameters()).dtype == torch.bfloat16
    losses = overfit(model, batch_of(model, splits.train[:16]), steps=10, lr=3e-3)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("methods", [
    [{"type": "lora", "r": 4}, {"type": "adapter", "placement": "houlsby"}],
    [{"type": "adapter", "placement": "houlsby"}, {"type": "lora", "r": 4}],
    # Same module: the adapter wraps the LoRA-adapted projection, adapter(Wx + BAx).
    [{"type": "lora", "r": 4, "targets": [r".*\.attention\.output\.dense"]},
     {"type": "adapter", "placement": "houlsby"}],
    # ... and in the other order LoRA goes inside the adapter: the same structure.
    [{"type": "adapter", "placement": "houlsby"},
     {"type": "lora", "r": 4, "targets": [r".*\.attention\.output\.dense"]}],
])
def test_lora_and_adapter_stack_in_one_tower(tiny_models, tmp_path, methods):
    from peft.tuners.lora import LoraLayer

    recipe, model, splits = build(tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=methods))
    text = model.towers["text"].model
    assert len(adapted(text)) == 4 and any(isinstance(m, LoraLayer) for m in text.modules())
    if any("targets" in m for m in methods):
        assert isinstance(text.get_submodule("encoder.layer.0.attention.output.dense").base_layer, LoraLayer)
    trainable = model.trainable_state_dict()
    assert any(".lora_B." in k for k in trainable) and any(".peftmm_adapter.default.up." in k for k in trainable)

    batch = batch_of(model, splits.train[:16])
    losses = overfit(model, batch, steps=4)
    assert losses[-1] < losses[0]
    trained = {n for n, p in text.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".lora_B." in n for n in trained) and any(".peftmm_adapter." in n for n in trained)

    before = logits(model, batch)
    save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, _ = load_bundle(tmp_path / "bundle")
    assert torch.equal(logits(reloaded, batch_of(reloaded, splits.train[:16])), before)


@pytest.mark.parametrize("settings,message", [
    ({"placement": "parallel"},
     "text.methods.0.placement = 'parallel' is not allowed; choose one of: houlsby, pfeiffer"),
    ({"non_linearity": "swish"}, "text.methods.0.non_linearity = 'swish' is not allowed; choose one of: relu, gelu"),
    ({"reduction_factor": 0}, "text.methods.0.reduction_factor = 0 is out of range: must be >= 1"),
    ({"targets": []}, "'text.methods.0': targets is empty"),
])
def test_bad_settings_name_the_key(settings, message):
    data = tiny.recipe("mobilenet-v2", "minilm-l6", text_methods=[{"type": "adapter", **settings}])
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data, source="r.yaml")
    assert message in str(err.value) and str(err.value).startswith("r.yaml: ")


@pytest.mark.parametrize("vision,text,vision_methods,text_methods,message", [
    ("vit", "bert", [], [{"type": "adapter", "reduction_factor": 64}],
     "text.methods adapter: reduction_factor 64 leaves no hidden units for width 32"),
    ("mobilenet_v2", "bert", [{"type": "adapter", "placement": "houlsby"}], [],
     "vision.methods adapter: placement houlsby adds adapters after attention sub-layers and mobilenet_v2 has none"),
    ("vit", "bert", [{"type": "adapter", "targets": ["output.dense"]}], [],
     "vision tower adapter targets: 'output.dense' matches no module of vit"),
])
def test_bad_placement_is_one_clear_error(tiny_models, vision, text, vision_methods, text_methods, message):
    with pytest.raises(PeftmmError) as err:
        build(tiny.recipe(tiny_models[vision], tiny_models[text], vision_methods=vision_methods,
                          text_methods=text_methods))
    assert message in str(err.value)
