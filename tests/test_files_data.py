"""The ``files`` data source: your own JSONL/CSV of images with texts and/or labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from peftmm.data import load_splits
from peftmm.data.files import read_files
from peftmm.errors import DataError, RecipeError
from peftmm.recipe import DataSpec, from_dict

BASE = {"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"}}


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(40):
        Image.new("RGB", (8, 8), (i * 6, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_jsonl_happy_path(folder):
    records = [{"image": f"img/{i % 20}.png", "text": f"caption {i}", "label": ["cat", "dog", 3][i % 3]}
               for i in range(40)]
    path = write_jsonl(folder / "data.jsonl", records[:20] + [""] + records[20:])   # a blank line is fine
    splits = read_files(path, val_fraction=0.2, test_fraction=0.2)
    every = splits.train + splits.val + splits.test
    assert len(every) == 40 and splits.train and splits.val and splits.test
    assert splits.labels == ["3", "cat", "dog"]
    assert all(set(e) == {"image", "text", "label"} and Path(e["image"]).is_absolute() for e in every)
    assert {e["text"] for e in every} == {f"caption {i}" for i in range(40)}
    where = {}
    for name in ("train", "val", "test"):                  # both captions of an image stay together
        for e in splits[name]:
            assert where.setdefault(e["image"], name) == name
    again = read_files(path, val_fraction=0.2, test_fraction=0.2)
    assert again.train == splits.train and again.val == splits.val and again.test == splits.test


def test_csv_with_split_column(folder):
    rows = ["image,text,split"] + [f"img/{i}.png,\"a photo, number {i}\",{'test' if i < 5 else 'train'}"
                                   for i in range(40)]
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    splits = read_files(folder / "data.csv", val_fraction=0.25)
    assert len(splits.test) == 5 and all(e["text"].startswith("a photo, number ") for e in splits.test)
    assert splits.val and len(splits.train) + len(splits.val) == 35     # val carved out of train
    assert splits.labels == []
    assert "split" not in splits.train[0] and "label" not in splits.train[0]


def test_csv_keeps_a_given_validation_split(folder):
    rows = ["image,label,split", "img/0.png,a,train", "img/1.png,b,val", "img/2.png,a,test", "img/3.png,b,train"]
    (folder / "data.csv").write_text("\n".join(rows))
    splits = read_files(folder / "data.csv", val_fraction=0.5)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [2, 1, 1]
    assert splits.labels == ["a", "b"]


def test_recipe_path_is_relative_to_the_recipe_file(folder, monkeypatch):
    write_jsonl(folder / "data.jsonl", [{"image": f"img/{i}.png", "label": str(i % 2)} for i in range(40)])
    (folder / "recipes").mkdir()
    recipe_file = folder / "recipes" / "mine.yaml"
    recipe = from_dict(BASE | {"data": {"source": "files", "path": "../data.jsonl"}}, source=str(recipe_file))
    assert recipe.data.path == str(folder / "data.jsonl")
    monkeypatch.chdir("/")
    splits = load_splits(recipe.data)
    assert splits.labels == ["0", "1"] and len(splits.train + splits.val + splits.test) == 40
    # the stored recipe keeps the absolute path, so a bundle's copy still finds the file
    reloaded = from_dict(recipe.to_dict(), source="/somewhere/else/config.json")
    assert reloaded.data.path == str(folder / "data.jsonl")


def test_recipe_needs_a_path():
    with pytest.raises(RecipeError, match="data.path is required when data.source is 'files'"):
        from_dict(BASE | {"data": {"source": "files"}}, source="r.yaml")
    with pytest.raises(DataError, match="data.path is required"):
        load_splits(DataSpec(source="files"))


def bad(folder: Path, name: str, content: str) -> str:
    path = folder / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_files(path)
    return str(err.value)


def test_missing_file_and_unknown_extension(folder):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        read_files(folder / "nope.jsonl")
    message = bad(folder, "data.txt", "image,text\n")
    assert message == f"{folder / 'data.txt'}: unknown data file type '.txt'; use one of: .jsonl, .csv"


def test_missing_columns_are_named_with_those_present(folder):
    path = folder / "data.jsonl"
    assert bad(folder, "data.jsonl", '{"picture": "img/0.png", "text": "x"}\n') == \
        f"{path}:1: missing column 'image' (columns present: picture, text)"
    assert bad(folder, "data.jsonl", '{"image": "img/0.png", "caption": "x"}\n') == \
        f"{path}:1: missing column 'text' or 'label': a record needs at least one (columns present: image, caption)"
    message = bad(folder, "data.jsonl", '{"image": "img/0.png", "text": "x"}\n\n{"image": "img/1.png", "txt": "y"}\n')
    assert message == f"{path}:3: missing column 'text' (columns present: image, txt)"
    assert bad(folder, "data.csv", "img,text\nimg/0.png,x\n") == \
        f"{folder / 'data.csv'}:2: missing column 'image' (columns present: img, text)"


def test_missing_image_names_line_and_path(folder):
    message = bad(folder, "data.csv", "image,text\nimg/0.png,fine\nimg/404.png,gone\n")
    assert message.startswith(f"{folder / 'data.csv'}:3: image file not found: img/404.png (looked for ")
    assert str(folder / "img" / "404.png") in message


def test_empty_values(folder):
    path = folder / "data.jsonl"
    assert bad(folder, "data.jsonl", '{"image": "img/0.png", "text": "  "}\n') == f"{path}:1: empty text"
    assert bad(folder, "data.csv", "image,text,label\nimg/0.png,hello,\n") == f"{folder / 'data.csv'}:2: empty label"
    assert bad(folder, "data.csv", "image,text\n,hello\n") == f"{folder / 'data.csv'}:2: empty image path (image = '')"
    assert bad(folder, "data.jsonl", '{"image": "img/0.png", "text": 5}\n') == f"{path}:1: text must be a string, got 5"


def test_malformed_records(folder):
    path = folder / "data.jsonl"
    assert bad(folder, "data.jsonl", '{"image": "img/0.png", "text": "x"}\n{"image": \n').startswith(
        f"{path}:2: not valid JSON")
    assert bad(folder, "data.jsonl", '["img/0.png", "x"]\n') == f"{path}:1: a line must be a JSON object, got list"
    assert bad(folder, "data.csv", "image,text\nimg/0.png,x,extra\n") == \
        f"{folder / 'data.csv'}:2: 3 fields but the header has 2 (image, text)"
    assert bad(folder, "data.csv", "image,text,label\nimg/0.png,x\n") == \
        f"{folder / 'data.csv'}:2: 2 fields but the header has 3 (image, text, label)"
    assert bad(folder, "data.csv", "image,text,split\nimg/0.png,x,training\n") == \
        f"{folder / 'data.csv'}:2: split = 'training' is not allowed; choose one of: train, val, test"
    assert bad(folder, "data.csv", "") == (f"{folder / 'data.csv'}: empty file: "
                                           "expected a header row (image, text and/or label)")
    assert bad(folder, "data.jsonl", "\n\n") == f"{path}: no records"
