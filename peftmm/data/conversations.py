"""Conversation data: LLaVA's JSON and chat-messages JSONL, read into one example shape.

Two sources (recipe ``data.source``), each with ``data.path`` relative to the recipe file:

- ``llava``: a ``.json`` file holding a list of records ``{"id", "image", "conversations":
  [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is ...?"}, ...]}``.
- ``messages``: a ``.jsonl`` file, one record per line, ``{"messages": [{"role": "user",
  "content": [{"type": "image", "image": PATH}, {"type": "text", "text": "..."}]},
  {"role": "assistant", "content": "..."}]}``; ``content`` is a string or a list of parts
  (``text``; ``image`` with the path under ``image``, ``path`` or ``url``; ``image_url`` with a
  local path as ``url``). A record may instead give ``"images": [PATH]`` and put ``<image>`` in a
  string content, as LLaMA-Factory and ms-swift write it.

Both accept the roles of both vocabularies (human/user, gpt/assistant, system). Image paths are
relative to ``data.image_root`` when the recipe gives one, else to the data file's folder (or
absolute). A record may carry ``split`` (train/val/test) as in :mod:`peftmm.data.files`; without
one, records are split by a stable hash of their image path exactly as ``files`` splits them
(all conversations about one image stay in one split). ``Splits.labels`` is empty: answers are
text to generate, not classes.

Every example, from these sources and from the conversation views of the built-in ones
(:mod:`peftmm.data.conversation_views`), has this shape::

    {"image": "/abs/path.png",
     "conversation": [{"role": "system", "text": "Answer in one word.", "images": 0},
                      {"role": "user", "text": "<image>\\nWhat shape is it?", "images": 1},
                      {"role": "assistant", "text": "circle", "images": 0}, ...],
     "text": "What shape is it?",     # the first user turn, placeholders taken out
     "label": "circle",               # the last assistant turn
     "id": "000123"}                  # when the record has one

``images`` counts the ``<image>`` placeholders of a turn (where the image's tokens go); a
conversation without one gets the image at the start of its first user turn
(:mod:`peftmm.tasks.instruct_prompt`). One image per conversation: the model sees one picture.
``text`` and ``label`` keep code that reads them (feature caching, bad-sample checks) working.

Bad records: each one is a :class:`DataError` naming the file, the line (and the record's index
in a LLaVA list) and the field: no image, more than one image, more ``<image>`` placeholders than
images, an unknown role, a system turn after the start, a conversation that does not start with
the user, no assistant turn, an empty answer, a malformed JSONL line, a line that is not UTF-8.
With ``data.on_bad_sample: skip`` such records are left out and counted in
``Splits.metadata["skipped_records"]`` (see :func:`skipped_line`); a missing image file is kept
for the batcher to count, as ``files`` does. A LLaVA file that is not valid JSON or not UTF-8 as
a whole is always an error (nothing after the mistake can be read).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import DataError
from . import DATASETS, Splits
from .files import SPLITS, _split

IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRecord(DataError):
    """A record that ``on_bad_sample: skip`` may leave out; ``reason`` is its short name for counting."""

    def __init__(self, reason: str, message: str, where: str):
        super().__init__(message, where)
        self.reason = reason


@DATASETS.register("llava")
def load_llava(spec) -> Splits:
    return read_conversations(_path(spec, "llava", ".json"), "llava", **_options(spec))


@DATASETS.register("messages")
def load_messages(spec) -> Splits:
    return read_conversations(_path(spec, "messages", ".jsonl"), "messages", **_options(spec))


def _path(spec, source: str, suffix: str) -> Path:
    path = getattr(spec, "path", None)
    if not path:
        raise DataError(f"data.path is required for data.source {source!r} (a {suffix} file)", "data.path")
    return Path(path)


def _options(spec) -> dict:
    return {"image_root": getattr(spec, "image_root", None), "val_fraction": spec.val_fraction,
            "test_fraction": getattr(spec, "test_fraction", 0.1),
            "on_bad_sample": getattr(spec, "on_bad_sample", "stop")}


def read_conversations(path: str | Path, kind: str, image_root: str | Path | None = None,
                       val_fraction: float = 0.1, test_fraction: float = 0.1, on_bad_sample: str = "stop") -> Splits:
    """Read a ``kind`` (``llava`` or ``messages``) file into splits of conversation examples."""
    path = Path(path)
    suffix = {"llava": ".json", "messages": ".jsonl"}[kind]
    if path.suffix.lower() != suffix:
        raise DataError(f"data.source {kind!r} reads a {suffix} file, not {path.suffix or '(no suffix)'!r}", str(path))
    if not path.is_file():
        raise DataError("data file not found", str(path))
    if image_root is not None and not Path(image_root).is_dir():
        raise DataError(f"data.image_root is not a folder: {image_root}", str(path))
    root = Path(image_root) if image_root is not None else path.parent
    lenient = on_bad_sample == "skip"
    records = _llava_records(path) if kind == "llava" else _jsonl_records(path)
    parse = _llava_turns if kind == "llava" else _message_turns
    examples, skipped, seen, has_split = [], Counter(), 0, None
    first_skipped: DataError | None = None
    for where, record in records:
        seen += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            if not isinstance(record, dict):
                raise BadRecord("not an object", f"a record must be a JSON object, got {type(record).__name__}",
                                where)
            turns, images = parse(record, where)
            example = conversation_example(turns, images, where)
            example["image"] = _image_path(example["image"], root, where, lenient)
            if "id" in record:
                example["id"] = str(record["id"])
            if has_split is None:
                has_split = "split" in record
            example["split"] = _split_of(record, has_split, where)
        except BadRecord as e:
            if not lenient:
                raise
            skipped[e.reason] += 1
            first_skipped = first_skipped or e
            continue
        example["_key"], example["_where"] = images[0][1], where   # the path as written: stable across machines
        examples.append(example)
    if not seen:
        raise DataError("no records", str(path))
    if not examples:
        raise DataError(f"none of the {seen:,} records could be used ({_reasons(skipped)}); first: {first_skipped}",
                        str(path))
    for e in examples:
        if not has_split:
            del e["split"]
    splits = _split(examples, bool(has_split), val_fraction, test_fraction, labels=False)
    if skipped:
        splits.metadata["skipped_records"] = {"file": str(path), "skipped": sum(skipped.values()), "of": seen,
                                              "reasons": dict(skipped), "first": str(first_skipped)}
    return splits


def skipped_line(splits: Splits) -> str | None:
    """The one warning line for the records a conversation source left out, or None."""
    info = splits.metadata.get("skipped_records")
    if not info:
        return None
    return (f"peftmm: data: skipped {info['skipped']:,} of {info['of']:,} records of {info['file']} "
            f"({_reasons(Counter(info['reasons']))}); first: {info['first']}")


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{reason}: {n:,}" for reason, n in sorted(counts.items()))


# ---------------------------------------------------------------- one conversation

def conversation_example(turns: list[tuple[str, str, str]], images: list[tuple[str, str]], where: str) -> dict:
    """The example of ``turns`` (role as written, text, field name) and ``images`` ((field, path)).

    Raises :class:`BadRecord` naming ``where`` and the field for every rule of the module docstring.
    """
    if not images:
        raise BadRecord("no image", "no image: every conversation needs one (an 'image' field or an image part)",
                        where)
    if len(images) > 1:
        raise BadRecord("several images", f"{len(images)} images ({', '.join(f for f, _ in images)}): a conversation "
                        "takes one image", where)
    conversation = normalise_turns(turns, where)
    placeholders = sum(t["images"] for t in conversation)
    if placeholders > len(images):
        field = next(f for (_, _, f), t in zip(turns, conversation) if t["images"])
        raise BadRecord("placeholders", f"{field}: {placeholders} {IMAGE} placeholders but {len(images)} image",
                        where)
    first_user = next(t for t in conversation if t["role"] == "user")
    return {"image": images[0][1], "conversation": conversation,
            "text": " ".join(first_user["text"].replace(IMAGE, " ").split()),
            "label": next(t for t in reversed(conversation) if t["role"] == "assistant")["text"]}


def prompt_turns(messages: list) -> list[dict]:
    """Chat messages (``{"role", "content"}`` with string content, as OpenAI's API writes them, or
    peftmm's ``{"role", "text"}`` turns) as a conversation to answer (the example shape's turns):
    known roles, a system turn first only, no empty message, at most one ``<image>`` (in a user
    turn), a user turn last. Errors name ``messages[i]``; prediction (not a data file) reads these."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"a message is an object with role and content, got {type(message).__name__}", where)
        role, text = message.get("role"), message.get("content", message.get("text"))
        if role not in ROLES:
            raise DataError(f"unknown role {role!r}; use one of: {', '.join(ROLES)}", f"{where}.role")
        if not isinstance(text, str):
            raise DataError(f"content must be a string, got {type(text).__name__}", f"{where}.content")
        kind = ROLES[role]
        if kind == "system" and i:
            raise DataError("a system message can only come first", where)
        if kind != "system" and not text.replace(IMAGE, "").strip() and (kind == "assistant" or IMAGE not in text):
            raise DataError(f"empty {kind} message", f"{where}.content")
        if text.count(IMAGE) and kind != "user":
            raise DataError(f"{IMAGE} in a {kind} message; the image goes in a user message", f"{where}.content")
        turns.append({"role": kind, "text": text.strip(), "images": text.count(IMAGE)})
    placeholders = sum(t["images"] for t in turns)
    if placeholders > 1:
        raise DataError(f"{placeholders} {IMAGE} placeholders but one image: a conversation takes one", "messages")
    if turns[-1]["role"] != "user":
        raise DataError(f"the last message must be the user's, to be answered; it is the {turns[-1]['role']}'s",
                        f"messages[{len(turns) - 1}]")
    return turns


def normalise_turns(turns: list[tuple[str, str, str]], where: str) -> list[dict]:
    """``[(role, text, field)]`` -> ``[{"role", "text", "images"}]``, checked (roles, order, answers)."""
    if not turns:
        raise BadRecord("no turns", "empty conversation", where)
    out = []
    for i, (role, text, field) in enumerate(turns):
        if role not in ROLES:
            raise BadRecord("unknown role", f"{field}: unknown role {role!r}; use one of: "
                            f"{', '.join(ROLES)}", where)
        role = ROLES[role]
        if not isinstance(text, str):
            raise BadRecord("not a string", f"{field}: the text must be a string, got {type(text).__name__}", where)
        count = text.count(IMAGE)
        if role == "system" and i:
            raise BadRecord("system turn", f"{field}: a system turn can only come first", where)
        if role != "user" and count:
            raise BadRecord("placeholders", f"{field}: {IMAGE} in {'an' if role == 'assistant' else 'a'} {role} turn; "
                            "the image goes in a user turn",
                            where)
        if role == "assistant" and not any(t["role"] == "user" for t in out):
            raise BadRecord("starts with assistant", f"{field}: the conversation starts with an assistant turn; "
                            "the first turn (after an optional system turn) is the user's", where)
        if role == "assistant" and not text.strip():
            raise BadRecord("empty answer", f"{field}: empty answer", where)
        if role == "user" and not text.replace(IMAGE, "").strip() and not count:
            raise BadRecord("empty question", f"{field}: empty user turn", where)
        out.append({"role": role, "text": text.strip(), "images": count})
    if not any(t["role"] == "assistant" for t in out):
        raise BadRecord("no assistant turn", "no assistant turn: nothing to learn (a conversation needs an answer)",
                        where)
    return out


def _image_path(image: str, root: Path, where: str, lenient: bool) -> str:
    if image.startswith(("http://", "https://", "data:")):
        raise BadRecord("remote image", f"image {image[:60]!r}: only local image files are read; download it",
                        where)
    path = (root / image.removeprefix("file://")).absolute()
    if not path.is_file() and not lenient:
        raise BadRecord("image not found", f"image file not found: {image} (looked for {path})", where)
    return str(path)


def _split_of(record: dict, has_split: bool, where: str) -> str | None:
    if not has_split:
        if "split" in record:
            raise BadRecord("split", "a 'split' field, but the first record has none: give every record one, "
                            "or none", where)
        return None
    split = record.get("split")
    split = split.strip().lower() if isinstance(split, str) else split
    if split not in SPLITS:
        raise BadRecord("split", f"split = {record.get('split')!r} is not allowed; choose one of: "
                        f"{', '.join(SPLITS)}", where)
    return split


# ---------------------------------------------------------------- the two formats

def _llava_turns(record: dict, where: str):
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise BadRecord("no image", f"image: must be a file path, got {image!r}", where)
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise BadRecord("no turns", f"conversations: must be a list of turns, got {_shown(conversations)}", where)
    turns = []
    for i, turn in enumerate(conversations):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord("bad turn", f"{field}: a turn is {{\"from\": ..., \"value\": ...}}, got {_shown(turn)}",
                            where)
        turns.append((turn["from"], turn["value"], f"{field}.from" if turn["from"] not in ROLES else f"{field}.value"))
    return turns, [("image", image.strip())] if image else []


def _message_turns(record: dict, where: str):
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise BadRecord("no turns", f"messages: must be a list of messages, got {_shown(messages)}", where)
    images = _listed_images(record, where)
    turns = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord("bad turn", f"{field}: a message is {{\"role\": ..., \"content\": ...}}, got "
                            f"{_shown(message)}", where)
        content = message["content"]
        if isinstance(content, list):
            content = _parts(content, f"{field}.content", images, where)
        turns.append((message["role"], content,
                      f"{field}.role" if message["role"] not in ROLES else f"{field}.content"))
    return turns, images


def _listed_images(record: dict, where: str) -> list[tuple[str, str]]:
    listed = record.get("images", record.get("image"))
    if listed is None:
        return []
    listed = [listed] if isinstance(listed, str) else listed
    key = "images" if "images" in record else "image"
    if not isinstance(listed, list) or not all(isinstance(p, str) and p.strip() for p in listed):
        raise BadRecord("no image", f"{key}: must be a file path or a list of them, got {_shown(listed)}", where)
    return [(f"{key}[{i}]", p.strip()) for i, p in enumerate(listed)]


def _parts(parts: list, field: str, images: list, where: str) -> str:
    """The parts of one message as text, an image part written as a placeholder where it stands."""
    pieces = []
    for j, part in enumerate(parts):
        here = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            if kind == "image":
                path = part.get("image") or part.get("path") or part.get("url")
            else:
                path = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(path, str) or not path.strip():
                raise BadRecord("no image", f"{here}: an image part needs a file path (under 'image', 'path' or "
                                f"'url'), got {_shown(part)}", where)
            images.append((here, path.strip()))
            pieces.append(IMAGE)
        else:
            raise BadRecord("bad part", f"{here}: a part is {{\"type\": \"text\", \"text\": ...}} or "
                            f"{{\"type\": \"image\", \"image\": PATH}}, got {_shown(part)}", where)
    return "\n".join(pieces)


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- reading the files

def _jsonl_records(path: Path):
    """(where, record) per non-blank line; a bad line comes as a BadRecord in place of its record."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            where = f"{path}:{line}"
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRecord("not UTF-8", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                       f"{e.start + 1}); save the file as UTF-8", where)
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRecord("not JSON", f"not valid JSON: {e.msg} (column {e.colno})", where)


def _llava_records(path: Path):
    """(where, record) per element of the file's top-level list, ``where`` naming its line and index."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); save the file as UTF-8",
                        str(path)) from None
    decoder, n, pos = json.JSONDecoder(), len(text), _skip_space(text, 0)
    if pos >= n or text[pos] != "[":
        raise DataError("a LLaVA file is a JSON list of records ([{\"id\", \"image\", \"conversations\"}, ...])",
                        str(path))
    pos, index, line, counted = _skip_space(text, pos + 1), 0, 1, 0
    while pos < n and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg} (column {e.colno}, in record {index})",
                            f"{path}:{e.lineno}") from None
        yield f"{path}:{line} (record {index})", record
        index, pos = index + 1, _skip_space(text, end)
        if pos < n and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < n and text[pos] != "]":
            raise DataError(f"not valid JSON: expected ',' or ']' after record {index - 1}",
                            f"{path}:{text.count(chr(10), 0, pos) + 1}")
    if pos >= n or _skip_space(text, pos + 1) != n:
        raise DataError("not valid JSON: the list is not closed by ']' at the end of the file",
                        f"{path}:{text.count(chr(10), 0, min(pos, n)) + 1}")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
