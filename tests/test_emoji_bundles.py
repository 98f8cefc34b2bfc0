"""The published emoji bundles on the real zoo backbones: each reproduces, on the emoji test split,
the test metrics its card (peftmm_config.json) recorded at the end of training, and answers
through the CLI. Retrieval, classification from the image alone and from image and name;
captioning on the real zoo models is covered by tests/test_captioning.py (no captioning bundle
is published yet)."""

import json
from pathlib import Path

import pytest

from peftmm.predict import Predictor, evaluate_bundle

pytestmark = pytest.mark.integration

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


def _card(name: str) -> dict:
    return json.loads((ADAPTERS / name / "peftmm_config.json").read_text())


def _cli(*args: str) -> dict:
    from click.testing import CliRunner

    from peftmm.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _first_test_emoji(name: str) -> dict:
    from peftmm.data import load_splits

    return load_splits(Predictor.load(ADAPTERS / name).recipe.data).test[0]


@pytest.mark.parametrize("name, metrics", [
    ("emoji-retrieval-adapters", ("t2i_r1", "t2i_r10", "i2t_r1", "mean_recall")),
    ("emoji-group", ("accuracy", "macro_f1")),
    ("emoji-group-image-text", ("accuracy", "macro_f1")),
])
def test_bundle_reproduces_its_card_on_the_test_split(name, metrics):
    recorded = _card(name)["metrics"]
    measured = evaluate_bundle(ADAPTERS / name, progress=False)
    assert measured["examples"] == 183
    for metric in metrics:
        # The same frozen weights, adapters and images: only summation order may differ.
        assert measured[metric] == pytest.approx(recorded[f"test_{metric}"], abs=0.006), metric


def test_group_classifier_beats_the_majority_class_by_far():
    assert _card("emoji-group")["metrics"]["test_accuracy"] > 0.5   # majority class: 14.8% of test


def test_zero_shot_labels_through_the_retrieval_bundle():
    example = _first_test_emoji("emoji-retrieval-adapters")
    groups = "Smileys & Emotion,People & Body,Animals & Nature,Food & Drink,Travel & Places,Activities," \
             "Objects,Symbols,Flags"
    out = _cli("predict", str(ADAPTERS / "emoji-retrieval-adapters"), "--image", str(example["image"]),
               "--labels", groups, "--template", "an emoji of {}", "--json")
    assert out["answer"] in groups.split(",")
    assert sum(s["score"] for s in out["scores"]) == pytest.approx(1.0, abs=1e-4)


def test_image_text_classifier_reads_the_name_with_the_picture():
    """The same picture with another name can get another group: the text reaches the answer."""
    example = _first_test_emoji("emoji-group-image-text")
    bundle = str(ADAPTERS / "emoji-group-image-text")
    own = _cli("predict", bundle, "--image", str(example["image"]), "--text", example["text"], "--json")
    flag = _cli("predict", bundle, "--image", str(example["image"]), "--text", "flag Japan", "--json")
    assert own["text"] == example["text"] and own["answer"] in Predictor.load(bundle).model.task.labels
    assert own["scores"] != flag["scores"]


def test_emoji_bundles_share_one_pair_of_backbones_in_the_runtime():
    """The three emoji bundles on one loaded MobileNetV2 and one MiniLM; each answers as alone."""
    from peftmm import Runtime

    names = ["emoji-group", "emoji-group-image-text", "emoji-retrieval-adapters"]
    runtime = Runtime(device="cpu", root=ADAPTERS)
    for name in names:
        runtime.register(name)
    assert len(runtime.backbones()) == 2
    example = _first_test_emoji("emoji-group-image-text")
    requests = [{"adapter": name, "image": str(example["image"]), "text": example["text"]} for name in names]
    for request, served in zip(requests, runtime.predict(requests)):
        alone = Predictor.load(ADAPTERS / request["adapter"], device="cpu").predict(request["image"], request["text"])
        assert served["adapter"] == request["adapter"]
        if "scores" in alone:   # the classifiers
            assert served["answer"] == alone["answer"]
            assert [s["answer"] for s in served["scores"]] == [s["answer"] for s in alone["scores"]]
            assert [s["score"] for s in served["scores"]] == pytest.approx([s["score"] for s in alone["scores"]],
                                                                           abs=1e-4)
        else:                   # retrieval: the image-text similarity
            assert served["similarity"] == pytest.approx(alone["similarity"], abs=1e-4)
