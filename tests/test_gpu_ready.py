"""What makes CUDA runs right, checked on CPU: the precision a bundle records and inference runs
under, memories that stay on the model's device, threaded image decoding that changes nothing."""

import json
import shutil

import pytest
import tiny
import torch
from helpers import build

from peftmm.batching import Batcher, image_workers
from peftmm.bundle import read_config
from peftmm.data.skips import SplitLog
from peftmm.errors import BundleError, DataError
from peftmm.predict import Predictor
from peftmm.tasks.captioning.memory import CaptionMemory
from peftmm.tasks.retrieval.memory import PairMemory


def test_a_bundle_records_its_training_precision_and_cpu_inference_stays_fp32(cli_run):
    _, run, _ = cli_run
    config = read_config(run / "bundle")
    assert config["precision"] == {"mixed_precision": "no", "device": "cpu", "capability": None}
    predictor = Predictor.load(run, device="cpu")
    before = torch.get_float32_matmul_precision()
    with predictor.precision():
        assert not torch.is_autocast_enabled("cpu") and torch.get_float32_matmul_precision() == before


def test_a_damaged_precision_record_is_refused(cli_run, tmp_path):
    bundle = shutil.copytree(cli_run[1] / "bundle", tmp_path / "bundle")
    config = json.loads((bundle / "adapter_config.json").read_text())
    config["precision"] = {"mixed_precision": "int4"}
    (bundle / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="'precision' must be an object whose mixed_precision is no, bf16 or fp16"):
        read_config(bundle)


def test_memories_follow_the_model_and_are_not_copied_per_call(tiny_models):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    data["task"] = {"type": "retrieval", "memory_neighbours": 2}
    data["fusion"] = {"type": "dual-projection", "dim": 16}
    _, model, _ = build(data)
    model.task.memory = PairMemory.build(torch.randn(5, 16), torch.randn(5, 16))
    stored = model.task.memory.images
    queries = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    model.task.memory.bridge(queries, queries, 2, 0.1)
    assert model.task.memory.images is stored          # used where it lives, not copied into place
    model.to("meta")                                   # any device: the memory follows the head
    assert model.task.memory.images.device.type == model.task.memory.texts.device.type == "meta"
    captions = CaptionMemory(torch.randn(4, 8).half(), torch.zeros(4, 3, dtype=torch.int32), torch.arange(4))
    captions.nearest(torch.randn(2, 8), 2)
    assert captions.to("meta").keys.device.type == captions.hashes.device.type == "meta"
    assert captions.ids.device.type == "cpu"           # read into Python lists: stays on the host


def test_threaded_image_decoding_gives_the_same_batches_and_skips(tiny_models, tmp_path):
    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], vision_methods=[{"type": "lora", "r": 2}])
    _, model, splits = build(data)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    examples = splits.train[:12] + [{**splits.train[0], "image": str(broken)}] + splits.train[12:20]
    assert image_workers(None, {}) >= 1 and image_workers(None, {"vision": object()}) == 0
    assert image_workers(0, {}) == 0
    plain, threaded = SplitLog("train"), SplitLog("train")
    expected = Batcher(model, skips=plain)(examples)
    got = Batcher(model, skips=threaded, workers=3)(examples)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert (plain.seen, dict(plain.reasons), len(plain.ever)) == (threaded.seen, dict(threaded.reasons), 1)
    with pytest.raises(DataError, match="broken.png"):      # prediction: the bad image raises
        Batcher(model, workers=2)(examples)


class _Barrier:
    """accelerate's barrier as one of two processes sees it: records when this one waits."""

    def __init__(self, main: bool, events: list):
        self.num_processes, self.is_main_process, self.events = 2, main, events

    def wait_for_everyone(self):
        self.events.append("barrier")


def test_under_several_processes_only_the_main_one_encodes_the_cache(tiny_models, tmp_path):
    from peftmm.trainer import build_caches, fill_caches

    data = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    recipe, model, splits = build(data)
    assert recipe.train.feature_cache_dir is None     # no folder named: the run's shared one is used
    events: list = []
    main = build_caches(model, recipe, events.append, write=True, shared=tmp_path / "shared")
    other = build_caches(model, recipe, events.append, write=False, shared=tmp_path / "shared")
    assert list(main) == ["vision"]
    fill_caches(main, model, splits.train, "cpu", progress=False, accelerator=_Barrier(True, events))
    fill_caches(other, model, splits.train, "cpu", progress=False, accelerator=_Barrier(False, events))
    images = len({e["image"] for e in splits.train})
    assert events[0].endswith(f"0 vision entries read, {images:,} computed and written there")
    assert events[1:3] == ["barrier", "barrier"]      # the main one releases the others only when done
    assert events[3].endswith(f"{images:,} vision entries read, 0 computed and kept in memory")
    assert all(torch.equal(main["vision"].store[k], other["vision"].store[k]) for k in main["vision"].store)
