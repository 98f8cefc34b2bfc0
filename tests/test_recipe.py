"""Recipe validation: every mistake names the file, the key path and what is allowed."""

from pathlib import Path

import pytest

from peftmm import RecipeError, load_recipe, recipe_from_dict

ROOT = Path(__file__).parent.parent
BASE = {"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"}}


def with_(path: str, value):
    import copy

    data = copy.deepcopy(BASE)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


@pytest.mark.parametrize("data,message", [
    (with_("train.epoks", 3), "unknown key 'train.epoks'; did you mean 'epochs'?"),
    (with_("train.epochs", "three"), "train.epochs must be an integer, got 'three'"),
    (with_("train.epochs", 0), "train.epochs = 0 is out of range: must be >= 1"),
    (with_("train.lr", -1), "train.lr = -1.0 is out of range: must be > 0.0"),
    (with_("vision.precision", "int4"),
     "vision.precision = 'int4' is not allowed; choose one of: int8, nf4, bf16, fp32"),
    (with_("text.methods", [{"type": "lorra"}]),
     "text.methods.0.type = 'lorra' is not a known method (did you mean 'lora'?)"),
    (with_("text.methods", [{"type": "lora", "rank": 8}]), "unknown key 'text.methods.0.rank'"),
    (with_("text.methods", [{"type": "lora", "r": 0}]), "text.methods.0.r = 0 is out of range: must be >= 1"),
    (with_("text.methods", [{"type": "lora"}, {"type": "lora"}]), "'lora' is listed 2 times"),
    (with_("fusion", {"type": "gated-cross-attention", "dim": 30, "heads": 4}),
     "dim = 30 must be divisible by heads = 4"),
    (with_("fusion", {"type": "concat"}), "fusion.type = 'concat' is not a known fusion"),
    (with_("data.source", "vqa-v2"), "data.source = 'vqa-v2' is not a known data source"),
    (with_("data.val_fraction", 0.9), "data.val_fraction = 0.9 is out of range: must be <= 0.5"),
    ({"vision": {"backbone": "mobilenet-v2"}}, "missing required key 'text'"),
    ([1, 2], "must be a mapping"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data, source="r.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("r.yaml: ")


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision: {backbone: x\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML at line 2"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_are_validated_like_the_file():
    recipe = load_recipe(ROOT / "recipes/easy-vqa-lora.yaml", ["train.epochs=1", "text.methods.0.r=4"])
    assert recipe.train.epochs == 1 and recipe.text.methods[0].r == 4
    with pytest.raises(RecipeError, match="train.epochs must be an integer"):
        load_recipe(ROOT / "recipes/easy-vqa-lora.yaml", ["train.epochs=soon"])
    with pytest.raises(RecipeError, match="no item 3"):
        load_recipe(ROOT / "recipes/easy-vqa-lora.yaml", ["text.methods.3.r=4"])
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        load_recipe(ROOT / "recipes/easy-vqa-lora.yaml", ["train.epochs"])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_round_trip(path):
    recipe = load_recipe(path)
    again = recipe_from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
