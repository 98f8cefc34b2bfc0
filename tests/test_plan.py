"""`peftmm plan`: the estimate's parts against hand computations on tiny configs, the meta-device
simulation against the same step on real tensors, fits / does-not-fit, the knobs (in order,
each lowering the estimate), size strings, and the CLI output."""

import json
from contextlib import nullcontext

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner
from helpers import batch_of, build

from peftmm import PeftmmError, recipe_from_dict
from peftmm.backbones import load_tower
from peftmm.cli import main
from peftmm.plan import ALLOCATOR_SLACK, CUDA_CONTEXT, Estimate, GiB, Meter, Part, Planner, parse_size, weight_bytes
from peftmm.plan_meter import replay_run
from peftmm.tensors import to_device

LORA = {"type": "lora", "r": 2, "targets": ["query", "value"]}


def _recipe(tiny_models, kind="mobilenet_v2", **sections):
    """A frozen fp32 vision tower (cached) + BERT with LoRA on query/value."""
    data = tiny.recipe(tiny_models[kind], tiny_models["bert"], text_methods=[LORA])
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return recipe_from_dict(data)


def _named(estimate) -> dict[str, int]:
    return {p.name: p.bytes for p in estimate.parts}


def test_parts_match_a_hand_computation(tiny_models):
    recipe = _recipe(tiny_models, text={"precision": "int8"})
    planner = Planner(recipe)
    estimate = planner.estimate(device="cuda")
    parts = _named(estimate)

    # BERT (vocab 512, 64 positions, 2 token types, hidden 32, 2 layers, intermediate 64) in int8:
    # quantised Linear weights at a byte each plus an fp32 scale per output row; the rest in fp32,
    # the pooler included (bitsandbytes skips it); two int64 buffers of 64 (position, token type ids).
    h, inter, layers = 32, 64, 2
    embeddings = (512 + 64 + 2) * h + 2 * h
    linear_in_out = [(h, h)] * 4 + [(h, inter), (inter, h)]          # q, k, v, attention out, ffn in, out
    int8 = layers * sum(i * o + 4 * o for i, o in linear_in_out)
    fp32 = embeddings + layers * (sum(o for _, o in linear_in_out) + 2 * 2 * h) + (h * h + h)   # + pooler
    assert parts["text weights (frozen, int8)"] == int8 + 4 * fp32 + 2 * 64 * 8

    vision = load_tower("vision", tiny_models["mobilenet_v2"])   # fp32: every tensor at 4 bytes
    real_vision = sum(t.numel() * t.element_size() for t in [*vision.model.parameters(), *vision.model.buffers()])
    assert parts["vision weights (frozen, fp32)"] == real_vision

    lora = layers * 2 * 2 * (h + h)          # query and value in each layer, r = 2: A (2 x 32) + B (32 x 2)
    _, model, _ = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[LORA]))
    rest = sum(p.numel() for m in (model.fusion, model.head) for p in m.parameters())
    trainable = 4 * (lora + rest)
    assert parts["trainable weights"] == trainable == 4 * model.parameter_counts()[0]
    assert parts["gradients"] == trainable and parts["AdamW states"] == 2 * trainable
    assert parts["fp32 master copies"] == 0 and parts["best epoch's weights"] == trainable

    # the vision cache: each distinct image of train, val and test as the tower's fp32 tokens, in
    # host memory (features.py): on the card it takes nothing
    tokens, _ = vision(pixel_values=torch.zeros(1, 3, tiny.IMAGE, tiny.IMAGE))
    images = {str(e["image"]) for split in (planner.splits.train, planner.splits.val, planner.splits.test)
              for e in split}
    assert parts["feature cache"] == 0 and "host memory" in next(p.note for p in estimate.parts
                                                                  if p.name == "feature cache")
    assert estimate.details["cached"] == ["vision"]

    tensors = sum(b for name, b in parts.items() if name not in ("CUDA context", "allocator overhead"))
    assert parts["CUDA context"] == CUDA_CONTEXT
    assert parts["allocator overhead"] == int(ALLOCATOR_SLACK * tensors)
    assert estimate.total == sum(parts.values())
    assert parts["activations"] == max(estimate.details["phases"].values())

    cpu = planner.estimate(device="cpu", baseline=123_456_789)
    on_cpu = _named(cpu)
    assert on_cpu["process baseline"] == 123_456_789 and "CUDA context" not in on_cpu
    assert on_cpu["feature cache"] == len(images) * tokens[0].numel() * 4
    # the int8 BERT's quantised Linear weights, read from its fp32 file (4 bytes a weight)
    assert on_cpu["weight files kept mapped"] == 4 * layers * sum(i * o for i, o in linear_in_out)
    # the phases replayed through the malloc model: at its peak, resident = live + freed chunks held
    phase = cpu.details["peak_phase"]
    assert on_cpu["activations"] == cpu.details["own"] <= cpu.details["phases"][phase] and cpu.details["steps"] >= 2
    assert on_cpu["freed memory malloc keeps"] == cpu.details["resident"] - cpu.details["live"] >= 0
    assert cpu.details["live"] - cpu.details["own"] <= on_cpu["feature cache"]   # kept from earlier phases
    tensors = sum(b for name, b in on_cpu.items() if name not in ("process baseline", "allocator overhead"))
    assert on_cpu["allocator overhead"] == int(ALLOCATOR_SLACK * tensors)
    assert weight_bytes(vision.model, "nf4") == real_vision   # no Linear layer in MobileNetV2: nothing to pack


def test_nf4_and_bf16_weights(tiny_models):
    parts = {p: _named(Planner(_recipe(tiny_models, text={"precision": p})).estimate())[f"text weights (frozen, {p})"]
             for p in ("fp32", "bf16", "nf4")}
    h, inter = 32, 64
    quantised = 2 * (4 * h * h + 2 * h * inter)
    assert parts["bf16"] == (parts["fp32"] - 2 * 64 * 8) // 2 + 2 * 64 * 8   # int64 buffers stay as they are
    assert parts["nf4"] == parts["fp32"] - 4 * quantised + quantised // 2 + 4 * (quantised // 64)


def test_the_meta_simulation_matches_real_tensors(tiny_models):
    """The training step the planner runs on the meta device, run again on real CPU tensors
    (same model, same batch shapes): the same peak, byte for byte or nearly, and the same
    resident memory when their allocations are replayed through the malloc model."""
    recipe = _recipe(tiny_models, vision={"methods": [{"type": "adapter", "reduction_factor": 4}]})
    _, model, splits = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                         [{"type": "adapter", "reduction_factor": 4}], [LORA]))
    planner = Planner(recipe)
    batch = batch_of(model, splits.train[:16])
    real, real_trace = planner._step(model, lambda: dict(batch), [p for p in model.parameters() if p.requires_grad],
                                     nullcontext)

    from peftmm.model import MultimodalModel
    from peftmm.plan import empty_tower

    towers = {name: empty_tower(name, getattr(recipe, name)) for name in ("vision", "text")}
    with Meter():
        meta = MultimodalModel.build(recipe, splits.labels, device="meta", towers=towers)
    simulated, trace = planner._step(meta, lambda: to_device(batch, "meta"),
                                     [p for p in meta.parameters() if p.requires_grad], nullcontext)
    assert simulated == pytest.approx(real, rel=0.02)
    resident = [replay_run([("a training step", None, t)])["resident"] for t in (real_trace, trace)]
    assert resident[1] == pytest.approx(resident[0], rel=0.05)


def test_checkpointing_and_frozen_towers_in_the_estimate(tiny_models):
    planner = Planner(_recipe(tiny_models, train={"batch_size": 32, "eval_batch_size": 8}))
    step = "a training step"
    plain = planner.estimate().details["phases"][step]
    checkpointed = planner.estimate(_recipe(tiny_models, text={"gradient_checkpointing": True},
                                            train={"batch_size": 32, "eval_batch_size": 8}))
    assert checkpointed.details["checkpointed"] == ["text"]
    assert checkpointed.details["phases"][step] < plain
    # a frozen text tower that is not cached runs in every step, but keeps nothing for backward
    frozen = planner.estimate(_recipe(tiny_models, text={"methods": [], "cache_features": False},
                                      train={"batch_size": 32, "eval_batch_size": 8}))
    assert frozen.details["cached"] == ["vision"] and frozen.details["phases"][step] < 0.7 * plain


def test_fits_and_cards():
    estimate = Estimate("x", "cuda", [Part("a", 5 * GiB), Part("b", 3 * GiB)])
    assert estimate.total == 8 * GiB
    assert estimate.fits(8 * GiB) and not estimate.fits(8 * GiB - 1)
    assert estimate.cards() == {8: True, 12: True, 16: True, 24: True}
    estimate.parts.append(Part("c", 1))
    assert estimate.cards() == {8: False, 12: True, 16: True, 24: True}


def test_knobs_come_in_order_and_each_lowers_the_estimate(tiny_models):
    # (a ViT, whose cache-filling pass is smaller than the training step; with the tiny MobileNetV2
    # at batch 32 caching would be the peak, and neither batch size nor checkpointing could lower it)
    recipe = _recipe(tiny_models, "vit", train={"batch_size": 32, "eval_batch_size": 8})
    planner = Planner(recipe)
    base = planner.estimate()
    suggestions = planner.suggestions(base, budget=1)   # nothing fits one byte: every knob is tried
    assert [s.overrides for s in suggestions] == [["train.batch_size=1", "train.grad_accum=32"],
                                                  ["text.gradient_checkpointing=true"]]
    # no int8: on towers this tiny, bitsandbytes' buffers around each layer (an fp16 and an int8
    # copy of its input, an int32 product) outweigh the few KiB of weights it would save
    int8 = ["vision.precision=int8", "text.precision=int8"]
    assert planner.estimate(recipe_from_dict(recipe.to_dict(), overrides=int8)).total >= base.total
    for s in suggestions:
        assert s.estimate.total < base.total, s.knob
        again = planner.estimate(recipe_from_dict(recipe.to_dict(), overrides=s.overrides))
        assert again.total == s.estimate.total
    # with room for a smaller batch, the largest batch size that fits is suggested
    fitting = planner.suggestions(base, budget=base.total - 1)[0]
    assert fitting.overrides[0] == "train.batch_size=16" and fitting.estimate.fits(base.total - 1)


def test_caching_is_a_knob_where_the_cache_costs_more_than_it_saves(tiny_models):
    # both towers frozen, MobileNetV2 at 224 px: encoding 32 images for the cache is the peak,
    # and the vision tokens of every image are kept; training without the cache needs neither
    recipe = _recipe(tiny_models, vision={"image_size": 224}, text={"methods": []},
                     train={"batch_size": 32, "eval_batch_size": 8})
    planner = Planner(recipe)
    base = planner.estimate()
    assert base.details["cached"] == ["text", "vision"]
    suggestions = planner.suggestions(base, budget=1)
    assert suggestions[-1].overrides == ["vision.cache_features=false", "text.cache_features=false"]
    assert suggestions[-1].estimate.total < base.total and suggestions[-1].estimate.details["cached"] == []
    order = ["batch_size", "precision", "gradient_checkpointing", "cache_features"]
    knobs = [order.index(s.overrides[0].split("=")[0].split(".")[-1]) for s in suggestions]
    assert knobs == sorted(knobs)


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * GiB), ("8 GiB", 8 * GiB), ("12GB", 12 * 10**9),
                                           ("24576MiB", 24 * GiB), ("16g", 16 * GiB), ("1.5GiB", 3 * GiB // 2)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,message", [("8", "not a memory size"), ("eight", "not a memory size"),
                                          ("8XB", "not a memory size"), ("", "not a memory size"),
                                          ("-8GiB", "not a memory size"), ("512KB", "less than 1 MiB")])
def test_bad_sizes(text, message):
    with pytest.raises(PeftmmError, match=message):
        parse_size(text)


@pytest.fixture
def recipe_file(tiny_models, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny.recipe(tiny_models["vit"], tiny_models["bert"],
                                               text_methods=[LORA], train={"batch_size": 32, "eval_batch_size": 8})))
    return str(path)


def test_cli_table_and_cards(recipe_file):
    result = CliRunner().invoke(main, ["plan", recipe_file, "--gpu-mem", "24GiB"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tiny: estimated peak training memory on a CUDA card" in out
    for row in ("| text weights (frozen, fp32) |", "| trainable weights |", "| AdamW states |", "| feature cache |",
                "| activations |", "| CUDA context |", "| **total** |", "| 8 GiB | yes |", "| 24 GiB | yes |"):
        assert row in out
    assert "fits 24.00 GiB: yes" in out and "What to turn" not in out


def test_cli_does_not_fit_names_the_knobs(recipe_file):
    result = CliRunner().invoke(main, ["plan", recipe_file, "--gpu-mem", "1MiB", "--set", "train.batch_size=64"])
    assert result.exit_code == 0, result.output
    assert "does not fit 1.00 MiB" in result.output and "What to turn" in result.output
    assert "1. lower train.batch_size to 1" in result.output
    assert "--set train.batch_size=1 --set train.grad_accum=64" in result.output
    assert "None fits alone" in result.output


def test_cli_json(recipe_file):
    result = CliRunner().invoke(main, ["plan", recipe_file, "--json", "--device", "cpu", "--gpu-mem", "12GiB"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["device"] == "cpu" and data["budget"] == 12 * GiB and data["fits"] is True
    assert data["total"] == sum(p["bytes"] for p in data["parts"])
    assert "process baseline" in [p["name"] for p in data["parts"]]
    assert data["cards"] == {"8 GiB": True, "12 GiB": True, "16 GiB": True, "24 GiB": True}
    assert data["suggestions"] == []


@pytest.mark.parametrize("size", ["eight", "8", "512KB"])
def test_cli_bad_gpu_mem(recipe_file, size):
    result = CliRunner().invoke(main, ["plan", recipe_file, "--gpu-mem", size])
    assert result.exit_code == 2
    assert "Invalid value for '--gpu-mem'" in result.output and "GiB" in result.output


def test_cli_bad_recipe_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nvision: {backbone: mobilenet-v2, precison: int8}\ntext: {backbone: minilm-l6}\n")
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2 and "did you mean 'precision'" in result.output
