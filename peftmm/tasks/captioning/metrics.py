"""Caption metrics over a split: exact match, BLEU-4, CIDEr-D and unigram F1.

Text is compared as lowercased word tokens (``\\w+``: punctuation dropped, as the COCO caption
toolkit's PTB tokenizer does). Each hypothesis has one or more reference captions.

- BLEU-4: corpus-level (clipped n-gram counts pooled over the split, brevity penalty against the
  closest reference length), as the COCO caption toolkit computes it.
- CIDEr-D: the COCO caption toolkit's CIDEr (Vedantam et al. 2015, the "-D" variant: clipped
  n-gram counts, Gaussian length penalty with sigma 6, times 10), with document frequencies from
  the split's own references.

Both are written out here, and ``tests/test_captioning.py`` checks them against values from the
toolkit's own scorers: its PyPI package (pycocoevalcap) ships ~100 MB of Java jars for its other
metrics, and NLTK's ``corpus_bleu`` counts a hypothesis shorter than n words as one missed n-gram,
which drags BLEU-4 of short captions (emoji names are two or three words) far down: identical
two-word captions score 0.68 there.
- Unigram F1: per example, precision and recall of the hypothesis's words against a reference's
  (counted with multiplicity), the best reference; averaged over examples.
- Exact match: the share of hypotheses whose words equal those of one of their references.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def caption_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Metrics of ``hypotheses[i]`` against its references ``references[i]`` (each non-empty)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    if not hypotheses:
        return {"exact_match": 0.0, "bleu4": 0.0, "cider_d": 0.0, "unigram_f1": 0.0}
    hyps = [words(h) for h in hypotheses]
    refs = [[words(r) for r in rs] for rs in references]
    return {
        "exact_match": sum(h in rs for h, rs in zip(hyps, refs)) / len(hyps),
        "bleu4": bleu4(hyps, refs),
        "cider_d": sum(cider_d(hyps, refs)) / len(hyps),
        "unigram_f1": sum(max(unigram_f1(h, r) for r in rs) for h, rs in zip(hyps, refs)) / len(hyps),
    }


def bleu4(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> float:
    """Corpus BLEU-4 as the COCO caption toolkit computes it (its option "closest")."""
    correct, guess = [0] * n, [0] * n
    hyp_length = ref_length = 0
    for hyp, rs in zip(hyps, refs):
        most: Counter = Counter()  # clipping: each n-gram counts at most as often as in one reference
        for r in rs:
            most |= _ngrams(r, n)
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(count, most[gram])
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        hyp_length += len(hyp)
        ref_length += min((abs(len(r) - len(hyp)), len(r)) for r in rs)[1]
    if not all(correct):  # the toolkit's epsilons then give about 1e-4 or less; report 0
        return 0.0
    precision = math.exp(sum(math.log(c / g) for c, g in zip(correct, guess)) / n)
    return precision * min(1.0, math.exp(1 - ref_length / hyp_length))


def unigram_f1(hyp: list[str], ref: list[str]) -> float:
    if not hyp and not ref:
        return 1.0  # both empty: a match
    return counts_f1(Counter(hyp), Counter(ref), len(hyp), len(ref))


def counts_f1(hyp: Counter, ref: Counter, hyp_len: int, ref_len: int) -> float:
    """Unigram F1 from word counts: 2 * common / (|hyp| + |ref|), the harmonic mean of precision
    and recall (counts given, so a caller comparing one caption many times counts it once)."""
    common = sum((hyp & ref).values())
    return 2 * common / (hyp_len + ref_len) if common else 0.0


def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i: i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each hypothesis, exactly as the COCO caption toolkit computes it."""
    test = [_ngrams(h, n) for h in hyps]
    cooked = [[_ngrams(r, n) for r in rs] for rs in refs]
    frequency: Counter = Counter()  # in how many examples' references each n-gram occurs
    for rs in cooked:
        frequency.update({gram for r in rs for gram in r})
    log_examples = math.log(len(cooked))

    def vector(counts: Counter):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = weight = tf * (log_examples - math.log(max(1.0, frequency[gram])))
            norm[k] += weight * weight
            if k == 1:  # the toolkit's "length" counts bigrams, not words; kept so scores agree
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for counts, rs in zip(test, cooked):
        vec, norm, length = vector(counts)
        total = [0.0] * n
        for r in rs:
            vec_r, norm_r, length_r = vector(r)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                if norm[k] and norm_r[k]:
                    dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                    total[k] += dot / (norm[k] * norm_r[k]) * penalty
        scores.append(10.0 * sum(total) / n / len(rs))
    return scores
