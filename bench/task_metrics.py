"""Which of a run's metrics the bench scripts report, per task, and how they print.

A run's final metrics (metrics.jsonl's ``final``, a bundle's ``metrics``, ``peftmm train``'s JSON)
carry every number its task computed, prefixed ``test_`` / ``val_``; the summaries
(bench/compare_methods.py, bench/bundle_report.py, bench/emoji_tasks.py and the tables
bench/readme_tables.py renders from them) show the ones named here, the task's primary metric
first (the one ``train`` picks the best epoch by).
"""

from __future__ import annotations

REPORTED = {
    "vqa": ("accuracy",),
    "classification": ("accuracy", "macro_f1"),
    "retrieval": ("mean_recall", "t2i_r1", "i2t_r1"),
    "captioning": ("cider_d", "bleu4", "unigram_f1", "exact_match"),
    # generated answers: normalised exact match, token F1, how many answers are none of the
    # training answers, and how many were generated (counts, not shares)
    "instruct": ("exact_match", "token_f1", "out_of_vocabulary", "answered"),
}
COUNTS = {"out_of_vocabulary", "answered"}            # printed as counts
UNSCALED = {"cider_d": "0-10", "bleu4": "0-1"}        # printed as they are, not as percentages
NAMES = {"mean_recall": "mean recall", "t2i_r1": "t2i R@1", "i2t_r1": "i2t R@1", "cider_d": "CIDEr-D",
         "bleu4": "BLEU-4", "unigram_f1": "unigram F1", "exact_match": "exact match", "token_f1": "token F1",
         "macro_f1": "macro-F1", "out_of_vocabulary": "answers out of the training vocabulary",
         "answered": "answers generated"}
SOURCES = {"easy-vqa": "easy-VQA", "emoji": "emoji"}


def reported(task: str, metrics: dict, split: str = "test") -> dict[str, float]:
    """``{"test_<name>": value}`` for the task's reported metrics that ``metrics`` holds, in order."""
    return {f"{split}_{name}": metrics[f"{split}_{name}"] for name in REPORTED.get(task, ("accuracy",))
            if f"{split}_{name}" in metrics}


def primary(task: str) -> str:
    return REPORTED.get(task, ("accuracy",))[0]


def metric_name(key: str) -> str:
    """``test_exact_match`` -> ``exact match``."""
    bare = key.split("_", 1)[1] if key.startswith(("test_", "val_")) else key
    return NAMES.get(bare, bare.replace("_", " "))


def show(key: str, value: float) -> str:
    """A metric's value as the docs print it: counts whole, BLEU/CIDEr as they are, the rest in %."""
    bare = key.split("_", 1)[1] if key.startswith(("test_", "val_")) else key
    if bare in COUNTS:
        return f"{value:,.0f}"
    if bare in UNSCALED:
        return f"{value:.3f}"
    return f"{100 * value:.2f}%"
