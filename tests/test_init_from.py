"""Stage chaining: a recipe starts from the trained modules of an earlier bundle."""

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner
from helpers import build, perturb

from peftmm import BundleError
from peftmm.bundle import initialise_from, read_tensors, save_bundle
from peftmm.cli import main


@pytest.fixture(scope="module")
def stage1(tiny_models, tmp_path_factory):
    """A retrieval bundle with LoRA in the text tower: the alignment stage."""
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    data["task"], data["fusion"] = {"type": "retrieval"}, {"type": "dual-projection", "dim": 16}
    recipe, model, _ = build(data)
    perturb(model)
    return save_bundle(model, recipe, tmp_path_factory.mktemp("stage1") / "bundle")


def test_matching_modules_are_copied_and_the_rest_is_fresh(tiny_models, stage1):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    _, model, _ = build(data)  # a VQA model: same LoRA, other fusion and head
    done = initialise_from(model, stage1)
    assert done["parts"] == ["text"] and done["loaded"] > 0 and done["skipped"] > 0
    saved, state = read_tensors(stage1), model.trainable_state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved if k.startswith("text."))


def test_other_backbones_are_refused(tiny_models, stage1):
    data = tiny.recipe(tiny_models["dinov2"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    _, model, _ = build(data)
    with pytest.raises(BundleError, match="init_from: the vision backbone .* has weight fingerprint .*: it belongs to "
                                          "other weights"):
        initialise_from(model, stage1)


def test_nothing_in_common_is_refused(tiny_models, stage1):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 4}])
    _, model, _ = build(data)  # rank 4: no tensor has the stage-1 shape
    with pytest.raises(BundleError, match="none of this bundle's tensors fits"):
        initialise_from(model, stage1)


def test_recipe_init_from_trains_from_the_earlier_stage(tiny_models, stage1, tmp_path):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    data["init_from"] = str(stage1)
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "init_from" in result.output and str(stage1) in result.output
