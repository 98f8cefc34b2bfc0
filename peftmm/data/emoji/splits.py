"""Which split an emoji goes to: by family, so that variants of one concept never cross splits.

The family key is the lower-cased caption with:

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

Family ``f`` goes to test when ``u = stable_fraction(f"emoji/{f}") < test_fraction``; the rest
goes to validation when ``(u - test_fraction) / (1 - test_fraction) < val_fraction``, so test
never moves with ``val_fraction``. Each split is in a fixed pseudo-random order
(:func:`order_key`), so ``data.max_train_samples`` / ``max_eval_samples`` keep a sample of
every group.
"""

from __future__ import annotations

import re

from .. import stable_fraction

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


def split_of(family: str, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test``: where every emoji of ``family`` goes."""
    u = stable_fraction(f"emoji/{family}")
    return "test" if u < test_fraction else \
        "val" if (u - test_fraction) / (1 - test_fraction) < val_fraction else "train"


def order_key(codepoints: str) -> float:
    """A split's fixed shuffle, by each emoji's code points (render.codepoints)."""
    return stable_fraction(f"emoji/order/{codepoints}")
