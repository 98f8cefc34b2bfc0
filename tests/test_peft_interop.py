"""LoRA to and from vanilla peft: exported folders load with peft.PeftModel and give the peftmm
tower's outputs; imported peft adapters give a bundle whose tower gives peft's outputs."""

import json
import shutil

import pytest
import tiny
import torch
from click.testing import CliRunner
from helpers import build, perturb
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from peftmm import BundleError
from peftmm.bundle import load_bundle, read_config, read_tensors, save_bundle
from peftmm.cli import main
from peftmm.peft_interop import export_peft, import_peft


def _noisy_bundle(recipe_dict, path):
    recipe, model, _ = build(recipe_dict)
    perturb(model, scale=0.1)  # non-trivial weights (LoRA B starts at zero), so a wrong load shows
    return save_bundle(model, recipe, path, metrics={"test_accuracy": 0.5}), model


def _peft_model(folder, seed=1, model_class=AutoModel, **lora):
    model = get_peft_model(model_class.from_pretrained(folder), LoraConfig(**lora)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return model


TEXT = {"input_ids": torch.tensor([[2, 7, 40, 90, 5, 3], [2, 11, 5, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}
PIXELS = {"pixel_values": torch.randn(2, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(0))}


@torch.no_grad()
def _same(peftmm_tower, peft_model, inputs, atol=1e-6):
    mine, _ = peftmm_tower(**inputs)
    theirs = peft_model(**inputs).last_hidden_state
    assert mine.shape == theirs.shape
    assert torch.allclose(mine, theirs.float(), atol=atol), (mine - theirs).abs().max()


@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory):
    """A bundle with LoRA (r 4) on the bert text tower and a frozen vit vision tower."""
    path, model = _noisy_bundle(tiny.recipe(tiny_models["vit"], tiny_models["bert"],
                                            text_methods=[{"type": "lora", "r": 4, "alpha": 8}]),
                                tmp_path_factory.mktemp("interop") / "base")
    return path, model


@pytest.fixture(scope="module")
def vit_peft(tiny_models, tmp_path_factory):
    model = _peft_model(tiny_models["vit"], r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"])
    path = tmp_path_factory.mktemp("peft") / "vit-lora"
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def with_vision(base, vit_peft, tmp_path_factory):
    """``base`` with the vanilla peft vit LoRA imported into its (so far frozen) vision tower."""
    return import_peft(vit_peft[0], base[0], "vision", tmp_path_factory.mktemp("imported") / "bundle")


def test_export_text_lora_loads_in_peft(base, tiny_models, tmp_path):
    path, model = base
    out = export_peft(path, "text", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"], config["task_type"]) == \
        ("LORA", 4, 8, "none", None)
    assert config["base_model_name_or_path"] == tiny_models["bert"]
    assert sorted(config["target_modules"]) == [f"encoder.layer.{i}.attention.self.{m}"
                                                for i in (0, 1) for m in ("query", "value")]
    assert all(k.startswith("base_model.model.encoder.layer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in load_file(out / "adapter_model.safetensors"))
    _same(model.towers["text"], PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_models["bert"]), out).eval(),
          TEXT)


def test_import_adds_a_vision_lora(base, vit_peft, with_vision):
    reloaded, _, config = load_bundle(with_vision)
    _same(reloaded.towers["vision"], vit_peft[1], PIXELS)
    assert config["recipe"]["vision"]["methods"][0] | {"targets": None} == \
        {"type": "lora", "r": 2, "alpha": 5.0, "dropout": 0.0, "targets": None, "use_dora": False, "use_rslora": False,
         "init_lora_weights": "default", "rank_pattern": {}, "alpha_pattern": {}, "loraplus_lr_ratio": None}
    assert config["metrics"]["imported_from_peft"]["tower"] == "vision"
    old, new = read_tensors(base[0]), read_tensors(with_vision)
    assert all(torch.equal(old[k], new[k]) for k in old)  # text LoRA, fusion and head stay
    assert "imported from the peft adapter" in (with_vision / "README.md").read_text()


def test_import_replaces_a_text_lora(base, tiny_models, tmp_path):
    peft = _peft_model(tiny_models["bert"], r=2, lora_alpha=3, target_modules=["key"])
    peft.save_pretrained(tmp_path / "peft")
    out = import_peft(tmp_path / "peft", base[0], "text", tmp_path / "bundle")
    reloaded, _, config = load_bundle(out)
    assert [m["type"] for m in config["recipe"]["text"]["methods"]] == ["lora"]
    assert config["recipe"]["text"]["methods"][0]["r"] == 2
    _same(reloaded.towers["text"], peft, TEXT)


def test_import_drops_a_task_models_prefix(base, tiny_models, tmp_path):
    from transformers import BertForMaskedLM  # its layers sit under "bert."

    peft = _peft_model(tiny_models["bert"], model_class=BertForMaskedLM, r=2, lora_alpha=4, target_modules=["query"])
    peft.save_pretrained(tmp_path / "peft")
    assert any(k.startswith("base_model.model.bert.") for k in load_file(tmp_path / "peft/adapter_model.safetensors"))
    reloaded, _, _ = load_bundle(import_peft(tmp_path / "peft", base[0], "text", tmp_path / "bundle"))
    with torch.no_grad():
        mine, _ = reloaded.towers["text"](**TEXT)
        theirs = peft(**TEXT, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(mine, theirs, atol=1e-6)


def test_round_trip_exports_what_was_imported(with_vision, vit_peft, tiny_models, tmp_path):
    out = export_peft(with_vision, "vision", tmp_path / "again")
    theirs, mine = load_file(vit_peft[0] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(theirs) == set(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    reloaded, _, _ = load_bundle(with_vision)
    vanilla = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_models["vit"]), out).eval()
    _same(reloaded.towers["vision"], vanilla, PIXELS)


def test_partial_export_only_when_asked(tiny_models, tmp_path):
    # LoRA on a layer the adapter wraps: peftmm holds it on ...output.dense.base_layer
    path, model = _noisy_bundle(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[
        {"type": "adapter"}, {"type": "lora", "r": 2, "targets": ["query", "layer.0.output.dense"]}]), tmp_path / "b")
    with pytest.raises(BundleError, match="also has adapter: .* allow_partial=True"):
        export_peft(path, "text", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    out = export_peft(path, "text", tmp_path / "peft", allow_partial=True)
    assert "encoder.layer.0.output.dense" in json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert "Only the LoRA part" in (out / "README.md").read_text()
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_models["bert"]), out)
    saved, held = load_file(out / "adapter_model.safetensors"), get_peft_model_state_dict(loaded)
    assert set(saved) == set(held) and all(torch.equal(saved[k], held[k]) for k in saved)  # every key found its layer


def _edit(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _bin_only(path):
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(b"not read")


def _transposed(path):
    tensors = load_file(path / "adapter_model.safetensors")
    save_file({k: v.T.contiguous() if ".lora_A." in k else v for k, v in tensors.items()},
              path / "adapter_model.safetensors")


@pytest.mark.parametrize("damage,tower,message", [
    (_bin_only, "vision", "only safetensors is read"),
    (lambda p: _edit(p, use_dora=True), "vision", "use_dora is true but .*q_proj.* lack lora_magnitude_vector"),
    (lambda p: _edit(p, rank_pattern={"q_proj": "four"}), "vision", "rank_pattern must map module patterns to ranks"),
    (lambda p: _edit(p, modules_to_save=["classifier"]), "vision", "modules_to_save"),
    (lambda p: _edit(p, bias="all"), "vision", 'bias = "all"'),
    (lambda p: _edit(p, rank_pattern={"q_proj": 4}), "vision",
     r"q_proj.lora_A has shape \(2, 32\), the vision backbone needs \(4, 32\) at r = 4"),
    (lambda p: _edit(p, init_lora_weights="pissa"), "vision", "changes the base weights"),
    (lambda p: _edit(p, peft_type="IA3"), "vision", "only LORA adapters"),
    (_transposed, "vision", r"lora_A has shape \(32, 2\), the vision backbone needs \(2, 32\)"),
    (lambda p: None, "text", "the text backbone .* does not have .*: layers.0.attention.q_proj"),
    (lambda p: None, "audio", "no tower named 'audio'"),
])
def test_bad_imports_write_nothing(base, vit_peft, tmp_path, damage, tower, message):
    peft = tmp_path / "peft"
    shutil.copytree(vit_peft[0], peft)
    damage(peft)
    with pytest.raises(BundleError, match=message):
        import_peft(peft, base[0], tower, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no output, no leftover temp folder


@pytest.mark.parametrize("tower,message", [("vision", "the vision tower has no LoRA to export"),
                                           ("audio", "no tower named 'audio'")])
def test_bad_exports_write_nothing(base, tmp_path, tower, message):
    with pytest.raises(BundleError, match=message):
        export_peft(base[0], tower, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_overwrite(base, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        export_peft(base[0], "text", tmp_path / "out")
    assert export_peft(base[0], "text", tmp_path / "out", overwrite=True) == tmp_path / "out"


def test_int8_tower_exports_to_peft(tiny_models, tmp_path):
    from transformers import BitsAndBytesConfig

    recipe = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[{"type": "lora"}])
    recipe["text"]["precision"] = "int8"
    path, model = _noisy_bundle(recipe, tmp_path / "b")
    out = export_peft(path, "text", tmp_path / "peft")
    quantised = AutoModel.from_pretrained(tiny_models["bert"], device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=["pooler"]))
    _same(model.towers["text"], PeftModel.from_pretrained(quantised, out).eval(), TEXT)


def test_cli_commands(base, vit_peft, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export-peft", str(base[0]), str(tmp_path / "peft"), "--tower", "text"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft/adapter_config.json").is_file()
    result = runner.invoke(main, ["import-peft", str(vit_peft[0]), str(base[0]), str(tmp_path / "new"),
                                  "--tower", "vision"])
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "new")["recipe"]["vision"]["methods"][0]["type"] == "lora"
    for args, message in [
        (["export-peft", str(base[0]), str(tmp_path / "x"), "--tower", "vision"], "has no LoRA to export"),
        (["export-peft", str(base[0]), str(tmp_path / "peft"), "--tower", "text"], "already exists"),
        (["import-peft", str(tmp_path), str(base[0]), str(tmp_path / "x"), "--tower", "text"],
         "adapter_config.json is missing"),
        (["import-peft", str(vit_peft[0]), str(tmp_path / "nowhere"), str(tmp_path / "x"), "--tower", "text"],
         "no adapter bundle here"),
    ]:
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, \
            result.output
    assert not (tmp_path / "x").exists()


def test_auto_peft_model_finds_the_base_from_the_export_alone(base, tiny_models, tmp_path):
    """Vanilla peft, given only the exported folder: the base comes from base_model_name_or_path
    (here a local folder, --base-path) and the class from auto_mapping; outputs equal peftmm's tower."""
    from peft import AutoPeftModel

    path, model = base
    copy = tmp_path / "bert-base"
    shutil.copytree(tiny_models["bert"], copy)
    out = export_peft(path, "text", tmp_path / "peft", base_path=str(copy))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(copy)
    assert config["auto_mapping"] == {"base_model_class": "BertModel",
                                      "parent_library": "transformers.models.bert.modeling_bert"}
    _same(model.towers["text"], AutoPeftModel.from_pretrained(str(out)).eval(), TEXT)
    with pytest.raises(BundleError, match="--base-path .*: no such folder"):
        export_peft(path, "text", tmp_path / "peft2", base_path=str(tmp_path / "nowhere"))
