"""recipes/hub/: recipes on real Hugging Face Hub backbones. They need the hub to train, so they
are not trained here (tests/test_recipe.py's recipes/*.yaml leaves the folder out); they load,
and `peftmm plan` estimates them with the hub out of reach, from peftmm/hub_configs, giving the
numbers bench/results/hub_plans.json (the README table) holds."""

import json
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftmm import hub_configs, plan, recipe_from_dict
from peftmm.cli import main
from peftmm.plan import Planner
from peftmm.plan_blueprint import blueprint
from peftmm.recipe import load

ROOT = Path(__file__).parent.parent
HUB = sorted((ROOT / "recipes" / "hub").glob("*.yaml"))
RESULTS = ROOT / "bench" / "results" / "hub_plans.json"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub_configs, "hub_reachable", lambda timeout=3.0: False)
    plan._blueprint.cache_clear()
    yield
    plan._blueprint.cache_clear()


def test_each_hub_recipe_says_it_needs_the_hub_and_has_its_configs():
    assert len(HUB) >= 2
    for path in HUB:
        header = path.read_text().split("\nname:")[0]
        assert "Needs Hugging Face Hub access" in header, path.name
        recipe = load(path)
        assert recipe_from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()
        for name in ("vision", "text"):
            assert hub_configs.folder_for(getattr(recipe, name).backbone) is not None, (path.name, name)


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.stem)
def test_hub_recipe_plans_offline_as_the_readme_says(path, offline):
    estimate = Planner(load(path)).estimate(device="cuda")
    assert set(estimate.details["offline"]) == {"vision", "text"}
    row = json.loads(RESULTS.read_text())[estimate.recipe]
    assert row["file"] == str(path.relative_to(ROOT))
    assert row["total"] == estimate.total, "stale: run .venv/bin/python bench/hub_plans.py"
    assert row["cards"] == {f"{gib} GiB": fits for gib, fits in estimate.cards().items()}


def test_cli_plans_a_hub_recipe_offline(offline):
    result = CliRunner().invoke(main, ["plan", str(ROOT / "recipes/hub/clip-qwen-caption.yaml"), "--gpu-mem", "12GiB"])
    assert result.exit_code == 0, result.output
    assert "fits 12.00 GiB: yes" in result.output
    assert "configs from peftmm/hub_configs" in result.output and "Qwen/Qwen2.5-0.5B-Instruct" in result.output


@pytest.mark.parametrize("source,tower,causal_lm,parameters", [
    ("openai/clip-vit-base-patch16", "vision", False, 85_799_424),
    ("google/siglip-base-patch16-224", "vision", False, 92_884_224),
    ("Qwen/Qwen2.5-0.5B-Instruct", "text", True, 494_032_768),           # "0.49B" on its model card
    ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "text", True, 1_711_376_384),
    ("BAAI/bge-base-en-v1.5", "text", False, 109_482_240),               # BERT-base
])
def test_config_copies_build_the_published_models(source, tower, causal_lm, parameters):
    made = hub_configs.blueprint(tower, source, hub_configs.folder_for(source), None, causal_lm)
    assert sum(p.numel() for p in made.empty_model().parameters()) == parameters
    if tower == "vision":
        assert made.processor.size == 224


def test_only_known_hub_ids_have_copies():
    assert hub_configs.folder_for("openai/clip-vit-base-patch16") is not None
    for source in ("openai/clip-vit-large-patch14", "minilm-l6", "a/b/c", "../hub_configs",
                   "openai--clip-vit-base-patch16"):
        assert hub_configs.folder_for(source) is None, source


def test_approximate_tokenizer_errs_long(tiny_models):
    """Against a real WordPiece tokenizer: never shorter on average or at the longest text."""
    real = blueprint("text", tiny_models["bert"]).processor
    approx = hub_configs.ApproximateTokenizer(types.SimpleNamespace(eos_token_id=2, pad_token_id=None))
    texts = ["what color is the shape?", "grinning face with big eyes", "flag: Côte d’Ivoire", "keycap 10", ""]
    got, want = (tok(texts, truncation=True, max_length=12)["input_ids"] for tok in (approx, real))
    assert sum(map(len, got)) >= sum(map(len, want)) and max(map(len, got)) >= max(map(len, want))
    assert max(map(len, got)) <= 12
    batch = approx(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, 12)
    assert approx("a b", add_special_tokens=False)["input_ids"] == [2, 2] and approx.pad_token_id == 2
