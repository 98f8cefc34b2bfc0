"""LoRA variants (DoRA, rsLoRA, Gaussian/PiSSA/OLoRA initialisation, rank and alpha per module,
LoRA+): each round-trips through a bundle and through `peftmm export-peft` into VANILLA peft
(PeftModel on the plain transformers tower gives the bundle's tower outputs within 1e-6, fp32),
and back through import-peft; combinations peft cannot do on a precision or layer are refused."""

import json

import pytest
import tiny
import torch
from click.testing import CliRunner
from helpers import batch_of, build, overfit, perturb
from peft import PeftModel
from transformers import AutoModel

from peftmm import PeftmmError, RecipeError, recipe_from_dict
from peftmm.bundle import load_bundle, read_config, save_bundle
from peftmm.cli import main
from peftmm.peft_interop import import_peft

pytestmark = pytest.mark.usefixtures("keep_torch_rng")

TEXT = {"input_ids": torch.tensor([[2, 7, 40, 90, 5, 3], [2, 11, 5, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}
PIXELS = {"pixel_values": torch.randn(2, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(0))}

VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa-fast": {"init_lora_weights": "pissa_niter_2"},
    "olora": {"init_lora_weights": "olora"},
    "patterns": {"rank_pattern": {"value": 4}, "alpha_pattern": {"layer.0.attention.self.query": 3.0}},
    "everything": {"use_dora": True, "use_rslora": True, "init_lora_weights": "pissa", "rank_pattern": {"value": 4},
                   "alpha_pattern": {"value": 2.5}, "loraplus_lr_ratio": 8},
}
# tower, backbone, the LoRA's extra targets, inputs
TOWERS = {"bert": ("text", "bert", {}, TEXT), "llama": ("text", "llama", {"targets": ["q_proj", "v_proj"]}, TEXT),
          "vit": ("vision", "vit", {}, PIXELS)}


def _recipe(tiny_models, tower, backbone, lora):
    methods = {f"{tower}_methods": [{"type": "lora", "r": 2, "alpha": 5, **lora}]}
    vision, text = (tiny_models[backbone], tiny_models["bert"]) if tower == "vision" else \
        (tiny_models["mobilenet_v2"], tiny_models[backbone])
    return tiny.recipe(vision, text, **methods)


@torch.no_grad()
def _outputs(tower, inputs):
    return tower(**inputs)[0]


@torch.no_grad()
def _vanilla(folder, export, inputs):
    return PeftModel.from_pretrained(AutoModel.from_pretrained(folder), export).eval()(**inputs).last_hidden_state


@pytest.mark.parametrize("where", ["bert", "llama", "vit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_round_trips_through_bundle_and_vanilla_peft(tiny_models, tmp_path, variant, where):
    if where != "bert" and variant in ("gaussian", "pissa-fast", "patterns"):
        pytest.skip("one tower is enough for these; the others cover every code path")
    tower, backbone, extra, inputs = TOWERS[where]
    lora = {**VARIANTS[variant], **extra}
    if where == "llama" and "rank_pattern" in lora:
        lora = {**lora, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 2.5}}
    if where == "vit" and "rank_pattern" in lora:
        lora = {**lora, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 2.5}}
    recipe, model, _ = build(_recipe(tiny_models, tower, backbone, lora))
    perturb(model, scale=0.1)  # B starts at zero (and PiSSA's factors at W's top singular vectors)
    live = _outputs(model.towers[tower], inputs)
    bundle = save_bundle(model, recipe, tmp_path / "bundle")

    reloaded, _, config = load_bundle(bundle)
    saved = config["recipe"][tower]["methods"][0]
    # PiSSA/OLoRA saved as plain LoRA: it rebuilds on the unchanged backbone
    assert saved["init_lora_weights"] == lora.get("init_lora_weights", "default").replace("pissa_niter_2", "default") \
        .replace("pissa", "default").replace("olora", "default")
    if variant in ("pissa", "pissa-fast", "olora", "everything"):
        assert saved["r"] == 4  # [A ; A0], [B | -B0]
    mine = _outputs(reloaded.towers[tower], inputs)
    assert torch.allclose(mine, live, atol=1e-5), (mine - live).abs().max()

    result = CliRunner().invoke(main, ["export-peft", str(bundle), str(tmp_path / "peft"), "--tower", tower])
    assert result.exit_code == 0, result.output
    exported = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert (exported["use_dora"], exported["use_rslora"]) == (bool(lora.get("use_dora")), bool(lora.get("use_rslora")))
    theirs = _vanilla(tiny_models[backbone], tmp_path / "peft", inputs)
    assert torch.allclose(mine, theirs, atol=1e-6), (mine - theirs).abs().max()

    again, _, config = load_bundle(import_peft(tmp_path / "peft", bundle, tower, tmp_path / "imported"))
    assert torch.allclose(_outputs(again.towers[tower], inputs), mine, atol=1e-6)
    method = config["recipe"][tower]["methods"][0]
    assert (method["use_dora"], method["use_rslora"]) == (exported["use_dora"], exported["use_rslora"])


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_conv2d_variants_export_to_vanilla_peft(tiny_models, tmp_path, variant):
    recipe, model, _ = build(_recipe(tiny_models, "vision", "mobilenet_v2", VARIANTS[variant]))
    perturb(model, scale=0.1)
    bundle = save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, _ = load_bundle(bundle)
    mine = _outputs(reloaded.towers["vision"], PIXELS)
    assert torch.allclose(mine, _outputs(model.towers["vision"], PIXELS), atol=1e-6)
    result = CliRunner().invoke(main, ["export-peft", str(bundle), str(tmp_path / "peft"), "--tower", "vision"])
    assert result.exit_code == 0, result.output
    theirs = _vanilla(tiny_models["mobilenet_v2"], tmp_path / "peft", PIXELS).flatten(2).transpose(1, 2)
    assert torch.allclose(mine, theirs, atol=1e-6), (mine - theirs).abs().max()


def test_patterns_set_rank_and_alpha_per_module_inside_the_tower(tiny_models):
    # q_proj exists in the CLIP vision tower and in the Llama text tower: the pattern stays in its tower
    _, model, _ = build(tiny.recipe(tiny_models["clip"], tiny_models["llama"],
                                    vision_methods=[{"type": "lora", "r": 2, "targets": ["q_proj", "v_proj"],
                                                     "rank_pattern": {"q_proj": 6},
                                                     "alpha_pattern": {r".*layers\.1\..*v_proj": 7}}],
                                    text_methods=[{"type": "lora", "r": 3, "targets": ["q_proj"]}]))
    vision, text = model.towers["vision"].model, model.towers["text"].model
    ranks = {n.rsplit(".lora_A", 1)[0]: p.shape[0] for n, p in vision.named_parameters() if ".lora_A." in n}
    assert {n: r for n, r in ranks.items() if n.endswith("q_proj")} == \
        {f"encoder.layers.{i}.self_attn.q_proj": 6 for i in (0, 1)}
    assert all(r == 2 for n, r in ranks.items() if n.endswith("v_proj"))
    assert all(p.shape[0] == 3 for n, p in text.named_parameters() if ".lora_A." in n)
    scaling = {n: m.scaling["default"] for n, m in vision.named_modules() if hasattr(m, "scaling")}
    assert scaling["encoder.layers.1.self_attn.v_proj"] == 3.5 and scaling["encoder.layers.0.self_attn.v_proj"] == 8.0
    assert scaling["encoder.layers.0.self_attn.q_proj"] == 16 / 6


def test_loraplus_trains_b_at_the_ratio(tiny_models):
    _, model, splits = build(_recipe(tiny_models, "text", "bert", {"use_dora": True, "loraplus_lr_ratio": 16}))
    groups = {g["lr"]: g["params"] for g in model.parameter_groups(1e-3)}
    names = {id(p): n for n, p in model.towers["text"].model.named_parameters()}
    fast = sorted(names[id(p)].split(".")[-3] for p in groups[0.016])
    assert fast == ["lora_B"] * 4 + ["lora_magnitude_vector"] * 4
    slow = [names[id(p)] for p in groups[1e-3] if id(p) in names]
    assert len(slow) == 4 and all(".lora_A." in n for n in slow)
    losses = overfit(model, batch_of(model, splits.train[:16]), steps=6)
    assert losses[-1] < losses[0]


def test_pissa_taken_out_of_a_shared_tower_gives_the_weights_back(tiny_models):
    _, model, _ = build(_recipe(tiny_models, "text", "bert", {"init_lora_weights": "pissa"}))
    tower = model.towers["text"]
    query = tower.model.encoder.layer[0].attention.self.query
    residual = query.get_base_layer().weight.detach().clone()
    model.remove_methods()
    original = AutoModel.from_pretrained(tiny_models["bert"]).encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(residual, original, atol=1e-3)  # PiSSA moved its top singular part out
    assert torch.allclose(tower.model.encoder.layer[0].attention.self.query.weight, original, atol=1e-6)


def test_nf4_and_int8_keep_what_peft_supports(tiny_models, tmp_path):
    """nf4 + DoRA, int8 + rsLoRA with patterns: train a few steps, save, reload the same outputs."""
    for precision, lora in (("nf4", {"use_dora": True}),
                            ("int8", {"use_rslora": True, "rank_pattern": {"value": 4}, "loraplus_lr_ratio": 4})):
        data = _recipe(tiny_models, "text", "bert", lora)
        data["text"]["precision"] = precision
        recipe, model, splits = build(data)
        batch = batch_of(model, splits.train[:16])
        losses = overfit(model, batch, steps=4)
        assert losses[-1] < losses[0], (precision, losses)
        bundle = save_bundle(model, recipe, tmp_path / precision)
        reloaded, _, _ = load_bundle(bundle)
        model.eval()  # a training int8 layer multiplies through another bitsandbytes path
        before = _outputs(model.towers["text"], TEXT)
        assert torch.allclose(_outputs(reloaded.towers["text"], TEXT), before, atol=1e-5), precision


@pytest.mark.parametrize("precision,lora,message", [
    ("int8", {"use_dora": True}, "text.methods.0.use_dora: DoRA on int8 (bitsandbytes Linear8bitLt) layers fails"),
    ("nf4", {"init_lora_weights": "pissa"}, "text.methods.0.init_lora_weights = 'pissa' is refused on a nf4 tower"),
    ("int8", {"init_lora_weights": "olora"}, "text.methods.0.init_lora_weights = 'olora' is refused on a int8"),
    ("fp32", {"init_lora_weights": "loftq"}, "init_lora_weights = 'loftq' is not supported"),
    ("fp32", {"init_lora_weights": "pissa_niter_0"}, "init_lora_weights = 'pissa_niter_0' is not allowed"),
    ("fp32", {"rank_pattern": {"value": 0}}, "rank_pattern.value = 0: a rank must be an integer in 1..1024"),
    ("fp32", {"rank_pattern": {"value": "big"}}, "text.methods.0.rank_pattern.value must be an integer, got 'big'"),
    ("fp32", {"loraplus_lr_ratio": -1}, "text.methods.0.loraplus_lr_ratio = -1.0 is out of range: must be > 0.0"),
])
def test_recipe_refusals(tiny_models, precision, lora, message):
    data = _recipe(tiny_models, "text", "bert", lora)
    data["text"]["precision"] = precision
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(data)
    assert message in str(error.value)


@pytest.mark.parametrize("tower,lora,message", [
    ("text", {"rank_pattern": {"key": 4}}, "text.methods lora rank_pattern: 'key' matches none of the LoRA targets"),
    ("text", {"alpha_pattern": {"nowhere": 4}}, "text tower lora alpha_pattern: 'nowhere' matches no module of bert"),
    ("vision", {"init_lora_weights": "olora"}, "peft initialises it on Linear layers only, and target "
                                               "conv_stem.conv_3x3.convolution is a Conv2d"),
])
def test_model_build_refusals(tiny_models, tower, lora, message):
    backbone = "mobilenet_v2" if tower == "vision" else "bert"
    if tower == "vision":
        lora = {**lora, "targets": ["conv_stem.conv_3x3.convolution"]}
    with pytest.raises(PeftmmError) as error:
        build(_recipe(tiny_models, tower, backbone, lora))
    assert message in str(error.value)


def test_saved_variant_settings_are_in_the_bundle_config(tiny_models, tmp_path):
    recipe, model, _ = build(_recipe(tiny_models, "text", "bert", VARIANTS["patterns"] | {"loraplus_lr_ratio": 2}))
    saved = read_config(save_bundle(model, recipe, tmp_path / "b"))["recipe"]["text"]["methods"][0]
    assert saved | {"targets": None} == {"type": "lora", "r": 2, "alpha": 5.0, "dropout": 0.0, "targets": None,
                                         "use_dora": False, "use_rslora": False, "init_lora_weights": "default",
                                         "rank_pattern": {"value": 4}, "alpha_pattern": {"layer.0.attention.self.query":
                                                                                         3.0},
                                         "loraplus_lr_ratio": 2.0}


@pytest.mark.parametrize("method", [{"type": "lora", "init_lora_weights": "pissa", "use_dora": True},
                                    {"type": "peft", "tuner": "ia3"}])
def test_planner_builds_them_on_meta_tensors(tiny_models, tmp_path, method):
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                                                text_methods=[method])))
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0 and "fits 8.00 GiB: yes" in result.output, result.output


def test_runtime_serves_a_dora_bundle_beside_plain_lora(tiny_models, tmp_path):
    """peft cannot mix DoRA rows in one pass (adapter_names): the runtime runs them apart, same answers."""
    from serving import make_bundle

    from peftmm.predict import Predictor
    from peftmm.runtime import Runtime

    make_bundle(tiny_models, tmp_path, "dora", 5, text_methods=[{"type": "lora", "r": 2, "use_dora": True}])
    _, splits = make_bundle(tiny_models, tmp_path, "lora", 6, text_methods=[{"type": "lora", "r": 2}])
    examples = [{"image": e["image"], "text": e["text"]} for e in splits.test[:4]]
    runtime = Runtime(device="cpu", root=tmp_path)
    runtime.register("dora")
    runtime.register("lora")
    names = ["dora", "lora", "lora", "dora"]
    mixed = runtime.predict([{"adapter": n, **e} for n, e in zip(names, examples)])
    for name in ("dora", "lora"):
        alone = Predictor.load(tmp_path / name, device="cpu").predict_batch(examples)
        for i, n in enumerate(names):
            if n == name:
                assert mixed[i]["answer"] == alone[i]["answer"]
                assert all(abs(s["score"] - t["score"]) < 1e-5 for s, t in zip(mixed[i]["scores"], alone[i]["scores"]))
