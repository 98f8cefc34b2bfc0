"""Minimum-Bayes-risk caption choice (task.mbr_candidates, tasks/captioning/mbr.py): the expected
unigram F1 against probability-weighted candidates and retrieved captions decides, word subsets
only with mbr_drop_words; on a tiny LM the choice is one of the beam candidates (or of their
words) and is what predict, eval and the bundle give."""

import pytest
import torch
from helpers import perturb
from test_caption_memory import _build, _recipe
from test_captioning import tiny_models  # noqa: F401  (the module's fixture)

from peftmm import RecipeError, recipe_from_dict
from peftmm.batching import Batcher
from peftmm.bundle import load_bundle, save_bundle
from peftmm.tasks.captioning.mbr import choose
from peftmm.tasks.captioning.metrics import words


def test_the_probable_candidate_wins_without_other_evidence():
    assert choose(["red apple", "green apple"], [0.0, -5.0]) == "red apple"
    assert choose(["red apple", "green apple"], [-5.0, 0.0]) == "green apple"
    assert choose(["only one"], [-1.0]) == "only one"


def test_retrieved_captions_shift_the_choice_and_dropping_words_hedges():
    candidates, log_probs = ["flag somalia", "flag chile"], [0.0, 0.0]
    retrieved = ["flag mali", "flag peru"]
    # "flag" scores 2/3 against every piece of evidence; "flag somalia" 0.25 * 1 + 0.25 * 0.5 + 0.5 * 0.5
    assert choose(candidates, log_probs, retrieved, 0.5, drop_words=True) == "flag"
    # without subsets the tie between the candidates goes to the earlier one
    assert choose(candidates, log_probs, retrieved, 0.5) == "flag somalia"
    # retrieved captions are hypotheses too: one the candidates agree with can be chosen
    assert choose(["grinning cat face", "grinning face"], [0.0, -0.1], ["grinning cat"], 0.9) == "grinning cat"
    # weight 0 or no retrieved captions: they are not evidence
    assert choose(["a b", "a c"], [0.0, -3.0], ["a c", "a c"], 0.0) == "a b"


def test_bad_candidates():
    with pytest.raises(ValueError, match="at least one candidate"):
        choose([], [])
    assert choose(["", "a cat"], [0.0, -1.0]) == "a cat"   # an empty candidate is never the answer


def test_generation_chooses_among_the_beam_candidates(tiny_models, monkeypatch):
    """The choice sees each image's beam candidates (the first is plain beam search's answer),
    their log probabilities and the names the LM read, and its answer is what decode gives."""
    from peftmm.tasks.captioning import mbr as caption_mbr

    torch.manual_seed(0)
    _, model, splits = _build(tiny_models, k=2, mbr_candidates=3, mbr_retrieved_weight=0.3)
    perturb(model)
    model.eval()
    seen = []

    def recording(candidates, log_probs, retrieved, weight, drop_words):
        seen.append((candidates, log_probs, retrieved, weight, drop_words))
        return choose(candidates, log_probs, retrieved, weight, drop_words)

    monkeypatch.setattr(caption_mbr, "choose", recording)
    images = [{"image": e["image"], "text": None} for e in splits.test[:4]]
    batch = Batcher(model)(images)
    task = model.task
    with torch.no_grad():
        chosen = [d["caption"] for d in task.decode(model(batch))]
        task.config.mbr_candidates, task.config.num_beams = 0, 3   # plain beam search: its best
        best = [d["caption"] for d in task.decode(model(batch))]
    assert len(seen) == 4
    memory_captions = {" ".join(e["text"].split()) for e in splits.train}
    for (candidates, log_probs, retrieved, weight, drop), top, caption in zip(seen, best, chosen):
        assert len(candidates) == len(log_probs) == 3 and candidates[0] == top
        assert log_probs == sorted(log_probs, reverse=True)
        assert len(retrieved) == 2 and set(retrieved) <= memory_captions
        assert (weight, drop) == (0.3, False)
        assert caption == choose(candidates, log_probs, retrieved, weight, drop)
        assert caption in candidates + retrieved


def test_dropped_words_come_from_the_candidates_or_retrieved_captions(tiny_models, tmp_path):
    torch.manual_seed(0)
    recipe, model, splits = _build(tiny_models, k=2, mbr_candidates=3, mbr_drop_words=True)
    model.eval()
    images = [{"image": e["image"], "text": None} for e in splits.test[:4]]
    task = model.task
    with torch.no_grad():
        chosen = [d["caption"] for d in task.decode(model(Batcher(model)(images)))]
        task.config.mbr_candidates, task.config.num_beams = 0, 3
        vocabulary = {w for d in task.decode(model(Batcher(model)(images))) for w in words(d["caption"])}
        task.config.mbr_candidates, task.config.num_beams = 3, 1
    vocabulary |= {w for e in splits.train for w in words(e["text"])}
    for caption in chosen:
        assert words(caption) and set(words(caption)) <= vocabulary, caption
    # the bundle decodes the same way
    path = save_bundle(model, recipe, tmp_path / "bundle")
    reloaded, _, _ = load_bundle(path)
    reloaded.eval()
    with torch.no_grad():
        again = [d["caption"] for d in reloaded.task.decode(reloaded(Batcher(reloaded)(images)))]
    assert again == chosen


def test_one_candidate_is_refused(tiny_models):
    with pytest.raises(RecipeError, match="mbr_candidates = 1"):
        recipe_from_dict(_recipe(tiny_models, mbr_candidates=1))
