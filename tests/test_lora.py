"""LoRA targets are resolved inside one tower; a target matching nothing lists what exists."""

import pytest
import tiny
from helpers import build

from peftmm import PeftmmError


def test_targets_never_cross_towers(tiny_models):
    # q_proj exists in both the CLIP vision tower and the Llama text tower.
    _, model, _ = build(tiny.recipe(tiny_models["clip"], tiny_models["llama"],
                                    vision_methods=[{"type": "lora", "targets": ["q_proj"]}]))
    vision_lora = [n for n, _ in model.towers["vision"].model.named_parameters() if "lora_" in n]
    text_lora = [n for n, _ in model.towers["text"].model.named_parameters() if "lora_" in n]
    assert len(vision_lora) == 2 * 2  # 2 layers x (lora_A, lora_B)
    assert text_lora == []


def test_regex_and_default_targets(tiny_models):
    _, model, _ = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                    vision_methods=[{"type": "lora"}],
                                    text_methods=[{"type": "lora", "targets": [r".*\.layer\.1\..*query"]}]))
    text = [n for n, _ in model.towers["text"].model.named_parameters() if "lora_A" in n]
    assert text == ["encoder.layer.1.attention.self.query.lora_A.default.weight"]
    convs = {n.rsplit(".lora_", 1)[0] for n, _ in model.towers["vision"].model.named_parameters() if "lora_" in n}
    assert convs and all(n.endswith(("expand_1x1.convolution", "reduce_1x1.convolution", "conv_1x1.convolution"))
                         for n in convs)


def test_target_matching_nothing_lists_module_names(tiny_models):
    with pytest.raises(PeftmmError) as err:
        build(tiny.recipe(tiny_models["vit"], tiny_models["bert"],
                          vision_methods=[{"type": "lora", "targets": ["query"]}]))
    message = str(err.value)
    assert "'query' matches no module of vit" in message
    assert "q_proj" in message and "fc1" in message


def test_merge_keeps_predictions_and_blocks_saving(tiny_models, tmp_path):
    import torch
    from helpers import batch_of, logits, overfit

    from peftmm.bundle import save_bundle

    recipe, model, splits = build(tiny.recipe(tiny_models["vit"], tiny_models["bert"],
                                              vision_methods=[{"type": "lora"}], text_methods=[{"type": "lora"}]))
    batch = batch_of(model, splits.train[:16])
    overfit(model, batch, steps=3)
    before = logits(model, batch)
    assert model.merge_methods() == ["vision.lora", "text.lora"]
    assert torch.allclose(logits(model, batch), before, atol=1e-5)
    with pytest.raises(PeftmmError, match="merged into its backbones"):
        save_bundle(model, recipe, tmp_path / "b")


def test_merge_refuses_quantised_backbones(tiny_models):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora"}])
    data["text"]["precision"] = "int8"
    _, model, _ = build(data)
    with pytest.raises(PeftmmError, match="cannot merge into int8 weights"):
        model.merge_methods()
