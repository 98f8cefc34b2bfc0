"""int8 and nf4 backbones (bitsandbytes) train injected modules on CPU; bf16 runs too."""

import bitsandbytes as bnb
import pytest
import tiny
import torch
from helpers import batch_of, build, logits, overfit

from peftmm.errors import PeftmmError
from peftmm.precision import (
    DeviceFacts,
    autocast_dtype,
    common_record,
    inference_plan,
    int8_threshold,
    mixed_precision,
    nf4_compute_dtype,
    planned_facts,
    record,
)


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


# -- the precision decisions (peftmm/precision.py), with stubbed device facts ------------------------


CPU, T4, V100, P100 = DeviceFacts("cpu"), DeviceFacts("cuda", (7, 5)), DeviceFacts("cuda", (7, 0)), \
    DeviceFacts("cuda", (6, 0))
A100, H100 = DeviceFacts("cuda", (8, 0)), DeviceFacts("cuda", (9, 0))


@pytest.mark.parametrize("facts,expected", [(CPU, None), (P100, None), (V100, torch.float16), (T4, torch.float16),
                                            (A100, torch.bfloat16), (H100, torch.bfloat16)])
def test_auto_is_bf16_only_where_native(facts, expected):
    assert autocast_dtype("auto", facts) == expected
    assert nf4_compute_dtype(facts) == (expected or torch.float32)   # nf4 dequantises into what autocast uses


def test_explicit_choices_are_kept():
    assert mixed_precision("no", H100) == "no" and mixed_precision("fp16", H100) == "fp16"
    assert mixed_precision("bf16", CPU) == "bf16"          # CPU autocast, as accelerate did before
    assert mixed_precision("bf16", T4) == "bf16"           # asked for by name: emulated, but kept
    with pytest.raises(PeftmmError, match="choose one of auto, no, bf16, fp16"):
        mixed_precision("tf32", H100)


def test_int8_decomposes_outliers_on_cuda_only():
    assert int8_threshold(CPU) == 0.0 and int8_threshold(T4) == int8_threshold(H100) == 6.0


def test_inference_follows_the_recorded_precision_on_cuda_and_stays_fp32_on_cpu():
    trained = record("bf16", H100)
    assert trained == {"mixed_precision": "bf16", "device": "cuda", "capability": [9, 0]}
    assert inference_plan(trained, H100).dtype == torch.bfloat16 and inference_plan(trained, H100).tf32
    assert inference_plan(trained, T4).dtype == torch.float16     # nearest native format on an older card
    assert inference_plan(trained, CPU).dtype is None and not inference_plan(trained, CPU).tf32
    assert inference_plan(None, H100).dtype is None and inference_plan(None, H100).tf32   # older bundles: fp32
    assert inference_plan(record("no", CPU), H100).dtype is None
    assert common_record([trained, trained]) == trained and common_record([trained, record("no", CPU)]) is None


def test_plan_assumes_a_native_bf16_card_without_one():
    if torch.cuda.is_available():
        pytest.skip("plans for this machine's card")
    assert planned_facts("cuda") == DeviceFacts("cuda", (8, 0)) and planned_facts("cpu") == CPU


def test_quantised_bias_keeps_its_dtype_under_autocast(tiny_models):
    """bitsandbytes casts a Linear8bitLt/Linear4bit bias in place to its input's dtype: a bf16 input
    (autocast) would leave the frozen bias rounded for good."""
    from peftmm.backbones import load_tower

    for precision, layer in (("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)):
        tower = load_tower("text", tiny_models["bert"], precision)
        linears = [m for m in tower.model.modules() if isinstance(m, layer) and m.bias is not None]
        assert linears
        before = {id(m): m.bias.detach().clone() for m in linears}
        x = torch.randn(2, 3, linears[0].in_features, dtype=torch.bfloat16)
        with torch.no_grad():
            linears[0](x)   # bf16 in: bitsandbytes casts its bias to bf16 for this product
            with torch.autocast("cpu", dtype=torch.bfloat16):
                tower(**tower.tokenize(["what colour is the shape?"], 8))
        for m in linears:
            assert m.bias.dtype == torch.float32 and torch.equal(m.bias, before[id(m)]), precision
