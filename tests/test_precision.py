"""int8 and nf4 backbones (bitsandbytes) train injected modules on CPU; bf16 runs too."""

import bitsandbytes as bnb
import pytest
import torch

import tiny
from helpers import batch_of, build, logits, overfit


@pytest.mark.parametrize("precision,layer", [("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)])
def test_quantised_towers_train_lora(tiny_models, precision, layer):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], vision_methods=[{"type": "lora"}],
                       text_methods=[{"type": "lora"}])
    data["vision"]["precision"] = data["text"]["precision"] = precision
    _, model, splits = build(data)
    for tower in model.towers.values():
        assert any(isinstance(m, layer) for m in tower.model.modules()), f"no {layer.__name__} in {tower.name}"
    assert all(p.dtype == torch.float32 for p in model.fusion.parameters())  # fusion stays out of quantisation
    batch = batch_of(model, splits.train[:16])
    logits(model, batch)  # an eval pass first: bitsandbytes must still allow training afterwards
    losses = overfit(model, batch, steps=6)
    assert losses[-1] < losses[0]
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_int8_predictions_do_not_depend_on_the_batch(tiny_models):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"])
    data["text"]["precision"] = "int8"
    _, model, splits = build(data)
    alone = logits(model, batch_of(model, splits.train[:1]))
    together = logits(model, batch_of(model, splits.train[:12]))[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_bf16_backbone_runs(tiny_models):
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[{"type": "lora"}])
    data["vision"]["precision"] = data["text"]["precision"] = "bf16"
    _, model, splits = build(data)
    assert next(model.towers["text"].model.parameters()).dtype == torch.bfloat16
    losses = overfit(model, batch_of(model, splits.train[:16]), steps=4)
    assert losses[-1] < losses[0]
