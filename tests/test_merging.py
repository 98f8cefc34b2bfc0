"""Adapter arithmetic: `peftmm merge` and the runtime's request-time mixes (merging.py).

Two trained tiny bundles on the same backbones (a bottleneck adapter in the MobileNetV2 vision
tower, LoRA on the bert text tower with a different alpha each); their LoRA combinations are
checked against peft's own add_weighted_adapter on a vanilla peft model.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import tiny
import torch
from click.testing import CliRunner
from helpers import batch_of, build, logits, overfit, perturb
from peft import PeftModel
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from peftmm.bundle import CONFIG, WEIGHTS, load_bundle, read_config, read_tensors, save_bundle
from peftmm.cli import main
from peftmm.errors import MergeError
from peftmm.merging import PRUNING, combination, merge_bundles
from peftmm.peft_interop import export_peft
from peftmm.runtime import Runtime

pytestmark = pytest.mark.usefixtures("keep_torch_rng")
QUESTION = "what shape is it?"


ADAPTER = {"type": "adapter", "reduction_factor": 4}   # MobileNetV2's first stage is 8 wide


def _recipe(tiny_models, text="bert", text_methods=None, **sections) -> dict:
    return tiny.recipe(tiny_models["mobilenet_v2"], tiny_models[text], vision_methods=[ADAPTER],
                       text_methods=text_methods if text_methods is not None else [{"type": "lora", "r": 4}],
                       **sections)


def _trained(recipe_dict: dict, path, seed: int):
    """A bundle trained a few steps from seed ``seed``, then perturbed: every tensor non-trivial."""
    torch.manual_seed(seed)
    recipe, model, splits = build(recipe_dict)
    overfit(model, batch_of(model, splits.train[:8]), steps=3)
    perturb(model, scale=0.1)
    return save_bundle(model, recipe, path, metrics={"test_accuracy": 0.5})


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    with torch.random.fork_rng(devices=[]):
        a = _trained(_recipe(tiny_models, text_methods=[{"type": "lora", "r": 4, "alpha": 8}]), root / "a", 1)
        b = _trained(_recipe(tiny_models, text_methods=[{"type": "lora", "r": 4, "alpha": 3}]), root / "b", 2)
    return a, b


@pytest.fixture(scope="module")
def examples(pair):
    model, _, _ = load_bundle(pair[0])
    from peftmm.data import load_splits
    from peftmm.recipe import from_dict

    splits = load_splits(from_dict(read_config(pair[0])["recipe"]).data)
    return batch_of(model, splits.test[:6]), splits.test[:3]


def test_linear_with_weights_one_and_zero_reproduces_the_first_bundle(pair, examples, tmp_path):
    out = merge_bundles(tmp_path / "merged", list(pair), combination(2, [1.0, 0.0]))
    merged, first = read_tensors(out), read_tensors(pair[0])
    assert sorted(merged) == sorted(first)
    for name, tensor in first.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name
    model, _, config = load_bundle(out)
    reference, _, _ = load_bundle(pair[0])
    assert torch.allclose(logits(model, examples[0]), logits(reference, examples[0]), atol=1e-5)
    record = config["merge"]
    assert (record["method"], record["weights"], record["density"]) == ("linear", [1.0, 0.0], None)
    assert [s["name"] for s in record["sources"]] == ["tiny", "tiny"]
    assert record["sources"][1]["weights_sha256"] == hashlib.sha256((pair[1] / WEIGHTS).read_bytes()).hexdigest()
    assert config["name"] == "merged" and config["metrics"] == {}
    card = (out / "README.md").read_text()
    assert "## Merged" in card and "`peftmm merge --method linear`" in card


def test_linear_of_two_copies_doubles_the_lora_delta_as_peft_does(pair, tmp_path):
    """peft's linear weights A and B by sqrt(w) each: copies at 0.5, 0.5 give (2 sqrt(0.5))^2 = 2
    times the LoRA delta, while the other tensors (plain weighted sums) stay as they were."""
    merged, single = read_tensors(merge_bundles(tmp_path / "twice", [pair[0], pair[0]], combination(2))), \
        read_tensors(pair[0])
    pairs = [k.removesuffix(".lora_A.default.weight") for k in single if k.endswith(".lora_A.default.weight")]
    assert pairs
    for module in pairs:
        a, b = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
        assert torch.allclose(merged[b] @ merged[a], 2 * single[b] @ single[a], atol=1e-5), module
    assert all(torch.allclose(merged[k], single[k], atol=1e-6) for k in single if ".lora_" not in k)


def test_cat_is_the_weighted_sum_of_the_lora_deltas_at_the_summed_rank(pair, examples, tmp_path):
    """cat stacks the factors: two copies at 0.5, 0.5 give the bundle back exactly (outputs and
    every delta), at rank 2r with alpha grown alike; other weights are the exact weighted sum."""
    out = merge_bundles(tmp_path / "cat", [pair[0], pair[0]], combination(2, method="cat"))
    merged, single = read_tensors(out), read_tensors(pair[0])
    lora = [k.removesuffix(".lora_A.default.weight") for k in single if k.endswith(".lora_A.default.weight")]
    for module in lora:
        a, b = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
        assert merged[a].shape[0] == 2 * single[a].shape[0] and merged[b].shape[1] == 2 * single[b].shape[1]
        assert torch.allclose(merged[b] @ merged[a], single[b] @ single[a], atol=1e-6), module
    config = read_config(out)
    assert {k: config["recipe"]["text"]["methods"][0][k] for k in ("r", "alpha")} == {"r": 8, "alpha": 16.0}
    assert config["merge"]["method"] == "cat"
    model, _, _ = load_bundle(out)
    reference, _, _ = load_bundle(pair[0])
    assert torch.allclose(logits(model, examples[0]), logits(reference, examples[0]), atol=1e-5)


def test_cat_refuses_dora(tiny_models, tmp_path):
    recipe = _recipe(tiny_models, text_methods=[{"type": "lora", "r": 2, "use_dora": True}])
    with torch.random.fork_rng(devices=[]):
        dora = _trained(recipe, tmp_path / "dora", 1)
    with pytest.raises(MergeError) as error:
        merge_bundles(tmp_path / "merged", [dora, dora], combination(2, method="cat"))
    assert str(error.value).startswith(f"{dora}: text.methods: lora: DoRA's magnitude vectors")
    assert not (tmp_path / "merged").exists()


def test_tensors_other_than_lora_are_the_weighted_sum(pair, tmp_path):
    out = merge_bundles(tmp_path / "merged", list(pair), combination(2, [0.3, 0.7]))
    merged, a, b = read_tensors(out), read_tensors(pair[0]), read_tensors(pair[1])
    others = [k for k in a if ".lora_A." not in k and ".lora_B." not in k]
    assert {k.split(".", 1)[0] for k in others} == {"vision", "fusion", "head"}   # the adapter, fusion, head
    for name in others:
        assert torch.allclose(merged[name], 0.3 * a[name] + 0.7 * b[name], atol=1e-6), name
    lora = [k for k in a if ".lora_A." in k]
    assert lora and all(not torch.allclose(merged[k], a[k]) for k in lora)


def _peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name: layer.get_delta_weight(adapter) for name, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A}


@pytest.mark.parametrize("method,density", [("linear", None), ("ties", 0.5), ("dare_linear", 0.6),
                                            ("dare_ties", 0.4), ("cat", None)])
def test_lora_combines_as_peft_add_weighted_adapter(pair, tiny_models, tmp_path, monkeypatch, method, density):
    """The merged bundle's text LoRA, exported to peft, has the delta weights that peft's own
    add_weighted_adapter gives for the two bundles' LoRAs (DARE: from the same random draws)."""
    weights, seed = [0.7, -0.4], 5
    out = merge_bundles(tmp_path / "merged", list(pair), combination(2, weights, method, density, seed))
    folders = {name: export_peft(path, "text", tmp_path / f"peft-{name}")
               for name, path in (("a", pair[0]), ("b", pair[1]), ("ours", out))}
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_models["bert"]), folders["a"], adapter_name="a")
    peft.load_adapter(folders["b"], adapter_name="b")
    peft.load_adapter(folders["ours"], adapter_name="ours")

    original, calls = LoraModel._generalized_task_arithmetic_weighted_adapter, []

    def seeded(self, *args, **kwargs):   # the merge's first layer starts from the seed, as ours does
        if not calls:
            torch.manual_seed(seed)
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)
    peft.add_weighted_adapter(["a", "b"], weights, "peft", combination_type=method, density=density)
    theirs, ours = _peft_deltas(peft, "peft"), _peft_deltas(peft, "ours")
    assert len(theirs) == 4 and sorted(theirs) == sorted(ours)   # query, value in 2 layers
    assert len(calls) == (0 if method == "cat" else 4)   # peft concatenates inline
    for name, delta in theirs.items():
        assert torch.allclose(ours[name], delta, atol=1e-6), (name, (ours[name] - delta).abs().max())
    if method in PRUNING:   # pruning made a difference: not the plain weighted sum
        linear = merge_bundles(tmp_path / "linear", list(pair), combination(2, weights))
        lora = [k for k in read_tensors(out) if ".lora_A." in k]
        assert any(not torch.allclose(read_tensors(out)[k], read_tensors(linear)[k]) for k in lora)


def test_dare_is_reproducible_with_a_seed(pair, tmp_path):
    how = combination(2, [0.5, 0.5], "dare_linear", 0.5, seed=3)
    one = read_tensors(merge_bundles(tmp_path / "one", list(pair), how))
    two = read_tensors(merge_bundles(tmp_path / "two", list(pair), how))
    other = read_tensors(merge_bundles(tmp_path / "other", list(pair), combination(2, [0.5, 0.5], "dare_linear",
                                                                                   0.5, seed=4)))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one if ".lora_A." in k)


def test_prefix_bundles_merge_by_weighted_sum(tiny_models, tmp_path):
    """Prefix tuning saves its folded prefixes; a merge averages them like any other tensor."""
    recipe = _recipe(tiny_models, text_methods=[{"type": "prefix", "length": 3, "reparam_hidden": 8}])
    with torch.random.fork_rng(devices=[]):
        a, b = _trained(recipe, tmp_path / "a", 1), _trained(recipe, tmp_path / "b", 2)
    out = merge_bundles(tmp_path / "merged", [a, b], combination(2, [0.5, 0.5]))
    merged, ta, tb = read_tensors(out), read_tensors(a), read_tensors(b)
    assert any(k.startswith("text.") for k in merged)
    assert all(torch.allclose(merged[k], 0.5 * ta[k] + 0.5 * tb[k], atol=1e-6) for k in merged)
    model, _, _ = load_bundle(out)
    assert model.methods["text"][0].registry_name == "prefix"


def test_merge_cli(pair, tmp_path):
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "soup"), str(pair[0]), str(pair[1]),
                                       "--weights", "0.5,0.5", "--method", "ties", "--density", "0.5"])
    assert result.exit_code == 0, result.output
    assert f"merged 2 bundles (ties) -> {tmp_path / 'soup'}" in result.output
    assert read_config(tmp_path / "soup")["merge"]["density"] == 0.5
    predicted = CliRunner().invoke(main, ["predict", str(tmp_path / "soup"), "--image",
                                          _image(tmp_path), "--question", QUESTION])
    assert predicted.exit_code == 0, predicted.output


def _image(folder) -> str:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "red.png")
    return str(folder / "red.png")


# -- refusals ---------------------------------------------------------------------------------------

def _resigned(source, path, change) -> str:
    """A copy of bundle ``source`` with its config changed and its weights signed again."""
    import shutil

    shutil.copytree(source, path)
    config = json.loads((path / CONFIG).read_text())
    change(config)
    (path / CONFIG).write_text(json.dumps(config))
    digest = hashlib.sha256((path / CONFIG).read_bytes()).hexdigest()
    save_file(load_file(path / WEIGHTS), path / WEIGHTS,
              metadata={"format": "peftmm", "format_version": "2", "config_sha256": digest})
    return path


def _labels_swapped(config):
    config["labels"][0], config["labels"][1] = config["labels"][1], config["labels"][0]


OTHERS = {
    "backbone": (lambda t, p, d: _trained(_recipe(t, text="llama"), d, 3),
                 "its text backbone '{llama}' has weight fingerprint"),
    "method": (lambda t, p, d: _trained(_recipe(t, text_methods=[{"type": "adapter"}]), d, 3),
               "its text methods are adapter, not lora: other methods"),
    "labels": (lambda t, p, d: _resigned(p[1], d, _labels_swapped), "its labels differ (13 labels; label 0 is"),
    "fusion": (lambda t, p, d: _trained(_recipe(t, fusion={"heads": 4}), d, 3),   # the same shapes
               ('"heads": 4', "another fusion")),
    "rank": (lambda t, p, d: _trained(_recipe(t, text_methods=[{"type": "lora", "r": 2}]), d, 3),
             "tensor text.encoder.layer.0.attention.self.query.lora_A.default.weight has shape (2, 32), not (4, 32)"),
    "targets": (lambda t, p, d: _trained(_recipe(t, text_methods=[{"type": "lora", "r": 4, "targets": ["query"]}]),
                                         d, 3), "it lacks tensor text.encoder.layer.0.attention.self.value.lora_A"),
    "full": (lambda t, p, d: _resigned(p[1], d, lambda c: c["recipe"]["vision"]["methods"].append({"type": "full"})),
             "its vision methods are adapter, full, not adapter"),
}


@pytest.mark.parametrize("what", sorted(OTHERS))
def test_bundles_that_do_not_agree_are_refused(pair, tiny_models, tmp_path, what):
    make, message = OTHERS[what]
    other = make(tiny_models, pair, tmp_path / "other")
    messages = (message,) if isinstance(message, str) else message
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MergeError) as error:
        merge_bundles(tmp_path / "merged", [pair[0], other], combination(2))
    assert str(error.value).startswith(f"{other}: "), str(error.value)
    for part in messages:
        assert part.replace("{llama}", tiny_models["llama"]) in str(error.value), str(error.value)
    assert f"only bundles that agree with {pair[0]} merge" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written, not even a temporary folder


def test_a_full_fine_tune_is_refused(pair, tmp_path):
    first = _resigned(pair[0], tmp_path / "full", lambda c: c["recipe"]["text"]["methods"].append({"type": "full"}))
    with pytest.raises(MergeError, match="its text tower is fine-tuned in full"):
        merge_bundles(tmp_path / "merged", [first, pair[1]], combination(2))


@pytest.mark.parametrize("args,message", [
    ((2, [1.0]), "1 weight for 2 bundles: give one weight per bundle"),
    ((2, [1.0, float("nan")]), "merge weight nan is not a finite number"),
    ((2, None, "ties", 0.0), "density 0.0 is out of range: it must be in (0, 1]"),
    ((2, None, "dare_ties", 1.5), "density 1.5 is out of range"),
    ((2, None, "ties"), "merge method ties prunes: give the density to keep"),
    ((2, None, "linear", 0.5), "density applies to ties, dare_linear, dare_ties only, not to linear"),
    ((2, None, "svd"), "merge method 'svd' is not known; choose one of: linear, ties, dare_linear, dare_ties, cat"),
])
def test_bad_options_are_refused(args, message):
    with pytest.raises(MergeError) as error:
        combination(*args)
    assert message in str(error.value)


def test_an_existing_output_is_kept_without_force(pair, tmp_path):
    (tmp_path / "merged").mkdir()
    with pytest.raises(MergeError, match="already exists; use --force"):
        merge_bundles(tmp_path / "merged", list(pair), combination(2))
    assert list((tmp_path / "merged").iterdir()) == []


# -- request-time mixes ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime(pair, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("served")
    for path in pair:
        shutil.copytree(path, root / path.name)
    merge_bundles(root / "merged", list(pair), combination(2, [0.25, 0.75]))
    served = Runtime(device="cpu", root=root)
    for name in ("a", "b", "merged"):
        served.register(name)
    return served


def _answers(runtime, adapter, images) -> list[dict]:
    return runtime.predict([{"adapter": adapter, "image": image, "text": QUESTION} for image in images])


def _same_answer(one: dict, other: dict) -> bool:
    """The same answer and top scores, within float tolerance (scores are rounded to 6 places)."""
    return one["answer"] == other["answer"] and [s["answer"] for s in one["scores"]] == \
        [s["answer"] for s in other["scores"]] and \
        all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(one["scores"], other["scores"]))


def test_a_mix_answers_as_the_merged_bundle(runtime, examples):
    images = [example["image"] for example in examples[1]]
    described = runtime.register_mix("mix", {"a": 0.25, "b": 0.75})
    try:
        assert described["mix"]["weights"] == [0.25, 0.75] and described["mix"]["method"] == "linear"
        assert [s["name"] for s in described["mix"]["sources"]] == ["a", "b"]
        mixed, merged = _answers(runtime, "mix", images), _answers(runtime, "merged", images)
        assert all(_same_answer(one, other) for one, other in zip(mixed, merged))
        assert not all(_same_answer(one, other) for one, other in zip(mixed, _answers(runtime, "a", images)))
        together = runtime.predict([{"adapter": name, "image": images[0], "text": QUESTION}
                                    for name in ("a", "mix", "b", "merged")])   # one call, mixed slots
        assert _same_answer(together[1], together[3]) and _same_answer(together[0], _answers(runtime, "a", images)[0])
    finally:
        runtime.unregister("mix")
    assert runtime.names() == ["a", "b", "merged"]


def test_a_cat_mix_answers_as_the_cat_merged_bundle(runtime, examples, pair, tmp_path):
    """cat grows the rank: the mix's slot is built at rank 2r in the shared towers."""
    images = [example["image"] for example in examples[1]]
    merged = merge_bundles(runtime.root / "cat-merged", list(pair), combination(2, [0.25, 0.75], "cat"))
    runtime.register("cat-merged")
    runtime.register_mix("cat-mix", {"a": 0.25, "b": 0.75}, method="cat")
    try:
        assert runtime.describe("cat-mix")["mix"]["method"] == "cat"
        mixed, written = _answers(runtime, "cat-mix", images), _answers(runtime, "cat-merged", images)
        assert all(_same_answer(one, other) for one, other in zip(mixed, written))
        assert not all(_same_answer(one, other) for one, other in zip(mixed, _answers(runtime, "merged", images)))
    finally:
        runtime.unregister("cat-mix")
        runtime.unregister("cat-merged")
        import shutil

        shutil.rmtree(merged)


def test_a_mix_outlives_its_sources(runtime, examples):
    images = [examples[1][0]["image"]]
    runtime.register_mix("kept", {"a": 0.25, "b": 0.75})
    try:
        before = _answers(runtime, "kept", images)
        runtime.unregister("b")
        assert _same_answer(_answers(runtime, "kept", images)[0], before[0])
    finally:
        runtime.unregister("kept")
        if "b" not in runtime.names():
            runtime.register("b")


def test_mix_refusals_leave_the_runtime_as_it_was(runtime, examples):
    images = [examples[1][0]["image"]]
    before = (runtime.names(), runtime.backbones(), _answers(runtime, "a", images))
    with pytest.raises(MergeError, match="density 0 is out of range"):
        runtime.register_mix("mix", {"a": 0.5, "b": 0.5}, method="ties", density=0)
    with pytest.raises(Exception, match="no adapter named 'nope' is registered"):
        runtime.register_mix("mix", {"a": 0.5, "nope": 0.5})
    with pytest.raises(Exception, match="an adapter named 'a' is already registered"):
        runtime.register_mix("a", {"a": 0.5, "b": 0.5})
    assert (runtime.names(), runtime.backbones(), _answers(runtime, "a", images)) == before


def test_the_server_registers_a_mix(runtime, examples):
    from fastapi.testclient import TestClient

    from peftmm.serve import create_app

    image = examples[1][0]["image"]
    with TestClient(create_app(runtime)) as client:
        response = client.post("/api/adapters", json={"name": "served-mix", "mix": {"a": 0.25, "b": 0.75}})
        assert response.status_code == 201, response.text
        assert response.json()["mix"]["weights"] == [0.25, 0.75]
        try:
            refused = client.post("/api/adapters", json={"bundle": "a", "mix": {"a": 1.0}})
            assert refused.status_code == 422 and "either bundle or mix, not both" in refused.json()["error"]
            refused = client.post("/api/adapters", json={"name": "m2", "mix": {"a": 1.0, "b": 1.0},
                                                         "method": "dare_ties", "density": 1.5})
            assert refused.status_code == 400 and "density 1.5 is out of range" in refused.json()["error"]
            mixed = _answers(runtime, "served-mix", [image])[0]
            assert _same_answer(mixed, _answers(runtime, "merged", [image])[0])
        finally:
            assert client.delete("/api/adapters/served-mix").status_code == 204
