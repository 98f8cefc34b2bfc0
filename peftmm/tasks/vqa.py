"""Visual question answering as answer classification (the easy-VQA / VQAv2 "top answers" setup).

The answers are the data set's labels: head, loss, metrics and decoding are LabelTask's.
"""

from __future__ import annotations

from . import TASKS
from .labels import LabelTask


@TASKS.register("vqa")
class VQATask(LabelTask):
    text_request = "a question (--question)"
    pipeline_tag = "visual-question-answering"

    @classmethod
    def predict_arguments(cls, config: dict) -> str:
        return " --question 'what shape is it?'"
