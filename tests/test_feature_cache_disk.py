"""The frozen-feature cache on disk (train.feature_cache_dir, feature_store.DiskCache): a warm cache
reads bit-identical tensors without running the tower; another backbone fingerprint, precision,
image size or max_length lands in another folder; a changed image file is encoded again; a
corrupt or missing shard, a manifest that does not parse and a key.json of another key are
reported and rebuilt, never used; writes leave no temporary files; a process that must not
write does not. Tiny MobileNetV2 + BERT, a few 32 px images."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import tiny
import torch
import yaml
from PIL import Image
from safetensors.torch import save

from peftmm import RecipeError, feature_store, recipe_from_dict
from peftmm.backbones import Tower, load_tower
from peftmm.features import FeatureCache
from peftmm.recipe import load as load_recipe
from peftmm.trainer import train

TEXTS = ["what shape is it?", "what color is the shape?", "is it a circle?", "does the image not contain a square?"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(tiny.build(kind, root / kind)) for kind in ("mobilenet_v2", "bert")}


@pytest.fixture(scope="module")
def towers(backbones):
    return {"vision": load_tower("vision", backbones["mobilenet_v2"]), "text": load_tower("text", backbones["bert"])}


@pytest.fixture
def images(tmp_path) -> list[str]:
    (tmp_path / "img").mkdir()
    paths = []
    for i in range(5):
        path = tmp_path / "img" / f"{i}.png"
        Image.new("RGB", (32, 32), ((i * 53) % 256, (i * 97) % 256, 90)).save(path)
        paths.append(str(path))
    return paths


class Encoded:
    """How many inputs a tower encoded while this is active (a forward hook: the spy)."""

    def __init__(self, tower):
        self.tower, self.items = tower, 0

    def __enter__(self):
        def hook(module, args, kwargs, output):
            self.items += output[0].shape[0]
        self.handle = self.tower.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def fill(tower, keys, root=None, max_length=16, **options) -> tuple[FeatureCache, int, list[str]]:
    """A fresh cache over ``tower`` filled with ``keys``: (cache, inputs encoded, lines logged)."""
    lines: list[str] = []
    cache = FeatureCache(tower, max_length, batch_size=2, folder=root, log=lines.append, **options)
    with Encoded(tower) as spy:
        cache.fill(keys, "cpu", progress=False)
    return cache, spy.items, lines


def same(a: FeatureCache, b: FeatureCache, keys) -> bool:
    return all(a.store[k].dtype == b.store[k].dtype and torch.equal(a.store[k], b.store[k]) for k in keys)


def folder_of(cache: FeatureCache) -> Path:
    return cache.disk.folder


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if "entries read" not in line]


# -- cold, warm, and the key ------------------------------------------------------------------

@pytest.mark.parametrize("role", ["vision", "text"])
def test_a_warm_cache_reads_bit_identical_tensors_and_encodes_nothing(towers, images, tmp_path, role):
    tower, keys = towers[role], images if role == "vision" else TEXTS
    memory, _, _ = fill(tower, keys)
    cold, cold_encoded, lines = fill(tower, keys, tmp_path / "cache")
    warm, warm_encoded, warm_lines = fill(tower, keys, tmp_path / "cache")
    assert cold_encoded == len(keys) and warm_encoded == 0
    assert same(memory, cold, keys) and same(cold, warm, keys)
    assert warnings(lines + warm_lines) == []
    assert warm_lines == [f"peftmm: feature cache {folder_of(warm)}: {len(keys)} {role} entries read, "
                          "0 computed and written there"]
    folder = folder_of(cold)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith(f"{role}-")
    about = json.loads((folder / "key.json").read_text())
    assert about["key"]["fingerprint"] == tower.info.fingerprint and about["key"]["precision"] == "fp32"
    assert about["key"]["format"] == feature_store.FORMAT_VERSION
    assert about["backbone"] == tower.info.source
    assert len(manifest(folder)["shards"]) == 1


def test_only_what_is_missing_is_encoded(towers, images, tmp_path):
    fill(towers["vision"], images[:3], tmp_path)
    cache, encoded, _ = fill(towers["vision"], images, tmp_path)
    assert encoded == 2
    again, encoded, _ = fill(towers["vision"], images, tmp_path)
    assert encoded == 0 and same(cache, again, images)
    assert len(manifest(folder_of(cache))["shards"]) == 2


def _precision(towers, backbones, monkeypatch):
    return load_tower("vision", backbones["mobilenet_v2"], "bf16"), {}


def _image_size(towers, backbones, monkeypatch):
    return load_tower("vision", backbones["mobilenet_v2"], image_size=48), {}


def _fingerprint(towers, backbones, monkeypatch):
    monkeypatch.setattr(towers["vision"].info, "fingerprint", "0" * 64)
    return towers["vision"], {}


def _max_length(towers, backbones, monkeypatch):
    return towers["text"], {"max_length": 8}


@pytest.mark.parametrize("change", [_precision, _image_size, _fingerprint, _max_length],
                         ids=["precision", "image-size", "fingerprint", "max-length"])
def test_another_backbone_precision_or_preprocessing_is_another_folder(towers, backbones, images, tmp_path,
                                                                       monkeypatch, change):
    role = "text" if change is _max_length else "vision"
    keys = TEXTS if role == "text" else images
    base, _, _ = fill(towers[role], keys, tmp_path)
    before = {p.name: p.read_bytes() for p in folder_of(base).iterdir()}
    tower, options = change(towers, backbones, monkeypatch)
    other, encoded, lines = fill(tower, keys, tmp_path, **options)
    assert folder_of(other) != folder_of(base) and folder_of(other).parent == folder_of(base).parent
    assert encoded == len(keys) and warnings(lines) == []
    assert {p.name: p.read_bytes() for p in folder_of(base).iterdir()} == before   # never mixed
    memory, _, _ = fill(tower, keys, **options)
    assert same(memory, other, keys)


def test_a_changed_image_file_is_encoded_again(towers, images, tmp_path):
    old, _, _ = fill(towers["vision"], images, tmp_path)
    Image.new("RGB", (32, 32), (250, 250, 10)).save(images[2])
    stat = os.stat(images[2])
    os.utime(images[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # also where mtime is coarse
    new, encoded, lines = fill(towers["vision"], images, tmp_path)
    assert encoded == 1 and warnings(lines) == []
    # encoded alone, as here (a batch of other images can change the last bits of a CNN's output)
    alone, _, _ = fill(towers["vision"], images[2:3])
    assert same(alone, new, images[2:3]) and same(old, new, images[:2] + images[3:])
    assert not torch.equal(old.store[images[2]], new.store[images[2]])
    entries = [e["key"] for info in manifest(folder_of(new))["shards"].values() for e in info["entries"]]
    assert sorted(entries) == sorted(images)   # the new entry replaced the old one
    _, encoded, _ = fill(towers["vision"], images, tmp_path)
    assert encoded == 0


def test_an_unreadable_image_is_not_kept_on_disk(towers, images, tmp_path):
    Path(images[1]).write_bytes(b"not a png")
    reported = []

    def run():
        cache = FeatureCache(towers["vision"], folder=tmp_path, log=lambda _: None)
        cache.fill(images, "cpu", progress=False, on_bad=lambda key, error: reported.append(key))
        return cache

    cache = run()
    assert list(cache.failed) == [images[1]] and images[1] not in cache.store
    entries = [e["key"] for info in manifest(folder_of(cache))["shards"].values() for e in info["entries"]]
    assert images[1] not in entries and len(entries) == 4
    run()
    assert reported == [images[1], images[1]]   # found unreadable again, not taken from the cache


# -- damage -----------------------------------------------------------------------------------

def test_a_corrupt_shard_is_reported_once_and_rebuilt(towers, images, tmp_path):
    clean, _, _ = fill(towers["vision"], images, tmp_path)
    folder = folder_of(clean)
    (shard,) = shards(folder)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    rebuilt, encoded, lines = fill(towers["vision"], images, tmp_path)
    assert warnings(lines) == [f"peftmm: feature cache {folder}: shard {shard.name} is corrupt (checksum mismatch); "
                               "rebuilding its 5 entries"]
    assert encoded == 5 and same(clean, rebuilt, images)
    assert shard not in shards(folder) and len(shards(folder)) == 1 and shard.name not in manifest(folder)["shards"]
    warm, encoded, lines = fill(towers["vision"], images, tmp_path)
    assert encoded == 0 and warnings(lines) == [] and same(clean, warm, images)


def test_a_shard_whose_tensors_are_not_what_they_should_be_is_not_used(towers, images, tmp_path):
    """A shard that passes its checksum (the manifest re-signed) but holds float16 tensors."""
    clean, _, _ = fill(towers["vision"], images, tmp_path)
    folder = folder_of(clean)
    (shard,) = shards(folder)
    data = save({str(i): clean.store[k].half() for i, k in enumerate(images)})
    shard.write_bytes(data)
    content = manifest(folder)
    content["shards"][shard.name]["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(content))
    rebuilt, encoded, lines = fill(towers["vision"], images, tmp_path)
    width = towers["vision"].info.hidden_size
    assert len(warnings(lines)) == 1 and f"shard {shard.name} holds tensor '0' as float16 [1, {width}], " \
        f"not float32 [N, {width}]; rebuilding its 5 entries" in lines[0]
    assert encoded == 5 and same(clean, rebuilt, images)


def test_a_missing_shard_is_rebuilt(towers, images, tmp_path):
    clean, _, _ = fill(towers["vision"], images, tmp_path)
    (shard,) = shards(folder_of(clean))
    shard.unlink()
    rebuilt, encoded, lines = fill(towers["vision"], images, tmp_path)
    assert warnings(lines) == [f"peftmm: feature cache {folder_of(clean)}: shard {shard.name} is missing; "
                               "rebuilding its 5 entries"]
    assert encoded == 5 and same(clean, rebuilt, images)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "a-list", "escaping-name", "other-key"])
def test_a_manifest_that_does_not_read_back_rebuilds_the_folder(towers, images, tmp_path, damage):
    clean, _, _ = fill(towers["vision"], images, tmp_path)
    folder = folder_of(clean)
    path, text = folder / "manifest.json", (folder / "manifest.json").read_text()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"someone else's file")
    damaged = {"garbage": "{not json", "truncated": text[: len(text) // 2], "a-list": "[]",
               "escaping-name": text.replace("shard-", "../../outside.safetensors#", 1),
               "other-key": text.replace(json.loads(text)["digest"], "0" * 64)}[damage]
    path.write_text(damaged)
    rebuilt, encoded, lines = fill(towers["vision"], images, tmp_path)
    (line,) = warnings(lines)
    assert line.startswith(f"peftmm: feature cache {folder}: manifest.json is unreadable (")
    assert line.endswith("); rebuilding the whole folder")
    assert encoded == 5 and same(clean, rebuilt, images)
    assert len(shards(folder)) == 1 and outside.read_bytes() == b"someone else's file"
    _, encoded, lines = fill(towers["vision"], images, tmp_path)
    assert encoded == 0 and warnings(lines) == []


def test_a_key_json_of_another_key_rebuilds_the_folder(towers, images, tmp_path):
    clean, _, _ = fill(towers["vision"], images, tmp_path)
    folder = folder_of(clean)
    about = json.loads((folder / "key.json").read_text())
    about["key"]["precision"] = "int8"
    (folder / "key.json").write_text(json.dumps(about))
    rebuilt, encoded, lines = fill(towers["vision"], images, tmp_path)
    assert warnings(lines) == [f"peftmm: feature cache {folder}: key.json does not match this cache's key; "
                               "rebuilding the whole folder"]
    assert encoded == 5 and same(clean, rebuilt, images)
    assert json.loads((folder / "key.json").read_text())["key"]["precision"] == "fp32"


# -- writing ----------------------------------------------------------------------------------

def test_writes_leave_only_the_manifest_key_and_shards_it_names(towers, images, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_store, "SHARD_BYTES", 1)   # a shard per entry: many writes
    cache, _, _ = fill(towers["vision"], images, tmp_path)
    folder = folder_of(cache)
    named = set(manifest(folder)["shards"])
    assert len(named) == 5
    assert {p.name for p in folder.iterdir()} == named | {"key.json", "manifest.json", ".lock"}
    # what a writer killed between its shard and the manifest leaves is removed by the next one
    (folder / "shard-0123456789abcdef0123456789abcdef.safetensors").write_bytes(b"orphan")
    (folder / ".manifest.json.k1ll3d").write_bytes(b"half a manifest")
    _, encoded, lines = fill(towers["vision"], images, tmp_path)
    assert encoded == 0 and warnings(lines) == []
    assert {p.name for p in folder.iterdir()} == named | {"key.json", "manifest.json", ".lock"}


def test_what_was_encoded_before_an_error_is_kept(towers, images, tmp_path):
    """data.on_bad_sample: stop raises from inside fill: the entries encoded so far are written."""
    Path(images[3]).write_bytes(b"not a png")
    cache = FeatureCache(towers["vision"], batch_size=2, folder=tmp_path, log=lambda _: None)

    def stop(key, error):
        raise error

    with pytest.raises(Exception, match="cannot decode image"):
        cache.fill(images, "cpu", progress=False, on_bad=stop)
    entries = [e["key"] for info in manifest(cache.disk.folder)["shards"].values() for e in info["entries"]]
    assert sorted(entries) == sorted(images[:2])


def test_a_process_that_must_not_write_reads_and_computes_the_rest_in_memory(towers, images, tmp_path):
    reader, encoded, _ = fill(towers["vision"], images, tmp_path / "empty", write=False)
    assert encoded == 5 and not (tmp_path / "empty").exists()
    writer, _, _ = fill(towers["vision"], images[:3], tmp_path / "cache")
    folder = folder_of(writer)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    reader, encoded, _ = fill(towers["vision"], images, tmp_path / "cache", write=False)
    assert encoded == 2 and same(writer, reader, images[:3])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# -- the recipe key and training --------------------------------------------------------------

def test_the_recipe_key_defaults_to_memory_and_resolves_like_data_paths(tmp_path, monkeypatch):
    base = {"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"}}
    assert recipe_from_dict(base).train.feature_cache_dir is None
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump({**base, "train": {"feature_cache_dir": "../features"}}))
    assert load_recipe(path).train.feature_cache_dir == str(tmp_path / "features")
    monkeypatch.chdir(tmp_path)
    assert recipe_from_dict({**base, "train": {"feature_cache_dir": "here"}}).train.feature_cache_dir == \
        str(tmp_path / "here")
    assert recipe_from_dict({**base, "train": {"feature_cache_dir": "~/f"}}).train.feature_cache_dir == \
        os.path.expanduser("~/f")
    with pytest.raises(RecipeError, match="train.feature_cache_dir must name a folder"):
        recipe_from_dict({**base, "train": {"feature_cache_dir": " "}})
    with pytest.raises(RecipeError, match="train.feature_cache_dir must be a string, got 5"):
        recipe_from_dict({**base, "train": {"feature_cache_dir": 5}})


def test_training_twice_on_a_disk_cache_gives_the_same_metrics_and_encodes_nothing_again(backbones, tmp_path,
                                                                                        monkeypatch):
    """Vision frozen (cached), LoRA on text. The runs: memory only, cold disk cache, warm one."""
    images: list[int] = []
    forward = Tower.forward

    def counting(self, **inputs):
        if self.name == "vision":
            images.append(inputs["pixel_values"].shape[0])
        return forward(self, **inputs)

    monkeypatch.setattr(Tower, "forward", counting)
    settings = tiny.recipe(backbones["mobilenet_v2"], backbones["bert"], text_methods=[{"type": "lora", "r": 2}],
                           train={"epochs": 2})
    runs, lines = {}, {}
    for name, folder in (("memory", None), ("cold", tmp_path / "cache"), ("warm", tmp_path / "cache")):
        images.clear()
        lines[name] = []
        recipe = recipe_from_dict({**settings, "train": {**settings["train"], "feature_cache_dir":
                                                         str(folder) if folder else None}})
        result = train(recipe, tmp_path / name, progress=False, log=lines[name].append)
        runs[name] = (result.metrics, [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()],
                      list(images))

    def steady(records):   # what a run computes (its timing aside)
        return [{k: v for k, v in (r["final"] if "final" in r else r).items() if k not in ("samples_per_s",
                                                                                         "train_seconds")}
                for r in records]

    assert steady(runs["cold"][1]) == steady(runs["memory"][1]) == steady(runs["warm"][1])
    assert steady([runs["cold"][0]]) == steady([runs["warm"][0]])
    # the only vision forward pass of the warm run is load_tower's one-image probe of the width
    assert runs["warm"][2] == [1] and sum(runs["cold"][2]) > 1 and runs["cold"][2] == runs["memory"][2]
    read = [line for line in lines["warm"] if "feature cache" in line]
    assert read and all(", 0 computed" in line for line in read)
    assert not any("corrupt" in line or "unreadable" in line for name in lines for line in lines[name])
