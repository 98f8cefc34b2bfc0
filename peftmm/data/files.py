"""Your own data: a JSONL or CSV file of images with texts and/or labels.

Each record (a JSON object per line of a ``.jsonl`` file, or a row of a ``.csv`` file with a
header) has:

- ``image`` (or ``file_name``, as an ``imagefolder``'s metadata names it): the image file,
  relative to the data file's folder (or absolute);
- ``text`` and/or ``label``: at least one; a text or label that is present must not be empty.
  Which of the two a file has is fixed by its CSV header, or by the first JSONL record;
- ``split`` (optional): ``train``, ``val`` or ``test``.

Without a ``split`` column, records are split by a stable hash of their image path (so all
records of one image stay together): test when ``u < data.test_fraction``, else validation when
``(u - test_fraction) / (1 - test_fraction) < data.val_fraction``. With one, the file's splits are
kept; when it names no ``val`` records, validation is taken out of train by the same hash.
Labels are the sorted distinct ``label`` values (as strings); none when the file has no labels.
A classifier learns only the labels of train, so a val or test label that never occurs in train
is an error for the tasks that classify into labels (see :func:`check_labels_in_train`).

Every mistake is a :class:`DataError` naming the file and line. Two of them are the training
run's to handle when ``data.on_bad_sample`` is ``skip`` (the recipe's default): a missing image
file and an empty ``text`` are kept here, then left out of training and counted by the batcher,
like an image that exists but cannot be decoded (see :mod:`peftmm.data.skips`).

Recipe::

    data:
      source: files
      path: my-data/captions.jsonl   # relative to the recipe file
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import DataError
from ..safe_load import load_json, short_repr, utf8_text
from . import DATASETS, Splits, stable_fraction

SPLITS = ("train", "val", "test")
SUFFIXES = (".jsonl", ".csv")


@DATASETS.register("files")
def load_files(spec) -> Splits:
    path = getattr(spec, "path", None)
    if not path:
        raise DataError("data.path is required for data.source 'files' (a .jsonl or .csv file)", "data.path")
    return read_files(path, val_fraction=spec.val_fraction, test_fraction=getattr(spec, "test_fraction", 0.1),
                      on_bad_sample=getattr(spec, "on_bad_sample", "stop"))


def read_files(path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1,
               on_bad_sample: str = "stop") -> Splits:
    """``on_bad_sample='skip'`` keeps records with a missing image or an empty text (see above)."""
    path = Path(path)
    lenient = on_bad_sample == "skip"
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"unknown data file type {path.suffix or '(none)'!r}; use one of: "
                        f"{', '.join(SUFFIXES)}", str(path))
    if not path.is_file():
        raise DataError("data file not found", str(path))
    reader = _jsonl if path.suffix.lower() == ".jsonl" else _csv
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the data file ({e.strerror})", str(path)) from None
    text = utf8_text(raw, str(path), DataError)
    examples, has_split = [], False
    columns: list[str] | None = None      # text and/or label, fixed by the header or first record
    for line, record, present in reader(path, text):
        where = f"{path}:{line}"
        if columns is None:
            columns = _columns(present, where)
            has_split = "split" in present
        if "image" not in record and "file_name" in present:
            record["image"] = record.pop("file_name", None)
        for column in ("image", *columns):
            if column not in record:
                raise DataError(f"missing column {column!r} (columns present: {', '.join(present) or 'none'})",
                                where)
        examples.append(_example(record, columns, has_split, path, where, lenient))
    if not examples:
        raise DataError("no records", str(path))
    return _split(examples, has_split, val_fraction, test_fraction, labels="label" in columns)


def _columns(present: list[str], where: str) -> list[str]:
    if "image" not in present and "file_name" not in present:
        raise DataError(f"missing column 'image' or 'file_name' (columns present: {', '.join(present) or 'none'})",
                        where)
    columns = [c for c in ("text", "label") if c in present]
    if not columns:
        raise DataError(f"missing column 'text' or 'label': a record needs at least one "
                        f"(columns present: {', '.join(present)})", where)
    return columns


def _example(record: dict, columns: list[str], has_split: bool, path: Path, where: str, lenient: bool) -> dict:
    image = record["image"]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"empty image path (image = {short_repr(image)})", where)
    image_path = (path.parent / image.strip()).absolute()
    if not image_path.is_file() and not lenient:
        raise DataError(f"image file not found: {image.strip()} (looked for {image_path})", where)
    example = {"image": str(image_path)}
    for column in columns:
        value = record[column]
        if column == "label" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{column} must be a string, got {short_repr(value)}", where)
        if not value.strip() and not (lenient and column == "text"):
            raise DataError(f"empty {column}", where)
        example[column] = value.strip() if column == "label" else value
    if has_split:
        split = record.get("split")
        split = split.strip().lower() if isinstance(split, str) else split
        if split not in SPLITS:
            raise DataError(f"split = {short_repr(record.get('split'))} is not allowed; choose one of: "
                            f"{', '.join(SPLITS)}", where)
        example["split"] = split
    example["_key"], example["_where"] = image.strip(), where
    return example


def _split(examples: list[dict], has_split: bool, val_fraction: float, test_fraction: float,
           labels: bool) -> Splits:
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    given_val = has_split and any(e["split"] == "val" for e in examples)
    where: dict[int, str] = {}
    for e in examples:
        where[id(e)] = e.pop("_where")
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
    trained = {e["label"] for e in splits["train"]} if labels else set()
    unseen = [(where[id(e)], e["label"], name) for name in ("val", "test") for e in splits[name]
              if labels and e["label"] not in trained]
    return Splits(**splits, labels=label_set, metadata={"labels_not_in_train": unseen} if unseen else {})


def check_labels_in_train(splits: Splits) -> None:
    """One DataError for the first val/test record whose label no train record has.

    The label set covers every split, so the classifier has an output for such a label, but no
    training example ever asks for it: it would count as wrong on every such example and
    hide a split that needs fixing (records of the label in train, or a ``split`` column).
    """
    unseen = splits.metadata.get("labels_not_in_train")
    if not unseen:
        return
    where, label, name = unseen[0]
    known = sorted({e["label"] for e in splits.train})
    shown = ", ".join(known[:30]) + (f", ... ({len(known)} in all)" if len(known) > 30 else "")
    more = f"; {len(unseen) - 1} more val/test records have labels not in train" if len(unseen) > 1 else ""
    raise DataError(f"label {label!r} of this {name} record never occurs in train, so the classifier is never "
                    f"trained to predict it{more}; labels in train: {shown or 'none'}. Give it train records "
                    "(or assign splits with a 'split' column)", where)


def _jsonl(path: Path, text: str):
    for line, content in enumerate(text.split("\n"), 1):   # not splitlines(): JSON strings may hold U+2028
        if not content.strip():
            continue
        record = load_json(content, f"{path}:{line}", DataError)
        if not isinstance(record, dict):
            raise DataError(f"a line must be a JSON object, got {type(record).__name__}", f"{path}:{line}")
        yield line, record, list(record)


def _csv(path: Path, text: str):
    with io.StringIO(text, newline="") as f:
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
