"""What the Hub reads: zoo models' upstream Hub ids (checked against the weights), model-card
front matter (base_model, base_model_relation, model-index, datasets), and the bundle's own
config under peftmm_config.json (format 2; format-1 bundles load with a note and convert)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from peftmm.bundle import CONFIG, LEGACY_CONFIG, WEIGHTS, bundle_summary, read_config, read_tensors
from peftmm.card import hub_base, hub_dataset, model_card
from peftmm.cli import main
from peftmm.errors import BundleError
from peftmm.zoo import cache_home, catalogue, check_hub_config, hub_id, is_cached

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_zoo_records_upstream_hub_ids():
    assert hub_id("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("mobilenet-v2") is None and "no Hugging Face Hub model" in catalogue()["mobilenet-v2"]["hub_note"]


@pytest.mark.parametrize("name", ["minilm-l6", "smollm2-135m"])
def test_hub_ids_are_checked_against_the_converted_weights(name, tmp_path):
    recorded = catalogue()[name]["hub_config"]
    if is_cached(name):   # the real converted folder, as `peftmm` fetched it
        assert check_hub_config(name, cache_home() / "zoo" / name) == []
    # and the check does see a folder of another shape
    (tmp_path / "config.json").write_text(json.dumps(recorded | {"hidden_size": recorded["hidden_size"] * 2}))
    assert check_hub_config(name, tmp_path) == [f"hidden_size: hub {recorded['hidden_size']}, "
                                                f"folder {recorded['hidden_size'] * 2}"]


def test_card_front_matter_names_hub_ids_and_measured_metrics():
    config = read_config(ADAPTERS / "easy-vqa-lora")
    front = front_matter(model_card(config, read_tensors(ADAPTERS / "easy-vqa-lora")))
    assert front["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2"]   # MobileNetV2 has no Hub model
    assert front["base_model_relation"] == "adapter"
    assert "datasets" not in front    # easy-vqa is no Hub data set
    (entry,) = front["model-index"]
    (result,) = entry["results"]
    accuracy = next(m for m in result["metrics"] if m["type"] == "accuracy")
    assert accuracy["value"] == pytest.approx(config["metrics"]["test_accuracy"], abs=1e-6)
    assert entry["name"] == config["name"] and result["dataset"]["split"] == "test"


def test_hub_names_of_backbones_and_data():
    assert hub_base("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert hub_base("/models/my-bert") is None and hub_base("mobilenet-v2") is None
    assert hub_dataset({"source": "hf", "path": "owner/pets"}) == "owner/pets"
    assert hub_dataset({"source": "hf", "path": "/data/pets"}) is None
    assert hub_dataset({"source": "files", "path": "a/b"}) is None


@pytest.mark.parametrize("name", sorted(p.name for p in ADAPTERS.iterdir() if p.is_dir()))
def test_shipped_bundles_are_in_the_new_layout(name):
    path = ADAPTERS / name
    assert (path / CONFIG).is_file() and not (path / LEGACY_CONFIG).exists()
    read_tensors(path)   # the weights' checksum still matches the (renamed, unchanged) config
    assert bundle_summary(path)["name"] == name


def test_a_format_1_bundle_loads_with_a_note_and_converts(tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(ADAPTERS / "easy-vqa-lora", old)
    (old / CONFIG).rename(old / LEGACY_CONFIG)
    weights = hashlib.sha256((old / WEIGHTS).read_bytes()).hexdigest()
    assert read_config(old)["name"] == "easy-vqa-lora"
    assert f"{old}: a bundle in the format-1 layout ({LEGACY_CONFIG})" in capsys.readouterr().err
    result = CliRunner().invoke(main, ["convert-bundle", str(old)])
    assert result.exit_code == 0, result.output
    assert (old / CONFIG).is_file() and not (old / LEGACY_CONFIG).exists()
    assert hashlib.sha256((old / WEIGHTS).read_bytes()).hexdigest() == weights
    assert read_tensors(old).keys() == read_tensors(ADAPTERS / "easy-vqa-lora").keys()


def test_convert_refuses_a_peft_folder_and_moves_nothing(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / LEGACY_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    result = CliRunner().invoke(main, ["convert-bundle", str(folder)])
    assert result.exit_code == 2 and "is not a peftmm adapter config" in result.output
    assert (folder / LEGACY_CONFIG).is_file() and not (folder / CONFIG).exists()
    with pytest.raises(BundleError, match="not an adapter bundle"):
        read_config(tmp_path)
