"""Your own data: a JSONL or CSV file of images with texts and/or labels.

Each record (a JSON object per line of a ``.jsonl`` file, or a row of a ``.csv`` file with a
header) has:

- ``image``: the image file, relative to the data file's folder (or absolute);
- ``text`` and/or ``label``: at least one; a text or label that is present must not be empty.
  Which of the two a file has is fixed by its CSV header, or by the first JSONL record;
- ``split`` (optional): ``train``, ``val`` or ``test``.

Without a ``split`` column, records are split by a stable hash of their image path (so all
records of one image stay together): test when ``u < data.test_fraction``, else validation when
``(u - test_fraction) / (1 - test_fraction) < data.val_fraction``. With one, the file's splits are
kept; when it names no ``val`` records, validation is taken out of train by the same hash.
Labels are the sorted distinct ``label`` values (as strings); none when the file has no labels.

Every mistake is a :class:`DataError` naming the file and line.

Recipe::

    data:
      source: files
      path: my-data/captions.jsonl   # relative to the recipe file
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import DataError
from . import DATASETS, Splits, stable_fraction

SPLITS = ("train", "val", "test")
SUFFIXES = (".jsonl", ".csv")


@DATASETS.register("files")
def load_files(spec) -> Splits:
    path = getattr(spec, "path", None)
    if not path:
        raise DataError("data.path is required for data.source 'files' (a .jsonl or .csv file)", "data.path")
    return read_files(path, val_fraction=spec.val_fraction, test_fraction=getattr(spec, "test_fraction", 0.1))


def read_files(path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Splits:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"unknown data file type {path.suffix or '(none)'!r}; use one of: "
                        f"{', '.join(SUFFIXES)}", str(path))
    if not path.is_file():
        raise DataError("data file not found", str(path))
    reader = _jsonl if path.suffix.lower() == ".jsonl" else _csv
    examples, has_split = [], False
    columns: list[str] | None = None      # text and/or label, fixed by the header or first record
    for line, record, present in reader(path):
        where = f"{path}:{line}"
        if columns is None:
            columns = _columns(present, where)
            has_split = "split" in present
        for column in ("image", *columns):
            if column not in record:
                raise DataError(f"missing column {column!r} (columns present: {', '.join(present) or 'none'})",
                                where)
        examples.append(_example(record, columns, has_split, path, where))
    if not examples:
        raise DataError("no records", str(path))
    return _split(examples, has_split, val_fraction, test_fraction, labels="label" in columns)


def _columns(present: list[str], where: str) -> list[str]:
    if "image" not in present:
        raise DataError(f"missing column 'image' (columns present: {', '.join(present) or 'none'})", where)
    columns = [c for c in ("text", "label") if c in present]
    if not columns:
        raise DataError(f"missing column 'text' or 'label': a record needs at least one "
                        f"(columns present: {', '.join(present)})", where)
    return columns


def _example(record: dict, columns: list[str], has_split: bool, path: Path, where: str) -> dict:
    image = record["image"]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"empty image path (image = {image!r})", where)
    image_path = (path.parent / image.strip()).absolute()
    if not image_path.is_file():
        raise DataError(f"image file not found: {image.strip()} (looked for {image_path})", where)
    example = {"image": str(image_path)}
    for column in columns:
        value = record[column]
        if column == "label" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{column} must be a string, got {value!r}", where)
        if not value.strip():
            raise DataError(f"empty {column}", where)
        example[column] = value.strip() if column == "label" else value
    if has_split:
        split = record.get("split")
        split = split.strip().lower() if isinstance(split, str) else split
        if split not in SPLITS:
            raise DataError(f"split = {record.get('split')!r} is not allowed; choose one of: "
                            f"{', '.join(SPLITS)}", where)
        example["split"] = split
    example["_key"] = image.strip()
    return example


def _split(examples: list[dict], has_split: bool, val_fraction: float, test_fraction: float,
           labels: bool) -> Splits:
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    given_val = has_split and any(e["split"] == "val" for e in examples)
    for e in examples:
        u = stable_fraction(f"files/{e.pop('_key')}")
        if has_split:
            name = e.pop("split")
            if name == "train" and not given_val and u < val_fraction:
                name = "val"
        else:
            name = "test" if u < test_fraction else \
                "val" if (u - test_fraction) / (1 - test_fraction) < val_fraction else "train"
        splits[name].append(e)
    label_set = sorted({e["label"] for e in examples}) if labels else []
    return Splits(**splits, labels=label_set)


def _jsonl(path: Path):
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", f"{path}:{line}") from None
            if not isinstance(record, dict):
                raise DataError(f"a line must be a JSON object, got {type(record).__name__}", f"{path}:{line}")
            yield line, record, list(record)


def _csv(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        if not header:
            raise DataError("empty file: expected a header row (image, text and/or label)", str(path))
        reader.fieldnames = header
        try:
            for row in reader:
                if not any((v or "").strip() for k, v in row.items() if k is not None):
                    continue                      # a blank line
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                if fields != len(header):
                    raise DataError(f"{fields} fields but the header has {len(header)} "
                                    f"({', '.join(header)})", f"{path}:{reader.line_num}")
                yield reader.line_num, row, header
        except csv.Error as e:
            raise DataError(f"not valid CSV: {e}", f"{path}:{reader.line_num}") from None
