"""Generation for the runtime's adapters that write text (captioning, instruct), batched across
adapters where the task and methods allow.

Runtime.predict hands over the rows of one call that go to such adapters, with the vision tokens
it already computed. Rows are grouped into *calls*, one ``generate`` each:

- Rows with equal generation options run together, once per distinct input (image, messages,
  text); a sampled row draws its own tokens, and one with a seed is generated alone, so the seed
  gives the same text whatever it is batched with.
- Where the task shares generation (Task.shared_generation gives a key: instruct, one sequence
  per row) and every method in the adapter's text tower mixes batches (LoRA through peft's
  ``adapter_names``), rows of *several* adapters on the same LM with equal keys and precision
  settings form one call: each adapter's rows get their input embeddings through its own projector
  (Task.prompt_embeddings), the prompts are left-padded into one batch, and one prefill plus
  decode runs with ``tower.slots.rows`` naming each row's slot, for every step of the KV-cached
  loop, since the rows never change order or number there (no beams).
- Otherwise (captioning, beam search, prefix tuning, bottleneck adapters) an adapter's rows are
  generated on their own (Task.generate_text), as a Predictor would.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from .errors import DataError
from .features import pad_tokens
from .generation import GenerationOptions, join_prompts
from .methods.base import NO_SLOT
from .precision import common_record, inference_context
from .tensors import to_device


def generate_rows(device, rows: list[int], entries, vision_tokens, images, requests) -> dict[int, dict]:
    """Per request index in ``rows`` (``entries[i]``: its Registered adapter), its result: the
    task's decoded text, plus ``usage`` where the request carried ``generation``."""
    calls: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))  # call -> adapter -> input -> rows
    for i in rows:
        model = entries[i].model
        options = options_of(requests[i], i)
        messages = requests[i].get("messages")
        key = i if options.sampling else (images[i][0], None if messages is None else json.dumps(messages),
                                          requests[i].get("text"))
        alone = (i,) if options.sampling and options.seed is not None else ()
        shared = model.task.shared_generation(options)
        if shared is not None and all(m.mixed_batches for m in model.methods["text"]):
            # bundles validated at other precisions would compute in fp32 together (common_record),
            # not as each does alone: only bundles that agree share a call
            precision = json.dumps(entries[i].config.get("precision"), sort_keys=True)
            call = ("shared", id(model.towers["text"]), shared, options, precision) + alone
        else:
            call = ("own", entries[i].name, options) + alone
        calls[call][entries[i].name].setdefault(key, []).append(i)
    out: dict[int, dict] = {}
    for call, adapters in calls.items():
        groups = [(next(entries[rows[0]] for rows in inputs.values()), list(inputs.values()))
                  for inputs in adapters.values()]
        with inference_context(common_record([entry.config.get("precision") for entry, _ in groups]), device):
            if call[0] == "shared":
                done = _shared(device, groups, vision_tokens, requests, call[3])
            else:
                done = _own(device, groups[0], vision_tokens, requests, call[2])
        for (_, inputs), decoded in zip(groups, done):
            for rows_of_input, result in zip(inputs, decoded):
                for i in rows_of_input:
                    out[i] = result
    return {i: _with_usage(out[i], requests[i]) for i in out}


def _batch(device, entry, inputs: list[list[int]], vision_tokens, requests) -> dict:
    """The task's prompt batch for one adapter's distinct inputs (first row of each)."""
    model = entry.model
    firsts = [rows[0] for rows in inputs]
    vision, vision_mask = pad_tokens([vision_tokens[i] for i in firsts])
    # an instruct adapter's question: the request's messages, or its text (a captioner has none)
    examples = [{"text": requests[i].get("text") or None, "messages": requests[i].get("messages")} for i in firsts]
    prompts = model.task.text_inputs(model.towers["text"], examples, model.max_length)
    batch = {"vision_tokens": vision, "vision_mask": vision_mask,  # model.encode uses these as given
             "image_index": torch.arange(len(firsts)), **prompts}
    return to_device(batch, device)


def _streams(inputs: list[list[int]], requests) -> list:
    return [_fan_out([requests[i].get("stream") for i in rows]) for rows in inputs]


def _own(device, group, vision_tokens, requests, options: GenerationOptions) -> list[list[dict]]:
    entry, inputs = group
    model = entry.model
    batch = _batch(device, entry, inputs, vision_tokens, requests)
    generated = model.task.generate_text(model, batch, options, _streams(inputs, requests))
    return [_results(model.task, generated, range(len(inputs)))]


def _shared(device, groups, vision_tokens, requests, options: GenerationOptions) -> list[list[dict]]:
    """One generate over the rows of every adapter in ``groups`` (one LM, equal shared keys)."""
    prompts, slots, streams = [], [], []
    for entry, inputs in groups:
        model = entry.model
        prompts.append(model.task.prompt_embeddings(model, _batch(device, entry, inputs, vision_tokens, requests)))
        slots += [model.slot if model.methods["text"] else NO_SLOT] * len(inputs)
        streams += _streams(inputs, requests)
    first = groups[0][0].model
    tower = first.towers["text"]
    if len(groups) == 1:
        first.activate("text")
        generated = first.task.generate_embedded(first, prompts[0], options, streams)
    else:
        tower.slots.activate(None)
        tower.slots.rows = slots
        try:
            generated = first.task.generate_embedded(first, join_prompts(prompts), options, streams)
        finally:
            tower.slots.rows = None
    out, start = [], 0
    for entry, inputs in groups:
        out.append(_results(entry.model.task, generated, range(start, start + len(inputs))))
        start += len(inputs)
    return out


def _results(task, generated, rows) -> list[dict]:
    rows = list(rows)
    decoded = task.decode(generated.ids[rows])
    return [{**text, "usage": {"prompt_tokens": generated.prompt_tokens[row],
                               "completion_tokens": generated.completion_tokens[row],
                               "finish_reason": "stop" if generated.stopped[row] else "length"}}
            for row, text in zip(rows, decoded)]


def _with_usage(result: dict, request: dict) -> dict:
    """Token counts only for a request that asked for generation options (the OpenAI API's)."""
    return result if "generation" in request else {k: v for k, v in result.items() if k != "usage"}


def options_of(request: dict, index: int) -> GenerationOptions:
    options = request.get("generation")
    if options is None:
        return GenerationOptions()
    if not isinstance(options, GenerationOptions):
        raise DataError(f"generation must be a GenerationOptions, not {type(options).__name__}", f"request {index}")
    return options


def _fan_out(streams: list):
    """One callable that feeds every given stream (rows that share an input share its text)."""
    streams = [s for s in streams if s is not None]
    if not streams:
        return None
    return streams[0] if len(streams) == 1 else (lambda text: [stream(text) for stream in streams])
