"""Image(-text) classification into a data set's labels, e.g. the Unicode group of an emoji.

The same head, loss and metrics (accuracy, macro-F1) as VQA's answer classification. With a
``prompt``, every example's text is that fixed prompt, so the label is read from the image
alone (the setup of a linear probe on image features); without one, from image and text.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import TASKS
from .vqa import VQATask


@TASKS.register("classification")
class ClassificationTask(VQATask):
    @dataclass
    class Config(VQATask.Config):
        prompt: str | None = None  # a fixed text for every example: classify the image alone

    def text_of(self, example: dict) -> str:
        return self.config.prompt if self.config.prompt is not None else example["text"]
