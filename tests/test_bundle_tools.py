"""Bundle tools: publish (checked, renamed, atomic), inspect and list (no backbones), and the
strict reader's error for every kind of broken bundle."""

import json
import shutil
import struct

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import batch_of, logits
from safetensors.torch import load_file

from peftmm import BundleError
from peftmm.bundle import CARD, CONFIG, WEIGHTS, bundle_summary, load_bundle, read_config, read_tensors
from peftmm.cli import main
from peftmm.data import load_splits


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(cli_run):
    """A tiny run directory trained through the CLI (LoRA on the text tower)."""
    return cli_run[1]


@pytest.fixture(scope="module")
def published(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("published")
    result = invoke("publish", run, "shapes-v1", "--to", out)
    assert result.exit_code == 0, result.output
    return out / "shapes-v1", result.output


def test_publish_renames_and_predicts_like_the_source(run, published):
    path, output = published
    assert f"-> {path}" in output and "shapes-v1" in output
    assert sorted(p.name for p in path.iterdir()) == sorted([CARD, CONFIG, WEIGHTS])
    config = read_config(path)
    assert config["name"] == config["recipe"]["name"] == "shapes-v1"
    assert config["metrics"] == read_config(run / "bundle")["metrics"]
    source_tensors, tensors = read_tensors(run / "bundle"), read_tensors(path)  # checksum matches the new config
    assert source_tensors.keys() == tensors.keys()
    assert all(torch.equal(source_tensors[k], tensors[k]) for k in tensors)

    source, recipe, _ = load_bundle(run / "bundle")
    copy, _, _ = load_bundle(path)
    examples = load_splits(recipe.data).test[:16]
    assert torch.equal(logits(copy, batch_of(copy, examples)), logits(source, batch_of(source, examples)))

    card = (path / CARD).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peftmm" and front["pipeline_tag"] == "visual-question-answering"
    assert front["metrics"] == ["accuracy", "macro_f1"] and front["tags"][-1] == "lora"
    assert "# shapes-v1" in card and "peftmm predict shapes-v1" in card
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_accuracy" in r]
    assert "## Training curve" in card and f"- epochs run: {len(epochs)}" in card
    best = max(epochs, key=lambda r: r["val_accuracy"])
    assert f"- best val_accuracy: {best['val_accuracy']:.4f} at epoch {best['epoch']}" in card


def test_publish_refuses_an_existing_target_unless_forced(run, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = invoke("publish", run, "taken", "--to", tmp_path)
    assert result.exit_code == 2 and "already exists; use --force" in result.output, result.output
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    bare = shutil.copytree(run / "bundle", tmp_path / "bare")  # a bundle outside its run directory
    result = invoke("publish", bare, "taken", "--to", tmp_path, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.iterdir()) == sorted([CARD, CONFIG, WEIGHTS])
    assert read_config(target)["name"] == "taken"
    assert "## Training curve" not in (target / CARD).read_text()  # no run to summarise
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "taken"]  # no temporary folders left


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 100, ".", "..", "-dash", "a b", "/abs", "a.b"])
def test_publish_refuses_bad_names(run, tmp_path, name):
    out = tmp_path / "out"
    result = invoke("publish", "--to", out, "--", run, name)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: adapter name ") and "is not allowed" in result.output
    assert list(tmp_path.iterdir()) == []  # not even the --to folder


def test_publish_refuses_a_corrupt_source(run, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(run / "bundle", source)
    data = (source / WEIGHTS).read_bytes()
    (source / WEIGHTS).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = invoke("publish", source, "good-name", "--to", out)
    assert result.exit_code == 2 and "is corrupt or truncated" in result.output, result.output
    assert not out.exists()


def test_inspect_counts_parameters_and_bytes(published):
    path, _ = published
    tensors = load_file(path / WEIGHTS)
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary == bundle_summary(path)
    assert summary["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert summary["tensors"] == len(tensors)
    for group in ("vision", "text"):
        assert summary["towers"][group]["trainable_params"] == sum(
            t.numel() for k, t in tensors.items() if k.startswith(f"{group}."))
    for group in ("fusion", "head"):
        assert summary[group]["trainable_params"] == sum(
            t.numel() for k, t in tensors.items() if k.startswith(f"{group}."))
    assert summary["towers"]["vision"]["trainable_params"] == 0 and summary["towers"]["vision"]["methods"] == []
    lora = summary["towers"]["text"]["methods"]
    assert len(lora) == 1 and lora[0]["type"] == "lora" and lora[0]["r"] == 2 and lora[0]["targets"]
    sizes = {name: (path / name).stat().st_size for name in (WEIGHTS, CONFIG, CARD)}
    assert summary["files"] == sizes and summary["total_bytes"] == sum(sizes.values())
    config = read_config(path)
    assert summary["towers"]["text"]["fingerprint"] == config["towers"]["text"]["fingerprint"]
    assert summary["metrics"] == config["metrics"] and summary["labels"] == len(config["labels"])

    text = invoke("inspect", path).output
    for expected in ("shapes-v1", "vqa", "method: lora", "r=2", "targets=", "method: frozen",
                     config["towers"]["text"]["fingerprint"], f"trainable parameters: {summary['trainable_params']:,}",
                     f"total size: {summary['total_bytes']:,} B", "test_accuracy"):
        assert expected in text, (expected, text)


def test_list_shows_bundles_skips_other_folders_and_reports_broken_ones(run, published, tmp_path):
    path, _ = published
    shutil.copytree(path, tmp_path / "good")
    shutil.copytree(path, tmp_path / "broken")
    (tmp_path / "broken" / WEIGHTS).write_bytes(b"")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    (tmp_path / "loose.txt").write_text("x")
    (tmp_path / "peft-export").mkdir()  # another library's adapter folder: not listed
    (tmp_path / "peft-export" / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    result = invoke("list", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("broken ") and lines[1].startswith("shapes-v1 ")
    assert "error: adapter_model.safetensors is corrupt or truncated: the file is 0 bytes" in lines[0]
    summary = bundle_summary(tmp_path / "good")
    accuracy = summary["metrics"]["test_accuracy"]
    for expected in ("vqa", "vision=frozen", "text=lora(r=2)", f"{summary['trainable_params']:,} params",
                     f"test_accuracy {accuracy:.4f}"):
        assert expected in lines[1], (expected, lines[1])

    entries = json.loads(invoke("list", tmp_path, "--json").output)
    assert [e["name"] for e in entries] == ["broken", "shapes-v1"]
    assert "is corrupt or truncated" in entries[0]["error"]
    assert entries[1]["trainable_params"] == summary["trainable_params"]
    assert invoke("list", tmp_path / "notes").output.strip() == f"no bundles in {tmp_path / 'notes'}"
    missing = invoke("list", tmp_path / "nope")
    assert missing.exit_code == 2 and "no such folder" in missing.output


def _edit_config(path, change):
    config = json.loads((path / CONFIG).read_text())
    change(config)
    (path / CONFIG).write_text(json.dumps(config))


def _cut_in_half(path):
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    return f"the header describes {len(data)} bytes of file but it has {len(data) // 2}"


def _write_weights(raw: bytes):
    def damage(path):
        (path / WEIGHTS).write_bytes(raw)
    return damage


def _forged(entry: dict, data: bytes):
    header = json.dumps({"__metadata__": {"format": "peftmm"}, "head.x": entry}).encode()
    return _write_weights(struct.pack("<Q", len(header)) + header + data)


# (damage, the error substring it must produce). A damage returning a string makes that the substring.
BAD_BUNDLES = {
    "truncated": (_cut_in_half, None),
    "trailing-bytes": (lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes() + b"\0" * 7),
                       "(7 bytes too many)"),
    "header-longer-than-file": (_write_weights(struct.pack("<Q", 5000) + b"{}"),
                                "header of 5000 bytes is larger than the file (10 bytes"),
    "header-over-the-cap": (_write_weights(struct.pack("<Q", 2**40) + b"{}"),
                            f"header of {2**40} bytes is larger than the 104857600-byte limit"),
    "header-not-json": (_write_weights(struct.pack("<Q", 9) + b"{garbage}"), "its 9-byte header is not JSON"),
    "empty-weights": (_write_weights(b""), "the file is 0 bytes, shorter than the 8-byte header length"),
    "exotic-dtype": (_forged({"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}, b"\0"),
                     "tensor 'head.x' has dtype 'F8_E4M3'"),
    "offsets-disagree-with-shape": (_forged({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, b"\0" * 8),
                                    "tensor 'head.x' (F32 (4,)) needs 16 bytes, its offsets span 8"),
    "missing-config": (lambda p: (p / CONFIG).unlink(), "not an adapter bundle: adapter_config.json is missing"),
    "missing-weights": (lambda p: (p / WEIGHTS).unlink(), "adapter_model.safetensors is missing"),
    "future-format": (lambda p: _edit_config(p, lambda c: c.update(format_version=99)),
                      "bundle format version 99 is newer than this peftmm reads (1)"),
    "no-towers": (lambda p: _edit_config(p, lambda c: c.pop("towers")), "adapter_config.json lacks the key 'towers'"),
    "no-labels-or-recipe": (lambda p: _edit_config(p, lambda c: [c.pop("labels"), c.pop("recipe")]),
                            "lacks the keys 'labels', 'recipe'"),
    "config-edited": (lambda p: _edit_config(p, lambda c: c["metrics"].update(test_accuracy=1.0)),
                      "adapter_config.json does not match adapter_model.safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundles_give_their_exact_error(run, tmp_path, case):
    damage, message = BAD_BUNDLES[case]
    path = tmp_path / case
    shutil.copytree(run / "bundle", path)
    found = damage(path)
    message = found if isinstance(found, str) else message
    for read in (bundle_summary, load_bundle):  # both fail before any backbone is loaded
        with pytest.raises(BundleError, match=None) as caught:
            read(path)
        assert message in caught.value.message and caught.value.where == str(path), caught.value
    listed = json.loads(invoke("list", tmp_path, "--json").output)
    assert [e.get("error") for e in listed] == [caught.value.message]


@pytest.mark.parametrize("task, prompt, tag, usage", [
    ("retrieval", None, "zero-shot-image-classification", "--image IMAGE --labels 'cat,dog,bird'"),
    ("classification", "which group?", "image-classification", "--image IMAGE\n"),   # the image alone
    ("classification", None, "image-classification", "--image IMAGE --text '"),     # image and text
    ("captioning", "Describe the emoji:", "image-to-text", "--image IMAGE\n"),
])
def test_card_names_the_task_and_how_to_call_it(task, prompt, tag, usage):
    from peftmm.card import model_card

    tower = {"backbone": "b", "model_type": "bert", "precision": "int8", "fingerprint": "0" * 64}
    recipe = {t: {"methods": []} for t in ("vision", "text")} | {
        "task": {"type": task, "prompt": prompt}, "fusion": {"type": "f"}, "data": {"source": "emoji"},
        "train": {"epochs": 1, "batch_size": 2, "lr": 0.1, "seed": 0}}
    card = model_card({"name": "x", "task": task, "recipe": recipe, "towers": {"vision": tower, "text": tower}}, {})
    assert yaml.safe_load(card.split("---")[1])["pipeline_tag"] == tag
    assert f"peftmm predict x {usage}" in card and "--question" not in card
    # emoji-trained weights carry the renders' licence and attribution
    assert "designed by OpenMoji" in card and "CC BY-SA 4.0" in card
