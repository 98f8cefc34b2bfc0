"""The CLI end to end on tiny backbones: train, eval, predict, and one-line errors."""

import json

import pytest
from click.testing import CliRunner

from peftmm.cli import main


@pytest.fixture(scope="module")
def trained(cli_run):
    return cli_run


def test_train_writes_run_directory(trained):
    _, run, summary = trained
    assert summary["bundle"] == str(run / "bundle")
    for name in ("metrics.jsonl", "curves.png", "recipe.yaml", "bundle/adapter_model.safetensors",
                 "bundle/peftmm_config.json", "bundle/README.md"):
        assert (run / name).is_file(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "val_accuracy" in r] == [1, 2]
    assert 0 <= summary["test_accuracy"] <= 1 and summary["trainable_params"] > 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reproduces_the_test_accuracy_of_training(trained):
    _, run, summary = trained
    result = CliRunner().invoke(main, ["eval", str(run), "--split", "test"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output[result.output.index("{"):])
    assert measured["examples"] == 32
    assert abs(measured["accuracy"] - summary["test_accuracy"]) < 1e-6


def test_eval_full_split_lifts_the_recipes_evaluation_cap(trained):
    _, run, _ = trained
    result = CliRunner().invoke(main, ["eval", str(run), "--split", "val", "--full-split", "--max-samples", "40"])
    assert result.exit_code == 0, result.output
    # the recipe scored 32 examples; 40 exist only past its cap (easy-VQA's val split is in the thousands)
    assert json.loads(result.output[result.output.index("{"):])["examples"] == 40


def test_predict_prints_answer_and_scores(trained):
    import easy_vqa

    _, run, _ = trained
    image = easy_vqa.get_test_image_paths()[0]
    result = CliRunner().invoke(main, ["predict", str(run), "--image", image, "--question", "what shape is it?",
                                       "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["answer"] in easy_vqa.get_answers() and answer["image"] == image
    assert len(answer["scores"]) == 5 and answer["scores"][0]["answer"] == answer["answer"]


@pytest.mark.parametrize("args,message", [
    (["train", "{recipe}", "--set", "train.epoks=1"], "unknown key 'train.epoks'; did you mean 'epochs'?"),
    (["train", "{recipe}", "--set", "text.methods.0.targets=[nope]"], "'nope' matches no module of bert"),
    (["train", "{recipe}", "--set", "vision.backbone=no-such-model"], "neither a zoo name"),
    (["predict", "{run}", "--image", "{missing}", "--question", "q"], "image file not found"),
    (["predict", "{notimage}", "--image", "x.png", "--question", "q"], "no adapter bundle here"),
    (["eval", "{missing}"], "no adapter bundle here"),
])
def test_bad_input_is_one_clear_line(trained, tmp_path, args, message):
    recipe, run, _ = trained
    (tmp_path / "junk.txt").write_text("hello")
    values = {"recipe": recipe, "run": run, "missing": tmp_path / "nope.png", "notimage": tmp_path}
    result = CliRunner().invoke(main, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_undecodable_image_is_named(trained, tmp_path):
    _, run, _ = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = CliRunner().invoke(main, ["predict", str(run), "--image", str(bad), "--question", "q"])
    assert result.exit_code == 2 and f"{bad}: cannot decode image" in result.output


def test_debug_shows_the_traceback(trained):
    recipe, _, _ = trained
    result = CliRunner().invoke(main, ["--debug", "train", str(recipe), "--set", "train.epoks=1"])
    assert result.exit_code != 0 and result.exc_info is not None


def test_help_for_every_command():
    for command in ([], ["train"], ["eval"], ["predict"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
