"""The multi-adapter runtime: shared backbones, per-call adapters, mixed batches, clean failure."""

import json
import shutil

import pytest
import tiny
import torch
from helpers import build, perturb
from safetensors.torch import load_file, save_file
from serving import METHODS, make_adapters

from peftmm import BundleError
from peftmm.bundle import CONFIG, WEIGHTS, save_bundle
from peftmm.predict import Predictor
from peftmm.runtime import Runtime


@pytest.fixture(scope="module")
def bundles(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    examples = make_adapters(tiny_models, root)
    return root, {name: root / name for name in METHODS}, examples


@pytest.fixture(scope="module")
def runtime(bundles):
    root, paths, _ = bundles
    runtime = Runtime(device="cpu", root=root)
    for name in paths:
        runtime.register(name)
    return runtime


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    for x, y in zip(a, b):
        for s, t in zip(x["scores"], y["scores"]):
            assert s["answer"] == t["answer"] and abs(s["score"] - t["score"]) < 1e-5


def test_backbones_are_loaded_once_for_all_adapters(runtime):
    assert runtime.names() == sorted(METHODS)
    loaded = runtime.backbones()
    assert sorted(b["tower"] for b in loaded) == ["text", "vision"]
    assert all(b["adapters"] == sorted(METHODS) for b in loaded)
    info = runtime.describe("adapter-both")
    assert info["methods"] == {"vision": ["adapter"], "text": ["adapter"]} and info["trainable_params"] > 0


def test_each_adapter_answers_as_its_bundle_alone(runtime, bundles):
    _, paths, examples = bundles
    for name, path in paths.items():
        alone = Predictor.load(path, device="cpu").predict_batch(examples)
        served = runtime.predict([{"adapter": name, **e} for e in examples])
        assert all(r["adapter"] == name for r in served)
        _same(served, alone)


def test_mixed_adapter_batch_equals_one_adapter_at_a_time(runtime, bundles):
    _, _, examples = bundles
    names = sorted(METHODS)
    requests = [{"adapter": names[i % 3], **e} for i, e in enumerate(examples)]
    mixed = runtime.predict(requests)
    for name in names:
        mine = [r for r in requests if r["adapter"] == name]
        _same([m for m, r in zip(mixed, requests) if r["adapter"] == name], runtime.predict(mine))
    # The adapters really differ: the same input gets other scores under another adapter.
    first = {name: runtime.predict([{"adapter": name, **examples[0]}])[0] for name in names}
    assert len({json.dumps(r["scores"]) for r in first.values()}) == 3


def test_lora_and_adapter_slots_share_one_forward_pass(runtime, bundles, monkeypatch):
    """LoRA and bottleneck adapters mix rows of different slots in one pass; prefix does not."""
    _, _, examples = bundles
    tower = runtime._adapters["lora-text"].model.towers["text"]
    calls = []
    original = type(tower).forward
    monkeypatch.setattr(type(tower), "forward", lambda self, **kw: calls.append((self.name, self.slots.rows)) or
                        original(self, **kw))
    runtime.predict([{"adapter": n, **examples[0]} for n in ("lora-text", "adapter-both")])
    text_calls = [rows for name, rows in calls if name == "text"]
    assert text_calls == [["lora-text", "adapter-both"]]
    calls.clear()
    runtime.predict([{"adapter": n, **examples[0]} for n in ("lora-text", "prefix-lora")])
    assert [rows for name, rows in calls if name == "text"] == [None, None]


def test_switching_adapters_moves_no_weights(runtime, bundles):
    _, _, examples = bundles
    towers = {id(t): t for e in runtime._adapters.values() for t in e.model.towers.values()}.values()
    before = {id(p): p.data_ptr() for t in towers for p in t.parameters()}
    for name in sorted(METHODS) * 2:
        runtime.predict([{"adapter": name, **examples[0]}])
    assert {id(p): p.data_ptr() for t in towers for p in t.parameters()} == before


def test_unregister_takes_every_module_out(bundles):
    root, _, examples = bundles
    runtime = Runtime(device="cpu", root=root)
    runtime.register("lora-text")
    text = runtime._adapters["lora-text"].model.towers["text"]
    baseline = sum(p.numel() for p in text.parameters())
    reference = runtime.predict([{"adapter": "lora-text", **examples[0]}])
    runtime.register("adapter-both")
    runtime.register("prefix-lora", name="again")
    assert sum(p.numel() for p in text.parameters()) > baseline
    runtime.unregister("adapter-both")
    runtime.unregister("again")
    assert sum(p.numel() for p in text.parameters()) == baseline
    _same(runtime.predict([{"adapter": "lora-text", **examples[0]}]), reference)
    runtime.unregister("lora-text")
    assert runtime.backbones() == [] and runtime.names() == []


def _count(runtime) -> int:
    return sum(p.numel() for t in runtime._towers.values() for p in t.parameters())


def test_a_bundle_that_fails_to_load_leaves_nothing_registered(bundles, tmp_path):
    root, paths, _ = bundles
    runtime = Runtime(device="cpu", root=tmp_path)
    shutil.copytree(paths["lora-text"], tmp_path / "good")
    runtime.register("good")
    before = _count(runtime)
    # Tensors of the wrong shape: found only after the modules went into the shared towers.
    bad = tmp_path / "bad-shape"
    shutil.copytree(paths["adapter-both"], bad)
    tensors = load_file(bad / WEIGHTS)
    from safetensors import safe_open
    with safe_open(str(bad / WEIGHTS), "pt") as f:
        metadata = f.metadata()
    key = next(k for k in tensors if k.startswith("text.") and k.endswith("up.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, bad / WEIGHTS, metadata=metadata)
    with pytest.raises(BundleError, match="has shape"):
        runtime.register("bad-shape")
    assert runtime.names() == ["good"] and _count(runtime) == before
    with pytest.raises(BundleError, match="already registered"):
        runtime.register("good")
    assert _count(runtime) == before


def test_fingerprint_mismatch_is_refused(tiny_models, tmp_path):
    backbone = tmp_path / "bert"
    shutil.copytree(tiny_models["bert"], backbone)
    data = tiny.recipe(tiny_models["mobilenet_v2"], str(backbone), text_methods=[{"type": "lora"}])
    recipe, model, _ = build(data)
    save_bundle(model, recipe, tmp_path / "adapters" / "stale")
    from transformers import BertModel

    changed = BertModel.from_pretrained(backbone)  # other weights in the same folder
    with torch.no_grad():
        changed.embeddings.word_embeddings.weight.add_(1.0)
    changed.save_pretrained(backbone)
    runtime = Runtime(device="cpu", root=tmp_path / "adapters")
    with pytest.raises(BundleError, match="belongs to other weights"):
        runtime.register("stale")
    assert runtime.names() == [] and runtime.backbones() == []


@pytest.mark.parametrize("bundle,name,message", [
    ("../outside", None, "outside the adapters folder"),
    ("/etc", None, "outside the adapters folder"),
    ("missing", None, "no adapter bundle"),
    ("lora-text", "a.b", "not allowed"),
    ("lora-text", "../x", "not allowed"),
    ("lora-text", "", "not allowed"),
])
def test_bad_names_and_paths(bundles, bundle, name, message):
    root, _, _ = bundles
    (root.parent / "outside").mkdir(exist_ok=True)
    runtime = Runtime(device="cpu", root=root)
    with pytest.raises(BundleError, match=message):
        runtime.register(bundle, name=name)
    assert runtime.names() == [] and runtime.backbones() == []


def test_unknown_adapter_and_bad_requests(runtime, bundles):
    _, _, examples = bundles
    with pytest.raises(BundleError, match="no adapter named 'nope'"):
        runtime.predict([{"adapter": "nope", **examples[0]}])
    with pytest.raises(Exception, match="non-empty question"):
        runtime.predict([{"adapter": "lora-text", "image": examples[0]["image"], "text": " "}])
    with pytest.raises(Exception, match="image file not found"):
        runtime.predict([{"adapter": "lora-text", "image": "/nonexistent.png", "text": "what?"}])


def test_config_edit_is_caught_before_anything_loads(bundles, tmp_path):
    root, paths, _ = bundles
    shutil.copytree(paths["lora-text"], tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / CONFIG).read_text())
    config["labels"] = list(reversed(config["labels"]))
    (tmp_path / "edited" / CONFIG).write_text(json.dumps(config))
    runtime = Runtime(device="cpu", root=tmp_path)
    with pytest.raises(BundleError, match="does not match"):
        runtime.register("edited")
    assert runtime.backbones() == []


def _truncate(path):
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def _future(path):
    config = json.loads((path / CONFIG).read_text())
    config["format_version"] = 99
    (path / CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (_truncate, "corrupt or truncated"),
    (lambda p: (p / WEIGHTS).unlink(), "adapter_model.safetensors is missing"),
    (lambda p: (p / CONFIG).unlink(), "no adapter bundle"),
    (_future, "newer than this peftmm reads"),
])
def test_damaged_bundles_leave_a_serving_runtime_as_it_was(bundles, tmp_path, damage, message):
    _, paths, examples = bundles
    runtime = Runtime(device="cpu", root=tmp_path)
    shutil.copytree(paths["lora-text"], tmp_path / "good")
    runtime.register("good")
    before = (_count(runtime), runtime.backbones(), runtime.predict([{"adapter": "good", **examples[0]}]))
    shutil.copytree(paths["adapter-both"], tmp_path / "damaged")
    damage(tmp_path / "damaged")
    with pytest.raises(BundleError, match=message):
        runtime.register("damaged")
    assert runtime.names() == ["good"]
    assert (_count(runtime), runtime.backbones(), runtime.predict([{"adapter": "good", **examples[0]}])) == before


def test_mixed_lora_batch_on_an_int8_backbone(tiny_models, tmp_path, bundles):
    """peft's per-row adapters through bitsandbytes int8 layers give each row its own adapter."""
    _, _, examples = bundles
    for seed, name in enumerate(("int8-a", "int8-b")):
        torch.manual_seed(seed)
        data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
        data["text"]["precision"] = "int8"
        recipe, model, _ = build(data)
        perturb(model)
        save_bundle(model, recipe, tmp_path / name)
    runtime = Runtime(device="cpu", root=tmp_path)
    runtime.register("int8-a")
    runtime.register("int8-b")
    requests = [{"adapter": ("int8-a", "int8-b")[i % 2], **e} for i, e in enumerate(examples[:6])]
    mixed = runtime.predict(requests)
    for i, request in enumerate(requests):
        _same([mixed[i]], runtime.predict([request]))


def test_bundles_at_another_image_size_share_the_cnn(tiny_models, bundles, tmp_path):
    """A CNN takes any size: a bundle trained at 48 px shares the backbone of one at 32 px."""
    root, paths, examples = bundles
    shutil.copytree(paths["lora-text"], tmp_path / "small")
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    data["vision"]["image_size"] = 48
    recipe, model, _ = build(data)
    save_bundle(model, recipe, tmp_path / "large")
    runtime = Runtime(device="cpu", root=tmp_path)
    runtime.register("small")
    runtime.register("large")
    assert len(runtime.backbones()) == 2  # one vision, one text backbone for both
    requests = [{"adapter": name, **examples[0]} for name in ("small", "large")]
    for request, served in zip(requests, runtime.predict(requests)):
        alone = Predictor.load(tmp_path / request["adapter"], device="cpu").predict_batch([examples[0]])
        _same([served], alone)
