"""Metrics of generated short answers: normalised exact match, token F1, answers outside the
training answers, as VQA is scored.

Answers are normalised as the official VQAv2 evaluator (``vqaEval.py`` of the VQA challenge's
evaluation tools) normalises them, step by step:

1. newlines and tabs become spaces, the ends are stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the
   answer has it next to a space (or has a comma between digits, "1,000"), else it becomes a
   space ("yes/no" -> "yes no", "t-shirt" -> "t shirt"); a period is deleted unless a digit
   follows it ("3.5" stays);
3. lower case; the number words none, zero ... ten become digits; the articles a, an, the
   are dropped; contractions written without their apostrophe get it back ("dont" -> "don't"),
   from the evaluator's table.

Unlike the evaluator, which normalises only when a question's ten human answers disagree, both
the prediction and every reference are always normalised (as LLaVA's and lmms-eval's VQAv2
scoring does): one reference per question here is the common case.

- ``exact_match``: the share of predictions whose normalised text equals a normalised reference.
- ``token_f1``: per example, the F1 of the normalised prediction's words against a reference's
  (counted with multiplicity, SQuAD's token F1), the best reference; averaged.
- ``out_of_vocabulary``: how many predictions (normalised) are none of the normalised training
  answers: answers a classifier over the training answers could never give. A count, not a share.
- :func:`vqa_accuracy`: the evaluator's own score against ten human answers, for data that has them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")   # the evaluator's "(?!<=\d)(\.)(?!\d)": its first group never matches anything
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The evaluator's table, as it is (keys with capitals never match: it looks them up lower-cased).
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split())


def normalize_answer(text: str) -> str:
    """``text`` as the VQAv2 evaluator compares it (the three steps of the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words_step(_punctuation_step(text))


def _punctuation_step(text: str) -> str:
    out = text
    keep_together = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        # the evaluator tests the text as it came in, not as earlier replacements left it
        out = out.replace(p, "" if (p + " " in text or " " + p in text or keep_together) else " ")
    return _PERIOD.sub("", out)


def _words_step(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _references(reference: str | Sequence[str]) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("an example needs at least one reference answer")
    return refs


def exact_match(prediction: str, reference: str | Sequence[str]) -> bool:
    answer = normalize_answer(prediction)
    return any(answer == normalize_answer(r) for r in _references(reference))


def token_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD's token F1 of the normalised texts, the best reference; 1.0 when both are empty."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for r in _references(reference):
        expected = normalize_answer(r).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def answer_vocabulary(answers: Iterable[str]) -> frozenset[str]:
    """The normalised answers of training, for ``out_of_vocabulary``."""
    return frozenset(normalize_answer(a) for a in answers)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQAv2 evaluator's accuracy: over each leave-one-out set of the human answers,
    min(1, matches / 3), averaged (1.0 when at least 4 of 10 people gave the answer)."""
    answer = normalize_answer(prediction)
    humans = [normalize_answer(h) for h in _references(human_answers)]
    scores = [min(1.0, sum(h == answer for j, h in enumerate(humans) if j != i) / 3) for i in range(len(humans))]
    return sum(scores) / len(scores)


def answer_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                   vocabulary: frozenset[str] | None = None) -> dict[str, float]:
    """``exact_match`` and ``token_f1`` (shares in [0, 1]) of ``predictions[i]`` against
    ``references[i]`` (one answer or several), and ``out_of_vocabulary`` (a count) when the
    training answers' ``vocabulary`` (:func:`answer_vocabulary`) is given."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    metrics = {"exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n if n else 0.0,
               "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n if n else 0.0}
    if vocabulary is not None:
        metrics["out_of_vocabulary"] = sum(normalize_answer(p) not in vocabulary for p in predictions)
    return metrics
