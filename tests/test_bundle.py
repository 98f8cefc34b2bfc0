"""Bundles: exact reload, and every kind of bad bundle gets a clear error (nothing loaded)."""

import json
import shutil

import pytest
import tiny
import torch
from helpers import batch_of, build, logits, perturb
from safetensors.torch import load_file, save_file

from peftmm import BundleError
from peftmm.bundle import CARD, CONFIG, WEIGHTS, load_bundle, read_config, save_bundle


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    recipe, model, splits = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                              text_methods=[{"type": "lora"}]))
    perturb(model, scale=0.01)  # every trainable tensor non-trivial, so a wrong load shows
    path = save_bundle(model, recipe, tmp_path_factory.mktemp("b") / "bundle", metrics={"test_accuracy": 0.5})
    return path, model, splits


def test_bundle_holds_only_trainable_tensors(saved):
    path, model, _ = saved
    tensors = load_file(path / WEIGHTS)
    assert set(tensors) == set(model.trainable_state_dict())
    assert not any(k.startswith("vision.") for k in tensors)  # the untouched vision tower is not saved
    card = (path / CARD).read_text()
    assert card.startswith("---\nlibrary_name: peftmm\n") and "test_accuracy" in card
    config = read_config(path)
    assert config["towers"]["text"]["fingerprint"] == model.towers["text"].info.fingerprint


def test_reload_reproduces_predictions_exactly(saved):
    path, model, splits = saved
    reloaded, _, _ = load_bundle(path)
    examples = splits.test[:24]
    assert torch.equal(logits(reloaded, batch_of(reloaded, examples)), logits(model, batch_of(model, examples)))


def _copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved[0], target)
    return target


def _edit_config(path, change):
    config = json.loads((path / CONFIG).read_text())
    change(config)
    (path / CONFIG).write_text(json.dumps(config))


def test_fingerprint_mismatch(saved, tmp_path, tiny_models):
    path = _copy(saved, tmp_path)
    other = tmp_path / "other-bert"
    tiny.build("bert", other)
    weights = load_file(other / "model.safetensors")
    weights = {k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BundleError, match="the text backbone .* has weight fingerprint .* trained on"):
        load_bundle(path, backbones={"text": str(other)})


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / WEIGHTS).unlink(), "adapter_model.safetensors is missing"),
    (lambda p: (p / CONFIG).unlink(), "not an adapter bundle"),
    (lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:300]), "corrupt or truncated"),
    (lambda p: (p / WEIGHTS).write_bytes(b"\xff" * 8 + b"{}"), "corrupt or truncated"),
    (lambda p: (p / CONFIG).write_text("{not json"), "is not valid JSON"),
    (lambda p: _edit_config(p, lambda c: c.update(format_version=99)), "format version 99 is newer"),
    (lambda p: _edit_config(p, lambda c: c.update(name="renamed")), "does not match adapter_model.safetensors"),
])
def test_damaged_bundles(saved, tmp_path, damage, message):
    path = _copy(saved, tmp_path)
    damage(path)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_tensor_shape_and_name_mismatch(saved, tmp_path):
    import hashlib

    for change, message in [(lambda t: t.pop(next(iter(t))), "missing"),
                            (lambda t: t.update({"head.extra": torch.zeros(1)}), "unexpected head.extra"),
                            (lambda t: t.update({"head.0.bias": torch.zeros(3)}), r"head.0.bias has shape \(3,\)")]:
        path = _copy(saved, tmp_path / message[:8].replace(" ", "_"))
        tensors = load_file(path / WEIGHTS)
        change(tensors)
        digest = hashlib.sha256((path / CONFIG).read_bytes()).hexdigest()
        save_file(tensors, path / WEIGHTS, metadata={"format": "peftmm", "format_version": "1",
                                                     "config_sha256": digest})
        with pytest.raises(BundleError, match=message):
            load_bundle(path)


def test_failed_save_leaves_previous_bundle_intact(saved, tmp_path, monkeypatch):
    path = _copy(saved, tmp_path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    _, model, _ = saved
    recipe = load_bundle(path)[1]
    import peftmm.bundle

    monkeypatch.setattr(peftmm.bundle, "model_card", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        save_bundle(model, recipe, path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["copy"]  # no temporary folder left behind
