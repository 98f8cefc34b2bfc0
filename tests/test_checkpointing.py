"""Activation checkpointing (``vision/text.gradient_checkpointing``): the trainable parameters get
exactly the gradients they get without it, for LoRA, bottleneck adapters and prefix tuning in
transformers towers (transformers' own switch) and MobileNetV2 (torch.utils.checkpoint per
block); the blocks recompute only in training, dropout and batch norm inside keep their mode,
less is stored, and an architecture that cannot be checkpointed gets one clear error."""

import pytest
import tiny
import torch
from helpers import batch_of, build
from torch import nn

from peftmm import PeftmmError, RecipeError, backbones
from peftmm.backbones import load_tower

LORA, ADAPTER = {"type": "lora", "r": 2}, {"type": "adapter", "reduction_factor": 4, "non_linearity": "tanh"}
PREFIX = {"type": "prefix", "length": 3, "reparam_hidden": 8}
CASES = {  # id: (vision kind, its methods, text kind, its methods)
    "vit-lora/bert-adapter+prefix": ("vit", [LORA], "bert", [ADAPTER, PREFIX]),
    "mobilenet-adapter+lora/llama-lora+prefix": ("mobilenet_v2", [ADAPTER, LORA], "llama", [LORA, PREFIX]),
    "mobilenet-lora/bert-full": ("mobilenet_v2", [LORA], "bert", [{"type": "full"}]),
    "dinov2-adapter/llama-adapter": ("dinov2", [{**ADAPTER, "placement": "houlsby"}], "llama", [ADAPTER]),
}


def _model(tiny_models, case, checkpointing: bool, state=None):
    vision, vision_methods, text, text_methods = CASES[case]
    data = tiny.recipe(tiny_models[vision], tiny_models[text], vision_methods, text_methods)
    for tower in ("vision", "text"):
        data[tower]["gradient_checkpointing"] = checkpointing
    torch.manual_seed(0)
    recipe, model, splits = build(data)
    if state is None:  # untrained LoRA B / adapter up-projections are zero: give every tensor a gradient
        torch.manual_seed(1)
        with torch.no_grad():
            for tensor in model.trainable_state_dict().values():
                tensor.normal_(0, 0.05)
    else:
        model.load_trainable_state_dict(state)
    return model, splits


def _gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout masks in both runs (full fine-tuning trains with dropout)
    model.task.loss(model(batch), batch["labels"]).backward()
    # (BERT's pooler takes no part: under full fine-tuning it trains but has no gradient)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_gives_the_same_gradients(tiny_models, case):
    plain, splits = _model(tiny_models, case, checkpointing=False)
    checkpointed, _ = _model(tiny_models, case, checkpointing=True, state=plain.trainable_state_dict())
    assert all(tower.checkpointed for tower in checkpointed.towers.values())
    assert not any(tower.checkpointed for tower in plain.towers.values())
    batch = batch_of(plain, splits.train[:12])
    expected, got = _gradients(plain, batch), _gradients(checkpointed, batch)
    assert expected.keys() == got.keys() and len(got) > 4
    for name, grad in expected.items():
        if name.startswith("towers."):  # (a tower's methods; fusion gates may see one vision token)
            assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _saved_bytes(tower, inputs) -> int:
    """Bytes autograd keeps for backward during one forward pass of the tower."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tower(**inputs)
    return total


@pytest.mark.parametrize("kind", ["bert", "vit", "llama", "mobilenet_v2"])
def test_blocks_recompute_only_in_training_and_keep_their_modules_mode(tiny_models, kind):
    from peftmm.methods import METHODS, build_method

    name = "vision" if kind in tiny.VISION else "text"
    tower = load_tower(name, tiny_models[kind])
    build_method(METHODS.config(dict(LORA), "methods.0")).inject(tower)
    inputs = ({"pixel_values": torch.randn(4, 3, tiny.IMAGE, tiny.IMAGE)} if name == "vision" else
              {"input_ids": torch.randint(6, 200, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)})
    tower.train()
    before = _saved_bytes(tower, inputs)
    tower.enable_checkpointing()
    tower.enable_checkpointing()  # a second call changes nothing
    assert tower.checkpointed and len(tower.checkpointed) == len(set(map(id, tower.checkpointed)))
    assert all(block.training for block in tower.checkpointed)  # follows the tower's mode at once
    during = _saved_bytes(tower, inputs)
    assert during < 0.6 * before, (during, before)
    inner = [m for m in tower.model.modules() if isinstance(m, (nn.Dropout, nn.BatchNorm2d))]
    assert not any(m.training for m in inner), "the frozen backbone's dropout/batch norm must stay in eval"
    tower.eval()
    assert not any(block.training for block in tower.checkpointed)
    assert _saved_bytes(tower, inputs) == before  # evaluation with gradients on: no recomputation
    tower.train()
    assert all(block.training for block in tower.checkpointed)
    assert not any(m.training for m in inner)


def test_checkpointing_needs_a_tower_with_something_to_train(tiny_models):
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[LORA])
    data["vision"]["gradient_checkpointing"] = data["text"]["gradient_checkpointing"] = True
    _, model, _ = build(data)
    assert not model.towers["vision"].checkpointed  # frozen: no activations are kept anyway
    assert model.towers["text"].checkpointed


def test_an_architecture_that_cannot_be_checkpointed_is_refused(tiny_models, monkeypatch):
    known = dict(backbones.architectures())
    known["mobilenet_v2"] = {k: v for k, v in known["mobilenet_v2"].items() if k != "adapter_stage"}
    monkeypatch.setattr(backbones, "architectures", lambda: known)
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], vision_methods=[LORA])
    data["vision"]["gradient_checkpointing"] = True
    with pytest.raises(RecipeError, match="vision.gradient_checkpointing: MobileNetV2Model .* set "
                                          "gradient_checkpointing: false") as error:
        build(data)
    assert not isinstance(error.value.__cause__, Exception)
    tower = load_tower("vision", tiny_models["mobilenet_v2"])
    with pytest.raises(PeftmmError, match="supports no activation checkpointing"):
        tower.enable_checkpointing()


def test_the_recipe_key_is_validated(tiny_models):
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"])
    data["text"]["gradient_checkpointing"] = "yes"
    with pytest.raises(RecipeError, match="text.gradient_checkpointing must be true or false"):
        build(data)
