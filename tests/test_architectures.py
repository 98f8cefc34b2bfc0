"""Every backbone family: LoRA + fusion + head build, train (loss falls) and round-trip exactly."""

import pytest
import tiny
import torch
from helpers import batch_of, build, logits, overfit

from peftmm.bundle import load_bundle, save_bundle

PAIRS = [(v, "bert") for v in tiny.VISION] + [("vit", "llama")]


@pytest.mark.parametrize("vision,text", PAIRS)
def test_lora_fusion_trains_and_round_trips(tiny_models, tmp_path, vision, text):
    data = tiny.recipe(tiny_models[vision], tiny_models[text], vision_methods=[{"type": "lora", "r": 4}],
                       text_methods=[{"type": "lora", "r": 4}])
    recipe, model, splits = build(data)
    trainable = model.trainable_state_dict()
    assert any(k.startswith("vision.") and "lora_" in k for k in trainable)
    assert any(k.startswith("text.") and "lora_" in k for k in trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all("lora_" not in n for n in frozen)

    batch = batch_of(model, splits.train[:16])
    losses = overfit(model, batch)
    assert losses[-1] < 0.7 * losses[0], losses

    before = logits(model, batch)
    save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, _ = load_bundle(tmp_path / "bundle")
    assert torch.equal(logits(reloaded, batch_of(reloaded, splits.train[:16])), before)


def test_backbone_stays_frozen_and_in_eval_mode(tiny_models):
    _, model, splits = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                         text_methods=[{"type": "lora"}]))
    stats = {n: b.clone() for n, b in model.towers["vision"].model.named_buffers()}
    model.train()
    assert not model.towers["vision"].model.training and not model.towers["text"].model.training
    overfit(model, batch_of(model, splits.train[:8]), steps=2)
    for name, buffer in model.towers["vision"].model.named_buffers():
        assert torch.equal(buffer, stats[name]), f"batch-norm statistic {name} moved"


def test_full_fine_tuning_trains_the_tower_at_its_own_rate(tiny_models):
    _, model, splits = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                         text_methods=[{"type": "full", "lr": 1e-4}]))
    groups = {g["lr"]: len(g["params"]) for g in model.parameter_groups(5e-3)}
    backbone = sum(1 for _ in model.towers["text"].model.parameters())
    assert groups[1e-4] == backbone and groups[5e-3] > 0
    assert all(k.startswith(("text.", "fusion.", "head.")) for k in model.trainable_state_dict())
    model.train()
    assert model.towers["text"].model.training and not model.towers["vision"].model.training


def test_full_fine_tuning_refuses_quantised_weights(tiny_models):
    from peftmm import PeftmmError

    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "full"}])
    data["text"]["precision"] = "int8"
    with pytest.raises(PeftmmError, match="a int8 backbone cannot be fine-tuned in full"):
        build(data)
