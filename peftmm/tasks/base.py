"""What every task provides: a head, how a batch runs through the model, loss, metrics, decoding.

This class is the whole interface between a task and the rest of peftmm: the trainer, batcher,
planner, runtime, skip log, bundle and model ask a task only what is declared here (attributes
and methods, each with a default), never its class or whether it has some attribute. A new task
is one module in ``tasks/`` that subclasses :class:`Task` (or :class:`~.labels.LabelTask`),
overrides what differs, and registers itself with ``@TASKS.register("name")``.

Most tasks (VQA, classification, retrieval) read one fused vector per example: the default
:meth:`Task.forward` encodes both towers, fuses them and applies the head. A task that needs
another path through the model (captioning feeds vision tokens into a decoder LM) overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones import TOWERS
from ..data.skips import EMPTY_TEXT

# Prefix of bundle tensors a task built from data rather than trained (captioning's caption
# memory, retrieval's pair memory): kept apart from the trainable ones (Task.load_memory takes
# them, not the model).
MEMORY = "memory"


class Task:
    # -- what the task is: class attributes, read from the class or an instance ------------------
    registry_name: str = ""   # the name recipes and bundles select it by (set by TASKS.register)
    primary_metric: str = "accuracy"   # the val metric early stopping maximises and the card leads with
    fusions: tuple[str, ...] | None = None   # fusion types whose output it can read; None: any
    # Under several processes (distributed.batch_loss): a loss where each example's term depends
    # on the others' outputs (contrastive) is computed over the gathered batch; any other is a
    # mean over loss_units(targets) and is reweighted by each process's share of them.
    loss_spans_batch: bool = False
    cached_towers: tuple[str, ...] = TOWERS   # towers whose frozen outputs training may cache
    text_tower_causal_lm: bool = False   # the text tower loads as a causal LM with its output layer
    own_text_inputs: bool = False   # it builds text-tower inputs and labels itself (text_inputs)
    own_evaluation: bool = False   # it evaluates a split with its own loop (evaluate), not loss + metrics
    classifies_into_labels: bool = False   # one output per label: val and test labels must occur in train
    targets_need_labels: bool = True   # targets come from examples' labels: batches without get none
    ranks_texts: bool = False   # it scores one image against many texts (text_probabilities)
    converses: bool = False   # it answers a conversation about an image by writing text (reply)
    text_noun: str = "text"   # what its examples' text is called in messages ("caption")
    text_request: str = "the text read with the image (--text)"   # what predict asks for when it is missing
    pipeline_tag: str | None = None   # the Hugging Face pipeline tag of its model cards
    # -- set by __init__ -------------------------------------------------------------------------
    config: object       # its Config, as the recipe set it
    labels: list[str]    # the data set's labels (answers, classes; bundles store them)
    # What the task built from data (captioning's caption memory, retrieval's pair memory): an
    # object with tensors() -> dict and to(device), or None.
    memory = None

    @dataclass
    class Config:
        """The task's settings (a recipe's ``task:`` mapping is validated against it); none here."""

    def __init__(self, config, labels: list[str]):
        self.config = config
        self.labels = list(labels)

    # -- the recipe and the model ----------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Refuse task settings that do not fit the rest of the recipe (RecipeError)."""

    @classmethod
    def predict_arguments(cls, config: dict) -> str:
        """What ``peftmm predict`` needs besides ``--image`` for a bundle of this task (``config``:
        the saved ``task:`` mapping), as shell arguments for its model card."""
        return ""

    @classmethod
    def describe_memory(cls, config: dict, memory: dict[str, torch.Tensor]) -> str | None:
        """One line for the model card on the ``memory.*`` tensors of a bundle of this task (keyed
        without the prefix; ``config``: the saved ``task:`` mapping), None for nothing to say."""
        return None

    def attach(self, model) -> None:
        """Once the model is built around the task (``model.max_length`` set): a task that needs the
        model's shapes or tokenizer before its first batch (instruct: how many image tokens the
        projector gives, where they go in the prompt) reads them here, and refuses a model it cannot
        use (PeftmmError)."""

    def build_head(self, in_dim: int) -> torch.nn.Module:
        """The trained module on top of the fusion's ``in_dim`` outputs."""
        raise NotImplementedError

    def reuses_head(self, task: str, labels: list[str]) -> bool:
        """Whether a head trained for task ``task`` on ``labels`` (another bundle's, for
        ``init_from``) is this task's head: the same kind, the same answers."""
        return task == self.registry_name and list(labels) == self.labels

    # -- state built from data -------------------------------------------------------------------
    def prepare(self, model, examples: list[dict], batcher, device, progress: bool = False) -> None:
        """Once before training, with the train examples (after feature caching): a task that
        keeps state built from the data (captioning's caption memory) builds it here."""

    def finish(self, model, examples: list[dict], batcher, device, progress: bool = False) -> None:
        """Once after training, with the best weights loaded and the train examples, before the
        test split is evaluated and the bundle saved (retrieval's pair memory is built here)."""

    def prepare_shapes(self, model, examples: list[dict]) -> None:
        """What ``prepare`` builds, in shape only, encoding nothing (peftmm plan's meta model)."""

    def memory_tensors(self) -> dict[str, torch.Tensor]:
        """Non-trainable tensors the task built in ``prepare`` or ``finish`` (its ``memory``);
        bundles store them as ``memory.*``."""
        return self.memory.tensors() if self.memory is not None else {}

    def load_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``memory_tensors`` gave (from a bundle)."""

    def memory_to(self, device) -> None:
        """Keep the memory (if any) on ``device``, the model's: moved once, not on every forward."""
        if self.memory is not None:
            self.memory.to(device)

    # -- examples and batches --------------------------------------------------------------------
    def text_of(self, example: dict) -> str:
        """The text the text tower reads for an example (a task may fix it, see classification)."""
        return example["text"]

    def needed_text(self, example: dict) -> str | None:
        """The text the task learns from for an example, None if it has none: an example whose
        needed text is missing or blank is left out of training (data/skips.py)."""
        try:
            return self.text_of(example)
        except KeyError:            # a label-only record read by a task that needs a text
            return None

    def unusable(self, example: dict) -> str | None:
        """Why an example cannot be learnt from, as a short reason the skip log counts
        (data/skips.py), or None: by default when its needed text is missing or blank."""
        text = self.needed_text(example)
        return None if isinstance(text, str) and text.strip() else EMPTY_TEXT

    def text_inputs(self, tower, examples: list[dict], max_length: int) -> dict:
        """The text-tower inputs (and ``labels``) of a batch, for a task with ``own_text_inputs``."""
        raise NotImplementedError(f"task {self.registry_name!r} reads text_of through the text tower")

    def targets(self, examples: list[dict]) -> torch.Tensor:
        """The ``labels`` of a batch of examples."""
        raise NotImplementedError

    def truncated(self, tokenizer, examples: list[dict], max_length: int) -> tuple[int, str]:
        """How many of ``examples`` have a text the tokenizer cuts at ``max_length``, and a warning
        naming the limit (empty when none is cut)."""
        texts = [t for t in map(self.needed_text, examples) if t and t.strip()]
        return count_too_long(tokenizer, texts, max_length, f"text.max_length={max_length} tokens", self.text_noun)

    # -- forward, loss, scores -------------------------------------------------------------------
    def forward(self, model, batch: dict) -> torch.Tensor:
        """The outputs of a batch (what ``loss``, ``metrics`` and ``decode`` read)."""
        # The batcher encodes each distinct image and text once; *_index maps examples to them.
        vision, vision_mask = model.encode("vision", batch)
        text, text_mask = model.encode("text", batch)
        vi, ti = batch["image_index"], batch["text_index"]
        return model.head(model.fusion(vision[vi], vision_mask[vi], text[ti], text_mask[ti]))

    def generate(self, model, batch: dict) -> torch.Tensor:
        """Token ids the text tower writes for a batch, for a task with ``text_tower_causal_lm``."""
        raise NotImplementedError(f"task {self.registry_name!r} writes no text")

    def reply(self, model, batch: dict, options: dict | None = None) -> list[dict]:
        """For a task that ``converses``: per example of ``batch`` (``text_inputs`` of conversations
        ending with a user turn), the assistant's next turn, generated with the task's settings
        overridden by ``options``: ``{"text", "prompt_tokens", "completion_tokens", "finish_reason"}``."""
        raise NotImplementedError(f"task {self.registry_name!r} answers no conversation")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch's outputs against its targets."""
        raise NotImplementedError

    def loss_units(self, targets: torch.Tensor) -> int | torch.Tensor:
        """How many terms ``loss`` averages over: one per example unless a task says otherwise."""
        return len(targets)

    def metrics(self, outputs, targets) -> dict[str, float]:
        """Scores over a whole split: the predictions for all its examples, in order, against their
        targets (``forward``'s outputs and ``targets``, or what ``evaluate`` gathers)."""
        raise NotImplementedError

    def evaluate(self, model, examples: list[dict], batcher, batch_size: int, device, progress: bool = False,
                 desc: str = "eval") -> dict:
        """Loss and metrics over ``examples``, for a task with ``own_evaluation`` (its metrics need
        more than one forward pass per batch: captioning generates)."""
        raise NotImplementedError(f"task {self.registry_name!r} is evaluated by trainer.evaluate")

    def decode(self, outputs: torch.Tensor) -> list[dict]:
        """Per example, the answer a person reads (``{"answer": ...}``, ``{"caption": ...}``)."""
        raise NotImplementedError

    def text_probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """For a batch of one image paired with N texts, a softmax over the texts, for a task that
        ``ranks_texts`` (zero-shot labels)."""
        raise NotImplementedError(f"task {self.registry_name!r} does not rank texts")

    def generate_text(self, model, batch: dict, options=None, streams=None):
        """For a task that writes text with its text tower as a causal LM (``text_tower_causal_lm``):
        generate for the rows of ``batch`` under ``options`` (a GenerationOptions; None: the
        bundle's own settings), sending each row's new text to ``streams[row]`` where given, and
        return a :class:`~peftmm.generation.Generated` whose ``ids`` ``decode`` reads. The whole
        contract, which the runtime and the OpenAI-compatible API rely on, is in generation.py."""
        raise NotImplementedError(f"task {self.registry_name} answers without generating text")

    def shared_generation(self, options) -> tuple | None:
        """For a task that writes text: what one ``generate`` call fixes for rows generated under
        ``options`` (a GenerationOptions) besides their prompts (decoding settings, stop and pad
        tokens), as a hashable key. Rows of several adapters on one LM whose keys are equal may
        then be generated together (``prompt_embeddings`` per adapter, joined, one
        ``generate_embedded``); None: this task generates each adapter's rows with
        ``generate_text``."""
        return None

    def prompt_embeddings(self, model, batch: dict):
        """For a task whose ``shared_generation`` gives a key: the rows of ``batch`` (as for
        ``generate_text``) as a :class:`~peftmm.generation.Prompt` of LM input embeddings, built
        with ``model``'s own fusion and text methods."""
        raise NotImplementedError(f"task {self.registry_name} does not share generation across adapters")

    def generate_embedded(self, model, prompt, options=None, streams=None):
        """Generate from ``prompt`` (``prompt_embeddings``, possibly joined over adapters) with the
        LM of ``model``'s text tower as its slots stand (the caller activates a slot, or sets
        ``slots.rows`` for rows of several adapters), under ``options``; as ``generate_text``."""
        raise NotImplementedError(f"task {self.registry_name} does not share generation across adapters")


def count_too_long(tokenizer, texts: list[str], room: int, where: str, noun: str, extra: int = 0,
                   special: bool = True) -> tuple[int, str]:
    """How many of ``texts`` take more than ``room`` tokens (with ``extra`` more added, and the
    special tokens if ``special``), and the warning line; each distinct text is tokenized once."""
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return 0, ""
    ids = tokenizer(distinct, add_special_tokens=special, truncation=False, verbose=False)["input_ids"]
    too_long = {t for t, i in zip(distinct, ids) if len(i) + extra > room}
    count = sum(t in too_long for t in texts)
    noun, verb = (noun, "was") if count == 1 else (noun + "s", "were")
    return count, (f"{count:,} {noun} longer than {where} {verb} truncated; raise text.max_length" if count else "")
