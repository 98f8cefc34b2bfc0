"""Bad samples during training: what ``data.on_bad_sample`` does with an example it cannot use.

An example is *bad* when its image is missing or cannot be decoded (a :class:`DataError` from
:func:`peftmm.images.load_image`), or when the text the task needs is empty (a caption to
learn, a retrieval text, a question). One bad file among thousands must not end a run hours in,
so with ``skip`` (the default) it is left out of its batch, counted per split and reported once
per epoch; with ``stop`` the first one ends the run with the file and the reason.

Captions longer than ``text.max_length`` are not bad (the tokenizer cuts them) but are counted
per split (``Task.truncated``), so a too-small ``max_length`` does not go unnoticed.
"""

from __future__ import annotations

from collections import Counter

from ..errors import DataError

POLICIES = ("skip", "stop")
EMPTY_TEXT = "empty text"


class Unusable(DataError):
    """An example the task cannot learn from (Task.unusable); its message is the short reason."""


def reason_of(error: DataError) -> str:
    """A short reason, for counting: the messages come from images.py and needed_text_error."""
    if isinstance(error, Unusable):
        return error.message
    if error.message.startswith("image file not found"):
        return "image not found"
    if error.message.startswith("cannot decode image"):
        return "image cannot be decoded"
    if error.message == EMPTY_TEXT:
        return EMPTY_TEXT
    return "image cannot be read"   # e.g. a generated image that could not be drawn again


def needed_text_error(task, example: dict) -> DataError | None:
    """A DataError when the task cannot learn from the example (``task.unusable``): by default
    when the text it learns from (``task.needed_text``) is missing or blank.

    Captioning learns the example's ``text``; other tasks read ``task.text_of(example)``, which
    is a fixed prompt for some (classification with ``prompt``), so their blank texts do not matter;
    instruct also leaves out a conversation with no room for an answer in ``text.max_length``.
    """
    reason = task.unusable(example)
    return None if reason is None else Unusable(reason, str(example.get("image")))


class SplitLog:
    """The bad examples of one split: this epoch's counts, and every one skipped over the run."""

    def __init__(self, split: str, policy: str = "skip"):
        if policy not in POLICIES:
            raise ValueError(f"on_bad_sample = {policy!r}: choose one of {', '.join(POLICIES)}")
        self.split, self.policy = split, policy
        self.ever: set[int] = set()
        self.new_epoch()

    def new_epoch(self) -> None:
        self.seen = 0
        self.reasons: Counter = Counter()
        self.first: DataError | None = None

    def skip(self, example: dict, error: DataError) -> None:
        """Count ``example`` as skipped, or end the run under ``stop``."""
        if self.policy == "stop":
            raise stop_error(error, f"{self.split} example")
        self.reasons[reason_of(error)] += 1
        self.first = self.first or error
        # Examples are the same dict objects all run long (the data loader indexes the split's
        # list), so their ids count each bad example once however many epochs skip it.
        self.ever.add(id(example))

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def line(self, when: str) -> str | None:
        """The one warning line for this epoch, or None when nothing was skipped."""
        if not self.reasons:
            return None
        detail = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(self.reasons.items()))
        return (f"peftmm: {when}: skipped {self.skipped:,} of {self.seen:,} {self.split} examples "
                f"({detail}); first: {self.first}")

    def all_skipped_error(self) -> DataError:
        detail = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(self.reasons.items()))
        return DataError(f"none of the {self.seen:,} {self.split} examples could be used ({detail}); "
                         f"first: {self.first}")

    def merged(self, accelerator) -> SplitLog:
        """Under several processes each one sees its shard of train: what they skipped together
        (a copy for reporting; its ``ever`` only has the right size)."""
        if accelerator.num_processes == 1:
            return self
        from accelerate.utils import gather_object

        states = gather_object([(self.seen, dict(self.reasons), self.first, len(self.ever))])
        total = SplitLog(self.split, self.policy)
        total.seen = sum(s[0] for s in states)
        total.reasons = sum((Counter(s[1]) for s in states), Counter())
        total.first = next((s[2] for s in states if s[2] is not None), None)
        total.ever = set(range(sum(s[3] for s in states)))
        return total


def stop_error(error: DataError, what: str = "example") -> DataError:
    """The one error that ends a run under ``data.on_bad_sample: stop``: the file and the reason."""
    return DataError(f"{error.message} ({what}); stopped because data.on_bad_sample is 'stop' "
                     "(with 'skip' such examples are left out and counted)", error.where)


def cache_on_bad(policy: str):
    """What FeatureCache.fill does with an unreadable image: under ``skip`` it is left uncached
    (the batcher then counts its examples as they come), under ``stop`` the run ends there."""
    def on_bad(key: str, error: DataError) -> None:
        if policy == "stop":
            raise stop_error(error, "image of an example")
    return on_bad
