"""The bench scripts that summarise training runs report an instruct run's own metrics (exact
match, token F1, answers out of the training vocabulary, answers generated): one tiny instruct
run through ``peftmm train`` (bench/compare_methods.py's way), then bench/bundle_report.py,
bench/emoji_tasks.py's collection and the tables bench/readme_tables.py renders from them."""

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "bench"))   # bench scripts import each other by module name

import bundle_report  # noqa: E402
import compare_methods  # noqa: E402
import emoji_tables  # noqa: E402
import emoji_tasks  # noqa: E402
import instruct_generation  # noqa: E402
import readme_tables  # noqa: E402
import task_metrics  # noqa: E402

from peftmm.tasks import TASKS  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def instruct_run(tiny_models, tmp_path_factory):
    """A tiny instruct recipe (tiny MobileNetV2 and Llama LM, easy-VQA questions as chat messages)
    trained by compare_methods.run: its row and run folder."""
    import easy_vqa
    import tiny

    root = tmp_path_factory.mktemp("bench-instruct")
    lm = tiny.build("llama_lm", root / "llama_lm")
    texts, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    records = [{"messages": [{"role": "user", "content": [{"type": "image", "image": paths[ids[i]]},
                                                          {"type": "text", "text": texts[i]}]},
                             {"role": "assistant", "content": answers[i]}],
                "split": "train" if i < 24 else "val" if i < 28 else "test"} for i in range(32)]
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    recipe = root / "tiny-instruct.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-instruct",
        "vision": {"backbone": tiny_models["mobilenet_v2"], "image_size": 96},
        "text": {"backbone": str(lm), "methods": [{"type": "lora", "r": 4}], "max_length": 32},
        "fusion": {"type": "projector", "max_tokens": 4},
        "task": {"type": "instruct", "chat_template": TEMPLATE, "end_of_turn": "[SEP]", "max_new_tokens": 3},
        "data": {"source": "messages", "path": str(data)},
        "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "lr": 3e-2, "warmup_ratio": 0.0}}))
    run_dir = root / "run"
    return compare_methods.run(recipe, [], run_dir), recipe, run_dir


def test_the_reported_metrics_lead_with_each_tasks_primary_metric():
    assert set(task_metrics.REPORTED) == set(TASKS.names())
    for name in TASKS.names():
        assert task_metrics.primary(name) == TASKS.get(name).primary_metric, name
    assert task_metrics.reported("instruct", {"test_exact_match": 0.5, "test_loss": 2.0, "test_out_of_vocabulary": 3,
                                              "val_exact_match": 0.25}) == {"test_exact_match": 0.5,
                                                                            "test_out_of_vocabulary": 3}
    assert task_metrics.show("test_out_of_vocabulary", 3) == "3" and task_metrics.show("test_token_f1", 0.5) == "50.00%"


def test_compare_methods_reports_an_instruct_runs_metrics(instruct_run):
    row, _, _ = instruct_run
    assert row["task"] == "instruct" and row["metric"] == "test_exact_match"
    reported = {"test_exact_match", "test_token_f1", "test_out_of_vocabulary", "test_answered", "val_exact_match"}
    assert reported <= set(row)
    assert row["test_answered"] == 4 and 0 <= row["test_out_of_vocabulary"] <= 4
    table = compare_methods.table([row])
    assert "| test acc. |" in compare_methods.table([{**row, "metric": "test_accuracy", "test_accuracy": 0.5}])
    assert "| test metric |" in table
    cell = table.splitlines()[2].split(" | ")[6]
    assert cell == (f"exact match {100 * row['test_exact_match']:.2f}% (token F1 {100 * row['test_token_f1']:.2f}%, "
                    f"answers out of the training vocabulary {row['test_out_of_vocabulary']}, answers generated 4)")


def test_bundle_report_reads_an_instruct_bundles_metrics(instruct_run):
    row, _, run_dir = instruct_run
    data = bundle_report.report(run_dir / "bundle")
    assert data["task"] == "instruct"
    for key in ("test_exact_match", "test_token_f1", "test_out_of_vocabulary", "test_answered", "val_exact_match"):
        assert data["metrics"][key] == row[key], key
    table = readme_tables.bundle_table(data)
    assert f"| messages test exact match | {100 * row['test_exact_match']:.2f}% |" in table
    assert f"| messages test answers out of the training vocabulary | {row['test_out_of_vocabulary']} |" in table
    assert "| validation exact match (best epoch) |" in table


def test_emoji_tasks_collects_and_tables_an_instruct_run(instruct_run):
    row, recipe, run_dir = instruct_run
    collected = emoji_tasks.collect(run_dir, recipe, 0, None, "an emoji of {}")
    assert collected["task"] == "instruct" and collected["differs_from_recipe"] == {}
    assert {k: collected["test"][k] for k in ("exact_match", "token_f1", "out_of_vocabulary")} == \
        {k: row[f"test_{k}"] for k in ("exact_match", "token_f1", "out_of_vocabulary")}
    aggregates = emoji_tasks.aggregate([collected])
    text = emoji_tables.emoji({"aggregates": aggregates, "template": "an emoji of {}"}, {})
    line = next(x for x in text.splitlines() if x.startswith("| `tiny-instruct` | "))
    assert line == (f"| `tiny-instruct` | {100 * row['test_exact_match']:.1f} | {100 * row['test_token_f1']:.1f} | "
                    f"{row['test_out_of_vocabulary']:.1f} | 4 | 1 |")
    chart = run_dir / "chart.png"
    emoji_tasks.chart({"aggregates": aggregates}, None, chart)
    assert chart.stat().st_size > 0


def test_generation_agreement_counts_answers_equal_to_the_reference():
    first, other = {"text": "red", "tokens": 2}, {"text": "blue", "tokens": 2}
    results = {"1": {"peftmm": {"answers": [first, other]}, "transformers-merged": {"answers": [first, first]}}}
    assert instruct_generation.agreement(results) == {"1": {"peftmm": {"same": 1, "of": 2}}}
