"""Minimum-Bayes-risk caption choice (Kumar & Byrne, 2004; for captioning, the consensus
re-ranking of Devlin et al., 2015).

Greedy and beam decoding return the caption the LM finds most likely. When the LM is unsure
(an emoji of a concept it never saw) the most likely caption is often a confident wrong name,
and a caption's expected quality is better served by what the evidence agrees on. Here the
evidence is the LM's own beam candidates, weighted by their probability, and, for a
retrieval-augmented captioner, the captions it read (the training captions of the most similar
images), sharing ``retrieved_weight`` of the mass. The chosen caption is the hypothesis with the
highest expected unigram F1 (metrics.py) against that evidence.

Hypotheses are the candidates and the retrieved captions (a neighbour's name the candidates
agree with may be the answer) and, with ``drop_words``, every caption made of some of their
words in their order: the decoder may then leave out a word the evidence disagrees on ("flag"
rather than a guessed country). That raises precision, and unigram F1 with it, at the cost of
exact match: a choice for the metric, documented as such.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

from .metrics import counts_f1, words

MAX_WORDS = 8   # longer candidates contribute their first 8 words as subsets (2^8 - 1 hypotheses)


def choose(candidates: list[str], log_probs: list[float], retrieved: list[str] = (),
           retrieved_weight: float = 0.0, drop_words: bool = False) -> str:
    """The caption with the highest expected unigram F1 against the evidence.

    ``candidates``: the LM's captions, best first, with their (length-normalised) log
    probabilities; ``retrieved``: captions that share ``retrieved_weight`` of the evidence
    equally (ignored when empty). Ties go to the longer, then the earlier hypothesis.
    """
    if not candidates:
        raise ValueError("minimum-Bayes-risk choice needs at least one candidate")
    retrieved = [r for r in retrieved if words(r)]
    share = retrieved_weight if retrieved else 0.0
    top = max(log_probs)
    odds = [math.exp(lp - top) for lp in log_probs]
    evidence = [(words(c), (1 - share) * o / sum(odds)) for c, o in zip(candidates, odds)]
    evidence += [(words(r), share / len(retrieved)) for r in retrieved]
    evidence = [(Counter(w), len(w), weight) for w, weight in evidence if weight > 0]

    best, best_key = candidates[0], None
    for rank, hypothesis in enumerate(_hypotheses(candidates + list(retrieved), drop_words)):
        tokens = words(hypothesis)
        if not tokens:
            continue
        counts = Counter(tokens)
        gain = sum(weight * counts_f1(counts, ref, len(tokens), length) for ref, length, weight in evidence)
        key = (round(gain, 12), len(tokens), -rank)
        if best_key is None or key > best_key:
            best, best_key = hypothesis, key
    return best


def _hypotheses(captions: list[str], drop_words: bool):
    """Each caption (in order, no repeats) and, with ``drop_words``, its in-order word subsets."""
    seen: set[str] = set()
    for caption in captions:
        pieces = caption.split()
        options = [pieces] if not drop_words else (
            [pieces[i] for i in keep]
            for size in range(len(pieces[:MAX_WORDS]), 0, -1)
            for keep in itertools.combinations(range(len(pieces[:MAX_WORDS])), size))
        for option in options:
            text = " ".join(option)
            if text not in seen:
                seen.add(text)
                yield text
