"""The multi-adapter runtime: frozen backbones loaded once, any number of bundles on them.

Each registered bundle becomes a MultimodalModel that shares its towers with every other bundle
built on the same weights (same fingerprint and precision): its methods live inside the shared
towers under a slot named after the bundle, its fusion and head are its own. Each example of a
call names its adapter. Switching adapters is one in-place list assignment per tower (see
ActiveSlots in methods/base.py): no backbone reload, no weight copy.

One call may mix adapters. Its examples are encoded tower by tower: inputs that run the same
tower in the same slot are encoded once; where every method involved allows mixed batches (LoRA
through peft's ``adapter_names``, bottleneck adapters) the rows of all slots go through the
tower in one forward pass, otherwise one slot at a time. Fusion and head then run per adapter.

A captioning bundle (a task that writes text with a decoder LM) shares the vision tokens of
such a call, but its text tower is a causal LM loaded with its output layer, and it generates
(runtime_generation.py): with that bundle's own prompt, num_beams and max_new_tokens, once per
distinct input. An instruct bundle (a task that ``converses``) takes the same path with the
request's messages (or its text) as the conversation to answer, and its rows join those of other
instruct adapters on the same LM in one ``generate`` where their methods mix batches (LoRA).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import TOWERS, Tower, load_tower
from .bundle import (
    bundle_summary,
    check_adapter_name,
    config_path,
    is_bundle,
    load_bundle,
    read_config,
    resolve_bundle,
)
from .errors import BundleError, DataError, MergeError
from .features import pad_tokens
from .hub_bundles import HUB_SCHEME, parse_reference
from .images import load_image, parse_background
from .merging import check_agree, combination, combine_into, output_model
from .methods.base import NO_SLOT
from .precision import common_record, inference_context
from .predict import default_device
from .recipe import from_dict
from .runtime_generation import generate_rows
from .tasks import TASKS
from .tensors import to_device


@dataclass
class Registered:
    name: str
    path: Path
    model: object            # MultimodalModel sharing its towers
    recipe: object
    config: dict
    tower_keys: dict          # tower name -> key in Runtime._towers
    bytes: int
    mix: dict | None = None   # a request-time mix: what it combines (Combination.record)


class Runtime:
    """Serve many bundles from one process. Thread-safe: calls are serialised by one lock."""

    def __init__(self, device: str | None = None, root: str | Path | None = None):
        self.device = device or default_device()
        self.root = Path(root).resolve() if root is not None else None  # bundles only from here
        self._towers: dict[tuple, Tower] = {}
        self._adapters: dict[str, Registered] = {}
        self._lock = threading.RLock()

    # -- registry --------------------------------------------------------------------------
    def register(self, bundle: str | Path, name: str | None = None) -> dict:
        """Load a bundle onto the (shared) backbones under ``name`` (default: its folder's name,
        which ``peftmm publish`` makes the bundle's own name too).

        Either the whole bundle is registered or, on any error, nothing of it stays.
        """
        with self._lock:
            path = self._locate(bundle)
            config = read_config(path)
            if name is None:   # a Hub bundle's folder is a commit hash: its repository's name says more
                name = parse_reference(str(bundle))[0].split("/")[1] if str(bundle).startswith(HUB_SCHEME) \
                    else path.name
            name = check_adapter_name(name)
            if name in self._adapters:
                raise BundleError(f"an adapter named {name!r} is already registered; unregister it first",
                                  kind="conflict")
            # The config picks and keys backbones below: checked first as load_bundle checks it
            # (weights header, config checksum, a recipe that validates), so a damaged or edited
            # one is refused with its own error, before anything loads.
            bundle_summary(path)
            recipe = from_dict(config["recipe"], source=str(config_path(path)))
            keys = {tower: self._tower_key(tower, config, recipe, name) for tower in TOWERS}
            new = [key for key in keys.values() if key not in self._towers]
            try:
                for tower, key in keys.items():
                    if key not in self._towers:
                        spec = getattr(recipe, tower)
                        self._towers[key] = load_tower(tower, spec.backbone, spec.precision, device=self.device,
                                                       image_size=spec.image_size, causal_lm=key[3])
                towers = {tower: self._towers[key] for tower, key in keys.items()}
                model, recipe, config = load_bundle(path, self.device, towers=towers, slot=name)
            except BaseException:
                for key in new:
                    self._towers.pop(key, None)
                raise
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            self._adapters[name] = Registered(name, path, model, recipe, config, keys, size)
            return self.describe(name)

    def register_mix(self, name: str, weights: dict[str, float], method: str = "linear",
                     density: float | None = None, seed: int | None = None) -> dict:
        """Register ``name`` as a weighted mix of registered adapters, without writing a bundle:
        ``weights`` maps adapter names to weights, combined as ``peftmm merge`` combines bundles
        (merging.py; the same refusals), so the mix answers as the merged bundle would.

        The mix is a copy: it keeps answering if its sources are unregistered later.
        """
        with self._lock:
            name = check_adapter_name(name)
            if name in self._adapters:
                raise BundleError(f"an adapter named {name!r} is already registered; unregister it first",
                                  kind="conflict")
            if not isinstance(weights, dict) or not weights:
                raise MergeError("a mix names registered adapters with their weights, e.g. {\"a\": 0.5, \"b\": 0.5}")
            entries = [self._get(source) for source in weights]
            how = combination(len(entries), list(weights.values()), method, density, seed)
            check_agree([(e.name, e.config, {k: tuple(v.shape) for k, v in e.model.trainable_state_dict().items()})
                         for e in entries])
            first = entries[0]
            for entry in entries[1:]:
                if entry.tower_keys != first.tower_keys:
                    raise MergeError(f"its backbones are loaded apart from {first.name}'s (another precision): "
                                     "a mix needs its adapters on the same loaded backbones", entry.name)
            towers = {tower: self._towers[key] for tower, key in first.tower_keys.items()}
            model, recipe = output_model(first.path, first.config, how, self.device, towers, name)
            try:
                combine_into(model, [e.model for e in entries], how, [e.name for e in entries])
            except BaseException:
                model.remove_methods()
                raise
            record = how.record([{"name": e.name, "bundle": e.path.name} for e in entries])
            config = {**first.config, "recipe": recipe.to_dict(), "metrics": {}, "merge": record}
            self._adapters[name] = Registered(name, first.path, model, recipe, config, dict(first.tower_keys), 0,
                                              mix=record)
            return self.describe(name)

    def unregister(self, name: str) -> None:
        with self._lock:
            entry = self._get(name)
            entry.model.remove_methods()
            del self._adapters[name]
            used = {key for other in self._adapters.values() for key in other.tower_keys.values()}
            for key in set(entry.tower_keys.values()) - used:  # the last user of a backbone is gone
                del self._towers[key]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def describe(self, name: str) -> dict:
        entry = self._get(name)
        config, model = entry.config, entry.model
        trainable = sum(t.numel() for t in model.trainable_state_dict().values())
        return {
            "name": name, "bundle": entry.path.name, "task": config["task"], "labels": len(config["labels"]),
            "methods": {t: [m.registry_name for m in model.methods[t]] for t in TOWERS},
            "fusion": entry.recipe.fusion.type,
            "backbones": {t: {"backbone": config["towers"][t]["backbone"],
                              "precision": config["towers"][t]["precision"],
                              "fingerprint": config["towers"][t]["fingerprint"][:16]} for t in TOWERS},
            "question": question_use(model.task), "trainable_params": trainable, "bytes": entry.bytes,
            "metrics": {k: v for k, v in config.get("metrics", {}).items() if isinstance(v, (int, float, str))},
        } | ({"mix": entry.mix} if entry.mix else {})

    def backbones(self) -> list[dict]:
        """Every loaded backbone once, with the adapters that use it."""
        with self._lock:
            return [{"tower": key[0], "fingerprint": key[1][:16], "precision": key[2], "causal_lm": key[3],
                     "source": tower.info.source,
                     "adapters": sorted(n for n, e in self._adapters.items() if key in e.tower_keys.values())}
                    for key, tower in self._towers.items()]

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter that acts in its towers (what every call does first)."""
        model = self._get(name).model
        for tower in TOWERS:
            model.activate(tower)

    def require(self, name: str) -> None:
        """Raise the runtime's not-found error unless ``name`` is registered."""
        self._get(name)

    def task_of(self, name: str) -> str:
        """The task type of adapter ``name`` (``vqa``, ``captioning``, ...)."""
        return self._get(name).model.task.registry_name

    def path_of(self, name: str) -> Path:
        """The bundle folder adapter ``name`` was loaded from."""
        return self._get(name).path

    def question_use(self, name: str) -> str:
        """How adapter ``name`` treats a request's text: see :func:`question_use`."""
        return question_use(self._get(name).model.task)

    def _get(self, name: str) -> Registered:
        try:
            return self._adapters[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._adapters)) or "none"
            raise BundleError(f"no adapter named {name!r} is registered (registered: {known})",
                              kind="not_found") from None

    def _locate(self, bundle: str | Path) -> Path:
        if self.root is None or str(bundle).startswith(HUB_SCHEME):   # a Hub bundle goes to the Hub cache
            return resolve_bundle(str(bundle) if str(bundle).startswith(HUB_SCHEME) else bundle)
        path = (self.root / bundle).resolve()  # resolve() follows links: they cannot lead out either
        if not path.is_relative_to(self.root):
            raise BundleError(f"{str(bundle)!r} is outside the adapters folder {self.root}")
        if not is_bundle(path):
            raise BundleError(f"no adapter bundle {str(bundle)!r} in {self.root}", kind="not_found")
        return path

    @staticmethod
    def _tower_key(tower: str, config: dict, recipe, name: str) -> tuple:
        """Bundles on the same weights at the same precision share a tower; one that fine-tunes
        a tower in full gets a private copy, since it changes the backbone's own weights.

        A text tower loaded as a causal LM (captioning) is another entry than the same weights
        loaded as an encoder, even though both could run on one load (the encoder path reads
        the LM's base model): the two loads name their modules differently (``model.layers.0``
        under the LM head, ``layers.0`` without it), and a bundle's methods and tensors are
        named relative to the load it trained on, so sharing would need every name rewritten.
        Two loads of a text backbone cost memory only when both kinds of bundle are served."""
        info = config["towers"][tower]
        private = any(m.type == "full" for m in getattr(recipe, tower).methods)
        causal_lm = tower == "text" and TASKS.get(recipe.task.type).text_tower_causal_lm
        return (tower, info["fingerprint"], info["precision"], causal_lm) + ((name,) if private else ())

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, requests: list[dict]) -> list[dict]:
        """Each request: ``{"adapter": name, "image": path or PIL image, "text": str}``; a
        captioning adapter takes no text (``{"adapter", "image"}``) and answers ``{"caption"}``.

        Optional keys (the OpenAI-compatible API sends them): ``"usage": True`` adds token counts
        to a label answer's result; for an adapter that writes text, ``"generation"`` (a
        GenerationOptions) overrides its decoding for this request and adds ``"usage"`` (with
        ``finish_reason``), ``"stream"`` is a callable that takes the text so far as it grows, and
        ``"messages"`` a conversation for a task that reads one (generation.py).

        Returns one result per request, in order, each tagged with the adapter that made it.
        """
        with self._lock:
            entries = [self._get(r.get("adapter")) for r in requests]
            images = _decode_images(requests)
            texts = [_text_of(e.model.task, r, i) for i, (r, e) in enumerate(zip(requests, entries))]
            writers = {i for i, e in enumerate(entries) if e.model.task.text_tower_causal_lm}
            readers = [i for i in range(len(requests)) if i not in writers]  # a captioner's LM reads no text here
            tokens = {"vision": self._encode("vision", range(len(requests)), texts, entries, images),
                      "text": self._encode("text", readers, texts, entries, images)}
            results: list[dict | None] = [None] * len(requests)
            written = generate_rows(self.device, sorted(writers), entries, tokens["vision"], images, requests)
            for i, result in written.items():
                results[i] = {"adapter": entries[i].name, **result}
            by_adapter = defaultdict(list)
            for i in readers:
                by_adapter[entries[i].name].append(i)
            for name, indices in by_adapter.items():
                model = self._adapters[name].model
                with inference_context(self._adapters[name].config.get("precision"), self.device):
                    vision, vision_mask = pad_tokens([tokens["vision"][i] for i in indices])
                    text, text_mask = pad_tokens([tokens["text"][i] for i in indices])
                    decoded = model.task.decode(model.head(model.fusion(vision, vision_mask, text, text_mask)))
                    decoded = [{**d, "usage": self._usage(model, requests[i], texts[i], d)}
                               if requests[i].get("usage") else d for i, d in zip(indices, decoded)]
                for i, result in zip(indices, decoded):
                    results[i] = {"adapter": name, **result}
            return results

    def _usage(self, model, request: dict, text: str, result: dict) -> dict:
        """Token counts of a label answer, in the adapter's tokenizer: the text the text tower read
        (special tokens included, cut at max_length), and the answer (retrieval: the text scored)."""
        tok = model.towers["text"].processor
        answer = result.get("answer", request.get("text") or "")
        return {"prompt_tokens": len(tok(text, truncation=True, max_length=model.max_length)["input_ids"]),
                "completion_tokens": len(tok(str(answer), add_special_tokens=False)["input_ids"]),
                "finish_reason": "stop"}

    def _encode(self, tower_name: str, which, texts, entries, images) -> list[torch.Tensor | None]:
        """Per request in ``which``, the tower's tokens for its input ([N, D], padding dropped);
        None for the others."""
        rows: dict[tuple, list[int]] = {}  # (tower id, slot, input) -> requests that need it
        for i in which:
            model = entries[i].model
            slot = model.slot if model.methods[tower_name] else NO_SLOT
            if tower_name == "vision":
                spec = entries[i].recipe.vision   # each bundle's own size and background (one shared tower)
                value = (images[i][0], spec.image_size or model.towers["vision"].processor.size,
                         parse_background(spec.background))
            else:
                value = (texts[i], model.max_length)
            rows.setdefault((id(model.towers[tower_name]), slot, value), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(entries)
        by_tower = defaultdict(list)
        for key, users in rows.items():
            by_tower[key[0]].append((key, users))
        for group in by_tower.values():
            tower = entries[group[0][1][0]].model.towers[tower_name]
            for chunk in self._chunks(tower_name, group, entries):
                encoded = self._forward(tower, chunk, entries, images)
                for (_, users), tokens in zip(chunk, encoded):
                    for i in users:
                        out[i] = tokens
        return out

    def _chunks(self, tower_name: str, group, entries) -> list[list]:
        """Rows that go through the tower together: all slots at once where every method involved
        mixes, else one slot at a time; images of one size per pass."""
        slots = {key[1] for key, _ in group}
        methods = [m for key, users in group for m in entries[users[0]].model.methods[tower_name]]
        mixed = len(slots) > 1 and all(m.mixed_batches for m in methods)
        chunks = defaultdict(list)
        for key, users in group:
            size = key[2][1] if tower_name == "vision" else None
            chunks[(size, None if mixed else key[1])].append((key, users))
        return list(chunks.values())

    def _forward(self, tower: Tower, chunk, entries, images) -> list[torch.Tensor]:
        slots = [key[1] for key, _ in chunk]
        if tower.name == "vision":
            inputs = {"pixel_values": torch.stack([tower.image_processor(key[2][1], key[2][2])(images[users[0]][1])
                                                   for key, users in chunk])}
        else:
            inputs = _tokenize(tower, [(key[2][0], key[2][1]) for key, _ in chunk])
        inputs = to_device(inputs, self.device)
        # rows of bundles trained at different precisions go through in fp32 (precision.common_record)
        with inference_context(common_record([entries[users[0]].config.get("precision") for _, users in chunk]),
                               self.device):
            return self._run(tower, slots, inputs)

    @staticmethod
    def _run(tower: Tower, slots: list, inputs: dict) -> list[torch.Tensor]:
        if len(set(slots)) == 1:
            tower.slots.activate(None if slots[0] == NO_SLOT else slots[0])
            tokens, mask = tower(**inputs)
        else:
            tower.slots.activate(None)
            tower.slots.rows = slots
            try:
                tokens, mask = tower(**inputs)
            finally:
                tower.slots.rows = None
        return [t[m] for t, m in zip(tokens, mask)]


def _tokenize(tower: Tower, texts: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Texts truncated at each one's own max_length (as Tower.tokenize does), padded together."""
    ids: list = [None] * len(texts)
    for length in {length for _, length in texts}:
        which = [i for i, (_, n) in enumerate(texts) if n == length]
        encoded = tower.processor([texts[i][0] for i in which], truncation=True, max_length=length)
        for i, row in zip(which, encoded["input_ids"]):
            ids[i] = row
    padded = tower.processor.pad({"input_ids": ids}, return_tensors="pt")
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}


def question_use(task) -> str:
    """How an adapter of ``task`` treats a request's text: ``"required"`` (it reads the question:
    VQA, retrieval), ``"ignored"`` (its task fixes the text: classification with a prompt), or
    ``"refused"`` (captioning: it writes text itself, and a question sent to it would pass its
    caption off as an answer to that question; its Predictor refuses a question too). An instruct
    adapter (a task that converses) answers the question in words: ``"required"``."""
    if task.text_tower_causal_lm and not task.converses:
        return "refused"
    fixed = task.text_of({"text": None})
    return "ignored" if isinstance(fixed, str) and fixed.strip() else "required"


def _text_of(task, request: dict, index: int) -> str:
    given = request.get("text")
    if task.text_tower_causal_lm and not task.converses:
        if isinstance(given, str) and given.strip():
            raise DataError(f"a {task.registry_name} adapter describes the image itself: send no question "
                            "or text", f"request {index}")
        return ""
    if task.converses and request.get("messages") is not None:   # instruct: the question is in the messages
        return ""
    text = task.text_of({"text": given})  # a task may fix the text (classification)
    if not isinstance(text, str) or not text.strip():
        raise DataError("each request needs a non-empty question text", f"request {index}")
    return text


def _decode_images(requests: list[dict]) -> list[tuple]:
    """(key, PIL image) per request; a path is read once per call however often it appears."""
    from PIL import Image

    decoded, out = {}, []
    for i, request in enumerate(requests):
        image = request.get("image")
        if isinstance(image, Image.Image):
            out.append((f"object:{id(image)}", image))
        elif isinstance(image, (str, Path)):
            key = str(image)
            if key not in decoded:
                decoded[key] = load_image(key)
            out.append((key, decoded[key]))
        else:
            raise DataError("each request needs an image (a path or a PIL image)", f"request {i}")
    return out

