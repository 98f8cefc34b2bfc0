"""Retrieval through the training pairs (task.memory_neighbours, tasks/retrieval/memory.py): the
bridge's known values, how it mixes into recall, and the memory built after training with the
best weights, saved in the bundle and used by eval and zero-shot labels."""

import json

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save as save_tensors

from peftmm.bundle import BundleError, load_bundle, read_tensors
from peftmm.cli import main
from peftmm.data import load_splits
from peftmm.predict import Predictor, evaluate_bundle
from peftmm.tasks.retrieval import RetrievalTask
from peftmm.tasks.retrieval.memory import PairMemory, _neighbour_mean

E = torch.eye(4)


def test_bridge_goes_through_the_nearest_pairs():
    # pair 0: image e0 with text e2; pair 1: image e1 with text e3
    memory = PairMemory.build(E[[0, 1]], E[[2, 3]])
    bridge = memory.bridge(E[[0, 1]], E[[2, 3]], k=1, temperature=0.05)
    # image e0's nearest training image is pair 0, whose text is e2; text e2's nearest training
    # text is pair 0, whose image is e0: both halves give 1 for (e0, e2), 0 across the pairs
    assert torch.allclose(bridge, torch.eye(2), atol=1e-3)
    # k = 2 and a query text halfway between the two memory texts: equal weights on both pairs
    halfway = torch.nn.functional.normalize(E[2] + E[3], dim=0)[None]
    bridge = memory.bridge(E[[0]], halfway, k=2, temperature=0.05)
    text_half = 0.5 * 1 + 0.5 * 0          # images e0, e1 weighted equally, against image e0
    image_half = halfway[0] @ E[2]          # image e0 -> pair 0's text e2, against the query text
    assert torch.allclose(bridge, ((text_half + image_half) / 2).reshape(1, 1), atol=1e-4)
    # queries go in chunks: any chunk size gives the same stand-ins
    torch.manual_seed(0)
    queries, keys, values = (torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for n in (7, 20, 20))
    assert torch.allclose(_neighbour_mean(queries, keys, values, 3, 0.1, chunk=2),
                          _neighbour_mean(queries, keys, values, 3, 0.1), atol=1e-6)


def test_memory_mixes_into_recall():
    """Direct cosines that swap two pairs; the training pairs know better."""
    task = RetrievalTask(RetrievalTask.Config(memory_neighbours=1, memory_weight=0.7), [])
    images, texts = E[[0, 1]], torch.nn.functional.normalize(E[[2, 3]] + 0.6 * E[[1, 0]], dim=-1)
    outputs = torch.cat([images, texts], 1)
    assert task.metrics(outputs, None)["t2i_r1"] == 0.0     # no memory yet: the plain cosine
    task.memory = PairMemory.build(E[[0, 1]], E[[2, 3]])
    assert task.metrics(outputs, None)["t2i_r1"] == 1.0
    task.config.memory_weight = 0.0
    assert task.metrics(outputs, None)["t2i_r1"] == 0.0
    with pytest.raises(ValueError, match="image embeddings for"):
        PairMemory(E[[0, 1]], E[[2]])


def _recipe(tiny_models, **task) -> dict:
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    data["task"] = {"type": "retrieval", **task}
    data["fusion"] = {"type": "dual-projection", "dim": 16}
    return data


def test_trained_bundle_carries_the_pair_memory(tiny_models, tmp_path):
    recipe = tmp_path / "retrieval.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_models, memory_neighbours=3)))
    result = CliRunner().invoke(main, ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    final = json.loads(result.output[result.output.index("{"):])
    bundle = tmp_path / "run" / "bundle"
    tensors = read_tensors(bundle)
    model, loaded_recipe, _ = load_bundle(bundle)
    train = load_splits(loaded_recipe.data).train
    pairs = {(e["image"], e["text"]) for e in train}
    assert tensors["memory.images"].shape == tensors["memory.texts"].shape == (len(pairs), 16)
    assert tensors["memory.images"].dtype == torch.float16
    assert torch.equal(model.task.memory.images, tensors["memory.images"])
    assert f"pair memory: {len(pairs):,} training image-text pairs" in (bundle / "README.md").read_text()
    # eval of the bundle reproduces the run's test metrics, memory included
    again = evaluate_bundle(bundle, "test", progress=False, device="cpu")
    assert again["mean_recall"] == pytest.approx(final["test_mean_recall"], abs=1e-6)
    # zero-shot labels go through the memory too
    predictor = Predictor.load(bundle, device="cpu")
    image = load_splits(loaded_recipe.data).test[0]["image"]
    with_memory = predictor.classify(image, ["circle", "triangle", "square"], "a {} shape")
    predictor.model.task.memory = None
    without = predictor.classify(image, ["circle", "triangle", "square"], "a {} shape")
    assert with_memory["scores"] != without["scores"]
    # the multi-adapter runtime scores pairs through the memory as the bundle loaded alone does
    from peftmm.runtime import Runtime

    runtime = Runtime(device="cpu", root=tmp_path / "run")
    runtime.register("bundle")
    pairs = [{"image": e["image"], "text": e["text"]} for e in load_splits(loaded_recipe.data).test[:3]]
    served = runtime.predict([{"adapter": "bundle", **p} for p in pairs])
    expected = Predictor.load(bundle, device="cpu").predict_batch(pairs)
    assert [r["similarity"] for r in served] == pytest.approx([r["similarity"] for r in expected], abs=1e-5)
    # a bundle whose memory is gone is refused, naming the tensor
    del tensors["memory.texts"]
    from safetensors import safe_open

    with safe_open(str(bundle / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
    (bundle / "adapter_model.safetensors").write_bytes(save_tensors(tensors, metadata=metadata))
    with pytest.raises(BundleError, match="memory.texts"):
        load_bundle(bundle)


def test_without_memory_neighbours_nothing_is_kept(tiny_models, tmp_path):
    recipe = tmp_path / "retrieval.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_models)))
    result = CliRunner().invoke(main, ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not any(k.startswith("memory.") for k in read_tensors(tmp_path / "run" / "bundle"))


def test_unreadable_images_and_empty_texts_stay_out_of_the_memory(tiny_models, tmp_path):
    from helpers import build

    from peftmm.batching import Batcher
    from peftmm.data.skips import SplitLog

    _, model, splits = build(_recipe(tiny_models, memory_neighbours=2))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    usable = splits.train[:6]
    extra = [{"image": str(broken), "text": "a broken image"}, {"image": usable[0]["image"], "text": "  "}]
    model.task.finish(model, usable + usable[:2] + extra, Batcher(model, None, SplitLog("train")), "cpu")
    assert len(model.task.memory) == len({(e["image"], e["text"]) for e in usable})
    assert model.task.memory.images.shape[-1] == 16
