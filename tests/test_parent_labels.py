"""Classification on "parent > child" labels (task.parent_labels): trained on the children,
answering and scored on the parents, each parent's probability the sum of its children's."""

import json

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner

from peftmm import DataError
from peftmm.tasks.classification import ClassificationTask

LABELS = ["animal > cat", "animal > dog", "plant > tree"]


def _task(**config):
    return ClassificationTask(ClassificationTask.Config(parent_labels=True, **config), LABELS)


def test_parents_sum_their_childrens_probabilities():
    task = _task(top_k=2)
    # children 0.3 / 0.3 / 0.4: "plant > tree" is the likeliest child, "animal" the likeliest parent
    logits = torch.tensor([[0.3, 0.3, 0.4]]).log()
    out = task.decode(logits)[0]
    assert out["answer"] == "animal" and out["child"] == "tree"
    assert [s["answer"] for s in out["scores"]] == ["animal", "plant"]
    assert out["scores"][0]["score"] == pytest.approx(0.6, abs=1e-6)
    metrics = task.metrics(logits.repeat(2, 1), torch.tensor([0, 2]))   # truths: animal, plant
    assert metrics["accuracy"] == 0.5 and metrics["child_accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_training_targets_are_the_children():
    assert _task().targets([{"label": "animal > dog"}, {"label": "plant > tree"}]).tolist() == [1, 2]


def test_labels_without_a_parent_are_a_clear_error():
    with pytest.raises(DataError, match="label 'cat' is not a 'parent > child' path"):
        ClassificationTask(ClassificationTask.Config(parent_labels=True), ["cat", "animal > dog"])


def test_cli_trains_on_children_and_answers_parents(tiny_models, tmp_path):
    """easy-VQA images labelled "shape > colour": the run reports parent (shape) metrics."""
    import easy_vqa

    from peftmm.cli import main

    texts, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    shape, colour = {}, {}
    for t, a, i in zip(texts, answers, ids):
        (shape if t == "what shape is in the image?" else colour if t == "what color is the shape?" else {})[i] = a
    both = sorted(set(shape) & set(colour))[:120]
    data = tmp_path / "data.jsonl"
    records, seen = [], set()
    for k, i in enumerate(both):   # every child in train at least once: the run refuses unseen labels
        label = f"{shape[i]} > {colour[i]}"
        split = "train" if label not in seen else ("train", "train", "val", "test")[k % 4]
        seen.add(label)
        records.append({"image": paths[i], "label": label, "split": split})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = tiny.recipe(tiny_models["vit"], tiny_models["bert"],
                         task={"type": "classification", "hidden": 32, "prompt": "what is it?",
                               "parent_labels": True},
                         data={"source": "files", "path": str(data), "max_train_samples": None,
                               "max_eval_samples": None})
    recipe["fusion"] = {"type": "concat-mlp", "dim": 32}

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["train", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "run"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert {"test_accuracy", "test_child_accuracy", "test_macro_f1"} <= set(summary)
    assert summary["test_accuracy"] >= summary["test_child_accuracy"]   # a right child has the right parent
    predicted = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--image", paths[both[0]],
                                          "--question", "what is it?"])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.split("answer: ", 1)[1].split()[0] in {"circle", "rectangle", "triangle"}
