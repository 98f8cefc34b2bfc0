"""Answer metrics: the VQAv2 evaluator's normalisation, exact match, token F1, out-of-vocabulary answers.

Expected values are worked out by hand from the evaluator's rules (vqaEval.py), quirks included.
"""

from __future__ import annotations

import pytest

from peftmm.tasks.answer_metrics import (
    answer_metrics,
    answer_vocabulary,
    exact_match,
    normalize_answer,
    token_f1,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),                          # lower case, then number words
    ("none", "0"),
    ("ten dogs", "10 dogs"),
    ("eleven", "eleven"),                  # only none, zero ... ten are mapped
    ("The Cat.", "cat"),                   # article dropped, final period deleted
    ("an apple", "apple"),
    ("a red, blue", "red blue"),           # ", " : next to a space, so deleted
    ("yes/no", "yes no"),                  # not next to a space: becomes one
    ("t-shirt", "t shirt"),
    ("1,000", "1000"),                     # a comma between digits: all punctuation deleted, nothing split
    ("3.5", "3.5"),                        # a period before a digit stays
    ("x (circle)", "x circle"),            # " (" deleted; ")" has no space beside it, so becomes one
    ("(circle)", "circle"),
    ("It's 10 o'clock!", "it's 10 o'clock"),
    ("two\tdogs\n", "2 dogs"),
    ("dont", "don't"),                     # contractions get their apostrophe
    ("Dont", "don't"),
    ("oclock", "o'clock"),
    ("Im", "im"),                          # the table's key is "Im" but it looks up lower-case words
    ("somebody'd", "somebodyd"),           # the table's own oddity, kept
    ("  ", ""),
])
def test_normalize_like_the_vqa_evaluator(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_and_token_f1():
    assert exact_match("Two.", "2") and exact_match("the circle", ["square", "Circle"])
    assert not exact_match("red circle", "circle")
    assert token_f1("a red circle", "red square") == pytest.approx(0.5)
    assert token_f1("two red dogs", ["cats", "2 dogs"]) == pytest.approx(0.8)   # P 2/3, R 1, best reference
    assert token_f1("dogs dogs", "dogs") == pytest.approx(2 * 0.5 * 1 / 1.5)     # counted with multiplicity
    assert token_f1("the", "a") == 1.0 and token_f1("", "circle") == 0.0 and token_f1("blue", "red") == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        exact_match("x", [])


def test_vqa_accuracy_against_ten_humans():
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)   # 3 x 2/3 and 7 x 1
    assert vqa_accuracy("3", ["2"] * 3 + ["3"] * 7) == pytest.approx(1.0)
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.9 * 1 / 3)   # 9 sets hold the one "yes"
    assert vqa_accuracy("maybe", ["yes"] * 10) == 0.0


def test_answer_metrics_with_out_of_vocabulary():
    vocabulary = answer_vocabulary(["circle", "Red", "two", "circle"])
    assert vocabulary == {"circle", "red", "2"}
    metrics = answer_metrics(["Circle.", "blue", "2", "a red one"], ["circle", "red", "two", "red"], vocabulary)
    assert metrics["exact_match"] == pytest.approx(2 / 4)
    assert metrics["token_f1"] == pytest.approx((1 + 0 + 1 + 2 * 0.5 * 1 / 1.5) / 4)
    assert metrics["out_of_vocabulary"] == 2          # "blue" and "red 1" are no training answer
    assert set(answer_metrics(["x"], ["x"])) == {"exact_match", "token_f1"}
    assert answer_metrics([], [], vocabulary) == {"exact_match": 0.0, "token_f1": 0.0, "out_of_vocabulary": 0}
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        answer_metrics(["a", "b"], ["a"])
