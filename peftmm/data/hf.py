"""Data sets in the Hugging Face ``datasets`` formats (``data.source: hf``).

``data.path`` is one of:

- a local folder: a ``save_to_disk`` folder (``dataset_dict.json`` or ``state.json``), else any
  folder ``datasets.load_dataset`` reads (an ``imagefolder`` with ``metadata.jsonl``/``.csv``
  and its ``file_name`` column, a folder of parquet files, ...);
- a data file: ``.parquet``, ``.arrow``, ``.json``/``.jsonl`` or ``.csv``;
- a Hub data set id (``owner/name``), only where the Hub is allowed (hub_access.py), with
  ``data.name`` (its configuration) and ``data.revision``.

``data.columns`` maps ``image``, ``text``, ``label`` and ``conversation`` to the data set's
columns (each defaults to the column of that name; ``image`` also to ``file_name``,
``conversation`` to ``conversations`` or ``messages``). ``data.splits`` maps ``train``, ``val``
and ``test`` to its splits (defaults: ``train``; ``validation``/``val``/``valid``/``dev``;
``test``). A missing val or test split is cut out of train by a stable hash of the image, as
the other sources do; ``data.val_fraction`` and ``data.test_fraction`` are the shares.

Images are never written out nor held decoded. An image cell is a path (a string, or the
``Image`` feature's ``{"path", "bytes": None}``) or embedded bytes (``{"bytes"}``, or a binary
column). An embedded image becomes a content key (images.content_key) and a reference to its
row (:class:`ArrowImage`): its bytes are read from the memory-mapped Arrow table only when a
batch or the feature cache needs them. Hashing reads every image's bytes once at load time;
the pages read are handed back to the kernel as it goes (:class:`ArrowImages`), so neither that
pass nor the feature cache's leaves the data set resident in the process.

Bad rows (a cell of the wrong type, an image cell that is neither a path nor bytes, a
conversation that does not parse) are :class:`DataError`\\ s naming the split and row; with
``data.on_bad_sample: skip`` they are left out and counted (``Splits.metadata["skipped_records"]``,
as the conversation sources do). A mapped column that does not exist is a :class:`RecipeError`
naming the key and the columns there are.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
from collections import Counter
from pathlib import Path

from ..errors import DataError, RecipeError
from ..hub_access import hub_allowed
from ..images import InMemoryImage, content_key, register_embedded
from ..safe_load import short_repr
from . import DATASETS, Splits, stable_fraction
from .conversations import BadRecord, conversation_example
from .files import SPLITS, _split

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
DEFAULT_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
DEFAULT_COLUMNS = {"image": ("image", "file_name"), "text": ("text",), "label": ("label",),
                   "conversation": ("conversation", "conversations", "messages")}
# Rows per Arrow record batch when datasets converts data files: its default (1,000 rows, unless
# it knows the column holds images) held ~2x a 3 GB parquet of embedded images in memory while
# converting; 100 rows (datasets' own size for image data sets) keeps that to a few batches.
WRITER_BATCH = 100
DONTNEED = getattr(mmap, "MADV_DONTNEED", None)   # Linux and most Unixes; elsewhere the kernel decides
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


@DATASETS.register("hf")
def load_hf(spec) -> Splits:
    where = str(spec.path)
    sets = open_dataset(spec.path, getattr(spec, "name", None), getattr(spec, "revision", None))
    chosen = _choose_splits(sets, spec.splits, where)
    root = Path(spec.path) if Path(spec.path).is_dir() else Path(spec.path).parent
    lenient = spec.on_bad_sample == "skip"
    examples, skipped, seen, first = [], Counter(), 0, None
    has_labels = has_conversation = None
    for ours, theirs in chosen.items():
        if theirs is None:
            continue
        dataset, columns = _prepared(sets[theirs], spec.columns, where)
        has_labels = "label" in columns if has_labels is None else has_labels
        has_conversation = "conversation" in columns
        source = ArrowImages(dataset, columns["image"], f"{where} [{theirs}")
        for row, record in enumerate(_rows(dataset, columns, source)):
            seen += 1
            at = f"{where} [{theirs} row {row}]"
            try:
                example = _example(record, columns, source, row, root, at, lenient)
            except BadRecord as e:
                if not lenient:
                    raise
                skipped[e.reason] += 1
                first = first or e
                continue
            example["split"] = ours
            examples.append(example)
    if not seen:
        raise DataError("the data set has no rows", where)
    if not examples:
        raise DataError(f"none of the {seen:,} rows could be used; first: {first}", where)
    _cut_missing_splits(examples, chosen, spec.val_fraction, getattr(spec, "test_fraction", 0.1))
    splits = _split(examples, True, spec.val_fraction, getattr(spec, "test_fraction", 0.1),
                    labels=bool(has_labels) and not has_conversation)
    if skipped:
        splits.metadata["skipped_records"] = {"file": where, "skipped": sum(skipped.values()), "of": seen,
                                              "reasons": dict(skipped), "first": str(first)}
    return splits


def open_dataset(path: str, name: str | None = None, revision: str | None = None) -> dict:
    """The data set's splits as ``{name: datasets.Dataset}`` (one ``train`` for a single file)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError, DatasetsError

    folder = Path(path)
    try:
        if folder.is_dir():
            if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
                loaded = datasets.load_from_disk(str(folder))
            elif _only_parquet(folder):
                loaded = datasets.load_dataset("parquet", data_dir=str(folder), **_parquet_options())
            else:
                loaded = datasets.load_dataset(str(folder), name=name, writer_batch_size=WRITER_BATCH)
        elif folder.is_file():
            builder = BUILDERS.get(folder.suffix.lower())
            if builder is None:
                raise DataError(f"unknown data file type {folder.suffix or '(none)'!r}; use one of: "
                                f"{', '.join(BUILDERS)}, or a folder", path)
            options = _parquet_options() if builder == "parquet" else {"writer_batch_size": WRITER_BATCH}
            loaded = datasets.load_dataset(builder, data_files={"train": str(folder)}, **options)
        else:
            loaded = datasets.load_dataset(_hub_id(path), name=name, revision=revision, writer_batch_size=WRITER_BATCH)
    except DatasetNotFoundError:
        raise DataError("no such data set on the Hugging Face Hub (or it is private and no token was given: "
                        "`hf auth login` or HF_TOKEN)", path) from None
    except (DatasetsError, ValueError, OSError, TypeError, ImportError) as e:
        raise DataError(f"cannot load the data set ({type(e).__name__}: {short_repr(str(e), 300)})", path) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    return dict(loaded)


def _only_parquet(folder: Path) -> bool:
    files = [f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".") and f.name != "README.md"]
    return bool(files) and all(f.suffix.lower() == ".parquet" for f in files)


def _parquet_options() -> dict:
    """How datasets converts parquet here: pyarrow's pre-buffering of whole column chunks kept
    ~1.5x a 0.9 GB file of embedded images in memory while converting it, without it ~0.4x."""
    import pyarrow.dataset as pds

    return {"writer_batch_size": WRITER_BATCH,
            "fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False)}


def _hub_id(path: str) -> str:
    if os.sep in path.strip("/").replace("/", "", 1) or path.startswith((".", "/", "~")) or not HUB_ID.fullmatch(path) \
            or ".." in path:
        raise DataError("no such file or folder (and not a Hub data set id: owner/name)", path)
    if not hub_allowed():
        raise DataError("not a local file or folder, and the Hugging Face Hub may not be reached here "
                        "(HF_HUB_OFFLINE or peftmm --offline); give a local data set", path)
    return path


def _choose_splits(sets: dict, given, where: str) -> dict[str, str | None]:
    chosen = {}
    for ours in SPLITS:
        named = getattr(given, ours)
        if named is not None:
            if named not in sets:
                raise RecipeError(f"data.splits.{ours} = {named!r}: the data set has no such split "
                                  f"(splits: {', '.join(sets)})", where)
            chosen[ours] = named
        else:
            chosen[ours] = next((s for s in DEFAULT_SPLITS[ours] if s in sets), None)
    if chosen["train"] is None:
        raise RecipeError(f"the data set has no 'train' split (splits: {', '.join(sets)}); name the one to "
                          "train on with data.splits.train", where)
    return chosen


def _prepared(dataset, given, where: str):
    """The data set with its image column left encoded, and ``{part: column}``."""
    import datasets

    present = dataset.column_names
    columns = {}
    for part, defaults in DEFAULT_COLUMNS.items():
        named = getattr(given, part)
        if named is not None:
            if named not in present:
                raise RecipeError(f"data.columns.{part} = {named!r}: no such column (columns: {', '.join(present)})",
                                  where)
            columns[part] = named
        else:
            found = next((c for c in defaults if c in present), None)
            if found is not None:
                columns[part] = found
    if "image" not in columns:
        raise RecipeError(f"no image column: name it with data.columns.image (columns: {', '.join(present)})", where)
    if not {"text", "label", "conversation"} & set(columns):
        raise RecipeError("no text, label or conversation column: name one with data.columns.text, .label or "
                          f".conversation (columns: {', '.join(present)})", where)
    if isinstance(dataset.features[columns["image"]], datasets.Image):
        dataset = dataset.cast_column(columns["image"], datasets.Image(decode=False))
    return dataset, columns


def _rows(dataset, columns: dict, source: ArrowImages):
    """Each row's cells of the mapped columns: the image cells from ``source``, the others
    through ``datasets`` (class labels as names)."""
    import datasets

    others = [c for part, c in columns.items() if part != "image"]
    label = columns.get("label")
    names = dataset.features[label] if label and isinstance(dataset.features[label], datasets.ClassLabel) else None
    images = source.cells()
    for batch in dataset.select_columns(others).iter(batch_size=1000):
        for i in range(len(batch[others[0]])):
            record = {c: batch[c][i] for c in others}
            if names is not None and isinstance(record[label], int) and 0 <= record[label] < names.num_classes:
                record[label] = names.int2str(record[label])
            record[columns["image"]] = next(images)
            yield record


def _example(record: dict, columns: dict, source: ArrowImages, row: int, root: Path, where: str,
             lenient: bool) -> dict:
    image, key = _image(record[columns["image"]], columns["image"], source, row, root, where, lenient)
    if "conversation" in columns:
        example = conversation_example(_turns(record[columns["conversation"]], columns["conversation"], where),
                                       [(columns["image"], image)], where)
    else:
        example = {"image": image}
    for part in ("text", "label"):
        if part not in columns or "conversation" in columns:
            continue
        value = record[columns[part]]
        if part == "label" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise BadRecord("wrong type", f"{columns[part]}: {part} must be a string, got {short_repr(value)}", where)
        if not value.strip() and not (lenient and part == "text"):
            raise BadRecord(f"empty {part}", f"{columns[part]}: empty {part}", where)
        example[part] = value.strip() if part == "label" else value
    example["_key"], example["_where"] = key, where
    return example


def _image(cell, column: str, source: ArrowImages, row: int, root: Path, where: str, lenient: bool):
    """(what the example holds as its image, the key its split is hashed on)."""
    data = path = None
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, (bytes, bytearray)):
        data = cell
    elif isinstance(cell, str):
        path = cell
    if isinstance(data, (bytes, bytearray)) and data:
        key = content_key(bytes(data))
        register_embedded(key, ArrowImage(source, row))
        return key, key
    if isinstance(path, str) and path.strip():
        if path.startswith(("http://", "https://", "data:")):
            raise BadRecord("remote image", f"{column}: image {path[:60]!r}: only local files and embedded "
                            "bytes are read", where)
        full = (root / path.strip()).absolute()
        if not full.is_file() and not lenient:
            raise BadRecord("image not found", f"{column}: image file not found: {path} (looked for {full})", where)
        inside = full.is_relative_to(root.absolute())   # split by the path as the data set writes it
        return str(full), str(full.relative_to(root.absolute())) if inside else path.strip()
    raise BadRecord("not an image", f"{column}: the image cell is neither a path nor bytes "
                    f"(got {short_repr(cell, 80)})", where)


def _turns(cell, column: str, where: str) -> list[tuple[str, str, str]]:
    """A conversation cell (chat messages ``{role, content}`` or LLaVA ``{from, value}``) as turns."""
    if not isinstance(cell, list):
        raise BadRecord("wrong type", f"{column}: a conversation must be a list of turns, got {short_repr(cell, 80)}",
                        where)
    turns = []
    for j, turn in enumerate(cell):
        if not isinstance(turn, dict):
            raise BadRecord("wrong type", f"{column}[{j}]: a turn must be an object", where)
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value", turn.get("text")))
        if isinstance(text, list):   # content parts: texts, and an image part where the image goes
            text = " ".join("<image>" if isinstance(p, dict) and p.get("type") in ("image", "image_url")
                            else str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in text)
        turns.append((role, text, f"{column}[{j}]"))
    return turns


def _cut_missing_splits(examples: list[dict], chosen: dict, val_fraction: float, test_fraction: float) -> None:
    """A val or test split the data set lacks comes out of train by a stable hash of the image."""
    missing_test, missing_val = chosen["test"] is None, chosen["val"] is None
    for e in examples:
        if e["split"] != "train":
            continue
        u = stable_fraction(f"hf/{e['_key']}")
        if missing_test and u < test_fraction:
            e["split"] = "test"
        elif missing_val and ((u - test_fraction) / (1 - test_fraction) if missing_test else u) < val_fraction:
            e["split"] = "val"


class ArrowImages:
    """The image column of one split, over the data set's Arrow files mapped into memory.

    The files are mapped here (not through ``datasets``' own mapping) so that the pages read can
    be handed back: after every :data:`RELEASE_BYTES` read, ``madvise(MADV_DONTNEED)`` drops them
    from this process (they stay in the page cache, shared, and are read again if needed). So a
    pass over every image (the hashing at load time, the feature cache's fill) does not leave the
    whole data set resident in the process. A data set without Arrow files (built in memory) is
    read from its own table.
    """

    RELEASE_BYTES = 32 * 2**20

    def __init__(self, dataset, column: str, where: str):
        import pyarrow as pa

        self.where, self.maps, self.pending, self.lock = where, [], 0, threading.Lock()
        chunks = []
        try:
            for entry in dataset.cache_files:
                with open(entry["filename"], "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self.maps.append(mapped)
                chunks += pa.ipc.open_stream(pa.py_buffer(mapped)).read_all().column(column).chunks
        except (OSError, ValueError, KeyError, pa.ArrowException):
            chunks = []
        # the files' rows are the data set's rows only without an indices mapping (select, shuffle)
        if chunks and sum(len(c) for c in chunks) == len(dataset):
            self.column = pa.chunked_array(chunks)
        else:
            self.maps = []
            self.column = dataset.data.column(column)

    def cells(self):
        """Every row's cell, in order (the bytes of one slice at a time)."""
        for chunk in self.column.chunks:
            for start in range(0, len(chunk), 64):
                part = chunk.slice(start, 64)
                cells = part.to_pylist()
                self._read(part.nbytes)
                yield from cells

    def cell(self, row: int):
        value = self.column[row].as_py()
        self._read(len(value["bytes"] or b"") if isinstance(value, dict) else len(value or b""))
        return value

    def _read(self, size: int) -> None:
        with self.lock:
            self.pending += size
            if self.pending < self.RELEASE_BYTES or not self.maps:
                return
            self.pending = 0
            for mapped in self.maps if DONTNEED is not None else ():
                mapped.madvise(DONTNEED)


class ArrowImage(InMemoryImage):
    """One embedded image: the split's column and a row (a few dozen bytes per image)."""

    __slots__ = ("images", "row")

    def __init__(self, images: ArrowImages, row: int):
        self.images, self.row = images, row

    @property
    def where(self) -> str:
        return f"{self.images.where} row {self.row}]"

    def read(self) -> bytes:
        cell = self.images.cell(self.row)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise DataError("the embedded image has no bytes", self.where)
        return data
