"""Inference on a saved bundle: predict one example, or evaluate a split."""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import torch

from .batching import Batcher
from .bundle import load_bundle, resolve_bundle
from .data import load_splits
from .data.conversations import prompt_turns
from .errors import PeftmmError
from .evaluation import evaluate
from .images import load_image
from .precision import inference_context
from .safe_load import short_repr
from .tensors import to_device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    def __init__(self, model, recipe, config, device):
        self.model, self.recipe, self.config, self.device = model, recipe, config, device
        self.batcher = Batcher(model)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, merge: bool = False) -> Predictor:
        """``merge=True`` folds LoRA into non-quantised backbones: same answers, faster calls."""
        device = device or default_device()
        model, recipe, config = load_bundle(resolve_bundle(path), device=device)
        if merge:
            model.merge_methods()
        return cls(model, recipe, config, device)

    def precision(self):
        """The context inference runs under: the bundle's training precision on CUDA (precision.py)."""
        return inference_context(self.config.get("precision"), self.device)

    @torch.no_grad()
    def predict_batch(self, examples: list[dict]) -> list[dict]:
        batch = to_device(self.batcher(examples), self.device)
        with self.precision():
            return self.model.task.decode(self.model(batch))

    def predict(self, image: str | Path, question: str | None = None) -> dict:
        text = self.model.task.text_of({"text": question})  # some tasks fix their own text
        if not isinstance(text, str) or not text.strip():
            raise PeftmmError(f"this {self.config['task']} bundle needs {self.model.task.text_request}")
        return self.predict_batch([{"image": str(image), "text": question}])[0]

    def generate(self, messages: list[dict], image, **options) -> dict:
        """The assistant's next turn in a conversation about ``image``, for a bundle whose task
        converses (instruct): :meth:`generate_batch` for one conversation."""
        return self.generate_batch([{"messages": messages, "image": image}], **options)[0]

    @torch.no_grad()
    def generate_batch(self, requests: list[dict], **options) -> list[dict]:
        """Generation entry point (the CLI's predict --prompt and chat, and the OpenAI-style API).

        ``requests``: ``[{"messages": [...], "image": path or PIL image}]``, generated together
        (left-padded into one batch). ``messages`` in OpenAI's chat shape with string content:
        ``[{"role": "system" | "user" | "assistant", "content": str}]`` ending with the user's
        turn; ``<image>`` in a user message puts the image there, else it opens the first user
        message. ``options`` (each None or left out: the bundle's own setting): ``max_new_tokens``,
        ``num_beams``, ``do_sample``, ``temperature``, ``top_p``, ``seed`` (sampling made repeatable).
        Returns per request ``{"text", "prompt_tokens", "completion_tokens", "finish_reason":
        "stop" | "length"}`` (prompt tokens count the image's). Bad input: PeftmmError naming it.
        """
        from PIL import Image

        task = self.model.task
        if not task.converses:
            raise PeftmmError(f"this {self.config['task']} bundle answers no conversation; an instruct bundle does")
        if not requests:
            return []
        examples, pixels = [], {}
        for i, request in enumerate(requests):
            image = request.get("image")
            if isinstance(image, Image.Image):
                key = f"object:{id(image)}"
            elif isinstance(image, (str, Path)):
                key, image = str(image), load_image(image)
            else:
                raise PeftmmError("each conversation needs an image (a path or a PIL image)", f"request {i}")
            pixels.setdefault(key, self.model.towers["vision"].processor(image))
            examples.append({"image": key, "conversation": prompt_turns(request.get("messages"))})
        images = list(pixels)
        batch = {"image_index": torch.tensor([images.index(e["image"]) for e in examples]),
                 **self.batcher.vision_inputs(images, pixels),
                 **task.text_inputs(self.model.towers["text"], examples, self.model.max_length)}
        with self.precision():
            return task.reply(self.model, to_device(batch, self.device), options)

    @torch.no_grad()
    def classify(self, image: str | Path, labels: list[str], template: str = "{}") -> dict:
        """Zero-shot classification with a retrieval bundle: the image against one text per label
        (``template`` with the label in place of ``{}``), ranked by the trained similarity."""
        if not self.model.task.ranks_texts:
            raise PeftmmError(f"zero-shot labels need a retrieval bundle; this one is a {self.config['task']} bundle")
        labels = [label.strip() for label in labels if label.strip()]
        if len(labels) < 2:
            raise PeftmmError("give at least two labels, and a template containing {} for the label")
        check_template(template)
        batch = self.batcher([{"image": str(image), "text": template.format(label)} for label in labels])
        with self.precision():
            outputs = self.model(to_device(batch, self.device))
        probs = self.model.task.text_probabilities(outputs)
        order = probs.argsort(descending=True).tolist()
        return {"answer": labels[order[0]],
                "scores": [{"answer": labels[i], "score": round(probs[i].item(), 6)} for i in order]}


def check_template(template: str) -> None:
    """A label template holds ``{}`` exactly once and no other field (``{x}``, ``{0.a}``, ``{:>9}``),
    so ``template.format(label)`` cannot fail; ``{{`` and ``}}`` write braces."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise PeftmmError(f"--template {short_repr(template)}: not a valid template ({e}); write {{{{ and }}}} for "
                          "literal braces") from None
    if fields != [("", "", None)]:
        found = ", ".join("{" + name + "}" for name, _, _ in fields)
        raise PeftmmError(f"--template {short_repr(template)} must contain {{}} exactly once, for the label, and no "
                          f"other {{field}} (it has {len(fields)}: {found or 'none'}); "
                          "write {{ and }} for literal braces")


def evaluate_bundle(path: str | Path, split: str = "test", batch_size: int = 256, progress: bool = True,
                    device: str | None = None, max_samples: int | None = None, full_split: bool = False) -> dict:
    """By default the split as the bundle's training run scored it (its data.max_eval_samples cap
    included), so the result reproduces the card; ``full_split`` lifts that cap."""
    predictor = Predictor.load(path, device)
    spec = predictor.recipe.data
    if full_split:
        spec = dataclasses.replace(spec, max_eval_samples=None)
    examples = load_splits(spec)[split]
    if max_samples:
        examples = examples[:max_samples]
    with predictor.precision():
        return evaluate(predictor.model, examples, predictor.batcher, batch_size, predictor.device,
                        progress=progress, desc=split) | {"examples": len(examples)}
