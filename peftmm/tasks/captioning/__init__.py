"""Image captioning with a decoder LM (task.py), its caption memory (memory.py), its
minimum-Bayes-risk choice among beam candidates (mbr.py) and its metrics (metrics.py)."""

from .task import IGNORE, CaptioningTask

__all__ = ["IGNORE", "CaptioningTask"]
