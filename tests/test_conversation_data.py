"""Conversation data: LLaVA JSON, chat-messages JSONL, and the generative views of built-in sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from peftmm.data import load_splits
from peftmm.data.conversation_views import EMOJI_QUESTIONS, emoji_conversations
from peftmm.data.conversations import read_conversations, skipped_line
from peftmm.errors import DataError, RecipeError
from peftmm.recipe import DataSpec, from_dict

BASE = {"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"}}


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(30):
        Image.new("RGB", (8, 8), (i * 8, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def llava_record(i: int, **changes) -> dict:
    record = {"id": f"r{i}", "image": f"img/{i % 30}.png",
              "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                {"from": "gpt", "value": "red"},
                                {"from": "human", "value": "And how big?"},
                                {"from": "gpt", "value": f"{i} pixels"}]}
    record.update(changes)
    return record


def message_record(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": [{"type": "text", "text": f"Look {i}:"},
                                                      {"type": "image", "image": f"img/{i % 30}.png"},
                                                      {"type": "text", "text": "what is it?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "a square"}]}]}


def write_json(path: Path, records, indent=1) -> Path:
    path.write_text(json.dumps(records, indent=indent))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def every(splits) -> list[dict]:
    return splits.train + splits.val + splits.test


def test_llava_happy_path(folder):
    path = write_json(folder / "data.json", [llava_record(i) for i in range(60)])
    splits = read_conversations(path, "llava", val_fraction=0.2, test_fraction=0.2)
    examples = every(splits)
    assert len(examples) == 60 and splits.train and splits.val and splits.test and splits.labels == []
    e = next(x for x in examples if x["id"] == "r7")
    assert e["image"] == str(folder / "img" / "7.png")
    assert e["conversation"] == [{"role": "user", "text": "<image>\nWhat colour is it?", "images": 1},
                                 {"role": "assistant", "text": "red", "images": 0},
                                 {"role": "user", "text": "And how big?", "images": 0},
                                 {"role": "assistant", "text": "7 pixels", "images": 0}]
    assert e["text"] == "What colour is it?" and e["label"] == "7 pixels"
    assert set(e) == {"image", "conversation", "text", "label", "id"}
    seen = {}
    for name in ("train", "val", "test"):          # records of one image (i and i + 30) stay together
        for x in splits[name]:
            assert seen.setdefault(x["image"], name) == name
    again = read_conversations(path, "llava", val_fraction=0.2, test_fraction=0.2)
    assert again.train == splits.train and again.test == splits.test


def test_llava_image_root_system_role_and_no_placeholder(folder):
    records = [{"id": 1, "image": "0.png", "conversations": [{"from": "system", "value": "Be brief."},
                                                            {"from": "human", "value": "Colour?"},
                                                            {"from": "gpt", "value": "black"}]}]
    path = write_json(folder / "elsewhere.json", records)
    with pytest.raises(DataError, match="image file not found: 0.png"):
        read_conversations(path, "llava")
    splits = read_conversations(path, "llava", image_root=folder / "img", test_fraction=0.01, val_fraction=0.01)
    (e,) = every(splits)
    assert e["image"] == str(folder / "img" / "0.png") and e["id"] == "1"
    assert [t["role"] for t in e["conversation"]] == ["system", "user", "assistant"]
    assert sum(t["images"] for t in e["conversation"]) == 0     # the prompt puts it before "Colour?"


def test_messages_happy_path_and_listed_images(folder):
    records = [message_record(i) for i in range(20)]
    records += [{"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "x"}],
                 "images": [f"img/{i}.png"]} for i in range(20, 25)]
    splits = read_conversations(write_jsonl(folder / "chat.jsonl", records), "messages")
    examples = every(splits)
    assert len(examples) == 25
    e = next(x for x in examples if x["image"].endswith("/3.png"))
    assert e["conversation"][1] == {"role": "user", "text": "Look 3:\n<image>\nwhat is it?", "images": 1}
    assert e["conversation"][0]["role"] == "system" and e["label"] == "a square"
    assert e["text"] == "Look 3: what is it?"
    listed = next(x for x in examples if x["image"].endswith("/22.png"))
    assert listed["conversation"][0]["images"] == 1 and listed["text"] == "Which?"


def test_split_field_is_kept(folder):
    records = [llava_record(i, split="test" if i < 4 else "train") for i in range(20)]
    splits = read_conversations(write_json(folder / "s.json", records), "llava", val_fraction=0.3)
    assert len(splits.test) == 4 and len(splits.train) + len(splits.val) == 16 and splits.val
    assert "split" not in splits.train[0]


def error_of(path: Path, kind: str, **options) -> str:
    with pytest.raises(DataError) as err:
        read_conversations(path, kind, **options)
    return str(err.value)


@pytest.mark.parametrize("change, field, what", [
    ({"conversations": [{"from": "human", "value": "<image>\nQ?"}]}, "", "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "<image> <image> Q?"}, {"from": "gpt", "value": "a"}]},
     "conversations[0].value", "2 <image> placeholders but 1 image"),
    ({"conversations": [{"from": "bot", "value": "Q?"}, {"from": "gpt", "value": "a"}]},
     "conversations[0].from", "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "  "}]},
     "conversations[1].value", "empty answer"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "Q?"}]},
     "conversations[0].value", "starts with an assistant turn"),
    ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "system", "value": "s"},
                        {"from": "gpt", "value": "a"}]}, "conversations[1].value", "system turn can only"),
    ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "<image> a"}]},
     "conversations[1].value", "<image> in an assistant turn"),
    ({"image": None}, "", "no image"),
    ({"image": "img/404.png"}, "", "image file not found: img/404.png"),
    ({"conversations": "hi"}, "conversations", "must be a list"),
])
def test_llava_bad_records_name_file_line_index_and_field(folder, change, field, what):
    records = [llava_record(i) for i in range(5)]
    records[3] = llava_record(3, **change)
    path = write_json(folder / "bad.json", records, indent=2)
    message = error_of(path, "llava")
    lines = [n for n, text in enumerate(path.read_text().splitlines(), 1) if text == "  {"]   # records' lines
    assert message.startswith(f"{path}:{lines[3]} (record 3): {field}"), message
    assert what in message


def test_messages_bad_lines(folder):
    good = json.dumps(message_record(0))
    cases = {
        '{"messages": [{"role": "user", "content": "hi"}': "not valid JSON",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/1.png"}]}]}):
            "no assistant turn",
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}],
                    "images": ["img/1.png"]}): r"messages\[0\]\.role: unknown role 'robot'",
        json.dumps({"messages": [{"role": "user", "content": "<image><image>hi"},
                                 {"role": "assistant", "content": "x"}], "images": ["img/1.png"]}):
            r"messages\[0\]\.content: 2 <image> placeholders but 1 image",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/1.png"},
                                                              {"type": "video", "video": "v.mp4"}]},
                                 {"role": "assistant", "content": "x"}]}): r"messages\[0\]\.content\[1\]: a part is",
        json.dumps({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": ""}],
                    "images": "img/1.png"}): r"messages\[1\]\.content: empty answer",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
                    "images": ["img/1.png", "img/2.png"]}): r"2 images \(images\[0\], images\[1\]\)",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/a.png"}}]}, {"role": "assistant", "content": "x"}]}): "only local image files",
    }
    for bad_line, what in cases.items():
        path = write_jsonl(folder / "bad.jsonl", [good, "", good, bad_line, good])
        message = error_of(path, "messages")
        assert message.startswith(f"{path}:4: "), message
        assert __import__("re").search(what, message), message


def test_non_utf8_files(folder):
    good = json.dumps(message_record(0)).encode()
    path = folder / "latin.jsonl"
    path.write_bytes(good + b"\n" + good.replace(b"a square", b"a carr\xe9") + b"\n")
    assert error_of(path, "messages").startswith(f"{path}:2: not UTF-8 text (byte 0xe9 at column ")
    llava = folder / "latin.json"
    llava.write_bytes(b'[\n{"id": 1,\n "image": "img/1.png", "conversations": [{"from": "gpt", "value": "\xff"}]}]')
    assert error_of(llava, "llava") == f"{llava}: not UTF-8 text (byte 0xff at line 3); save the file as UTF-8"


def test_malformed_llava_documents(folder):
    path = folder / "m.json"
    path.write_text('[\n' + json.dumps(llava_record(0)) + ',\n{"id": 2,, "image": "x"}\n]')
    assert error_of(path, "llava").startswith(f"{path}:3: not valid JSON: Expecting property name")
    path.write_text('{"id": 1}')
    assert "a LLaVA file is a JSON list of records" in error_of(path, "llava")
    path.write_text('[' + json.dumps(llava_record(0)))
    assert "not closed by ']'" in error_of(path, "llava")
    path.write_text('[]')
    assert error_of(path, "llava") == f"{path}: no records"
    assert "reads a .json file, not '.jsonl'" in error_of(folder / "x.jsonl", "llava")
    assert error_of(folder / "x.json", "llava") == f"{folder / 'x.json'}: data file not found"


def test_skip_counts_and_leaves_bad_records_out(folder):
    lines = [json.dumps(message_record(i)) for i in range(12)]
    lines[2] = '{"messages": oops'
    lines[5] = json.dumps({"messages": [{"role": "user", "content": "hi"}], "images": ["img/1.png"]})
    lines[7] = json.dumps({"messages": [{"role": "user", "content": "hi"}], "images": ["img/2.png"]})
    missing = message_record(9)
    missing["messages"][1]["content"][1]["image"] = "img/404.png"
    lines[9] = json.dumps(missing)
    path = folder / "mixed.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n" + json.dumps(message_record(1)).encode()[:-3] + b"\xff}\n")
    splits = read_conversations(path, "messages", on_bad_sample="skip")
    examples = every(splits)
    assert len(examples) == 9     # 13 lines: bad JSON, 2 without answers, the non-UTF-8 one left out
    assert any(e["image"].endswith("/404.png") for e in examples)   # kept: the batcher counts it
    info = splits.metadata["skipped_records"]
    assert info["skipped"] == 4 and info["of"] == 13
    assert info["reasons"] == {"not JSON": 1, "no assistant turn": 2, "not UTF-8": 1}
    assert info["first"].startswith(f"{path}:3: not valid JSON")
    line = skipped_line(splits)
    assert line.startswith(f"peftmm: data: skipped 4 of 13 records of {path} (no assistant turn: 2, not JSON: 1, "
                           "not UTF-8: 1); first: ")
    assert skipped_line(read_conversations(write_jsonl(folder / "ok.jsonl", lines[:2]), "messages")) is None
    with pytest.raises(DataError, match=r"none of the 2 records could be used \(no assistant turn: 2\)"):
        read_conversations(write_jsonl(folder / "none.jsonl", [lines[5], lines[7]]), "messages", on_bad_sample="skip")


def test_recipe_sources_paths_and_views(folder, monkeypatch):
    write_json(folder / "data.json", [llava_record(i, image=f"{i}.png") for i in range(30)])
    (folder / "recipes").mkdir()
    recipe = from_dict(BASE | {"data": {"source": "llava", "path": "../data.json", "image_root": "../img",
                                        "conversations": True}}, source=str(folder / "recipes" / "r.yaml"))
    assert recipe.data.image_root == str(folder / "img")
    monkeypatch.chdir("/")
    splits = load_splits(recipe.data)
    assert len(every(splits)) == 30 and every(splits)[0]["image"].startswith(str(folder / "img"))
    with pytest.raises(RecipeError, match="data.path is required when data.source is 'messages'"):
        from_dict(BASE | {"data": {"source": "messages"}}, source="r.yaml")
    with pytest.raises(RecipeError, match=r"data.source \(with data.conversations: true\) = 'files' is not a known"):
        from_dict(BASE | {"data": {"source": "files", "path": "x.jsonl", "conversations": True}}, source="r.yaml")
    with pytest.raises(RecipeError, match="data.image_root must name a folder"):
        from_dict(BASE | {"data": {"source": "llava", "path": "x.json", "image_root": " "}}, source="r.yaml")
    with pytest.raises(DataError, match="data.image_root is not a folder: /nowhere"):
        read_conversations(folder / "data.json", "llava", image_root="/nowhere")
    with pytest.raises(DataError, match="data.path is required for data.source 'llava'"):
        load_splits(DataSpec(source="llava"))


def test_easy_vqa_conversation_view():
    plain = load_splits(DataSpec(source="easy-vqa", max_train_samples=50, max_eval_samples=20))
    view = load_splits(DataSpec(source="easy-vqa", conversations=True, max_train_samples=50, max_eval_samples=20))
    assert view.labels == plain.labels
    for name in ("train", "val", "test"):
        assert [(e["image"], e["text"], e["label"]) for e in view[name]] == \
            [(e["image"], e["text"], e["label"]) for e in plain[name]]
        for e in view[name]:
            assert e["conversation"] == [{"role": "user", "text": e["text"], "images": 0},
                                         {"role": "assistant", "text": e["label"], "images": 0}]


def emoji_rows(names):
    return [{"image": f"/e/{i}.png", "text": n, "group": f"G{i % 2}", "subgroup": f"s-{i}", "family": n,
             "emoji": "x", "label": f"G{i % 2}"} for i, n in enumerate(names)]


@pytest.mark.parametrize("label, kinds", [("group", ["name", "group"]), ("subgroup", ["name", "subgroup"]),
                                          ("group > subgroup", ["name", "group", "subgroup"])])
def test_emoji_view_asks_several_questions_per_picture(label, kinds):
    from types import SimpleNamespace

    from peftmm.data import Splits

    splits = Splits(train=emoji_rows(["red apple", "grinning face"]), val=emoji_rows(["cat"]), test=[],
                    labels=["G0", "G1"])
    view = emoji_conversations(splits, SimpleNamespace(label=label))
    assert [e["question"] for e in view.train] == kinds * 2 and len(view.val) == len(kinds)
    apple = view.train[: len(kinds)]
    assert all(e["image"] == "/e/0.png" and e["name"] == "red apple" for e in apple)
    answers = {"name": "red apple", "group": "G0", "subgroup": "s-0"}
    for e in apple:
        assert e["label"] == answers[e["question"]] and e["text"] == EMOJI_QUESTIONS[e["question"]]
        assert e["conversation"][-1] == {"role": "assistant", "text": e["label"], "images": 0}
    assert view.labels == ["G0", "G1"] and list(view.metadata["questions"]) == kinds


def test_emoji_view_of_the_real_source():
    from types import SimpleNamespace

    from peftmm.data.emoji import emoji_splits

    splits = emoji_splits(render_now=False, progress=False)
    sizes = [len(splits[n]) for n in ("train", "val", "test")]
    view = emoji_conversations(splits, SimpleNamespace(label="group"))
    assert [len(view[n]) for n in ("train", "val", "test")] == [2 * s for s in sizes]
    apple = [e for e in every(view) if e["name"] == "red apple"]
    assert {(e["question"], e["label"]) for e in apple} == {("name", "red apple"), ("group", "Food & Drink")}
