"""Instruct adapters batched across adapters in the runtime: rows of two LoRA instruct bundles on
one tiny Llama (each with its own LoRA weights and projector) go through ONE prefill + KV-cached
decode with per-row slots, and every greedy answer equals the answer of a call with that adapter
alone; a prefix-tuned instruct bundle (its method cannot mix rows) is generated on its own."""

import pytest
import torch
from helpers import perturb
from test_instruct import build, data_file, instruct_recipe, tiny_models  # noqa: F401 (fixtures)

from peftmm.bundle import save_bundle
from peftmm.generation import GenerationOptions
from peftmm.runtime import Runtime

pytestmark = pytest.mark.usefixtures("keep_torch_rng_module")
LORA = ("chat-a", "chat-b")
QUESTIONS = ("what shape is in the image ?", "what color is the shape ?", "is there a circle ?")


@pytest.fixture(scope="module")
def served(tiny_models, data_file, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("adapters")
    methods = {"chat-a": [{"type": "lora", "r": 4}], "chat-b": [{"type": "lora", "r": 2}],
               "chat-prefix": [{"type": "prefix", "length": 2, "reparam": False}]}
    for seed, (name, method) in enumerate(methods.items()):
        torch.manual_seed(10 + seed)
        recipe, model, splits = build(instruct_recipe(tiny_models, data_file, method, max_new_tokens=5))
        perturb(model, 0.5)   # its own LoRA weights and projector: a row in the wrong slot shows
        save_bundle(model, recipe, root / name)
    runtime = Runtime(device="cpu", root=root)
    for name in methods:
        runtime.register(name)
    images = [e["image"] for e in splits.test[:3]]
    return runtime, images


class Counted:
    """Counts the LM's generate calls and the batch size of each forward pass inside them."""

    def __init__(self, lm):
        self.lm, self.calls, self.rows = lm, [], []
        self.generate = lm.generate

    def __enter__(self):
        def generate(*args, **kwargs):
            self.calls.append(kwargs["inputs_embeds"].shape[0])
            return self.generate(*args, **kwargs)
        self.lm.generate = generate
        self.hook = self.lm.register_forward_pre_hook(
            lambda module, args, kwargs: self.rows.append(_rows_of(kwargs)), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        del self.lm.generate
        self.hook.remove()


def _rows_of(kwargs) -> int:
    """Rows of one LM forward: the prefill reads embeddings, each cached step the new token ids."""
    return next(kwargs[k] for k in ("inputs_embeds", "input_ids") if kwargs.get(k) is not None).shape[0]


def _requests(adapters, images, **extra):
    return [{"adapter": a, "image": image, "text": q, **extra}
            for a in adapters for image in images for q in QUESTIONS[:2]]


def test_two_lora_instruct_adapters_share_one_generate_and_answer_as_alone(served):
    runtime, images = served
    lm = runtime._get(LORA[0]).model.towers["text"].model
    assert lm is runtime._get(LORA[1]).model.towers["text"].model   # one LM under both
    mixed = _requests(LORA, images)
    mixed = mixed[::2] + mixed[1::2]   # the adapters interleaved in the call
    with Counted(lm) as counted:
        together = runtime.predict(mixed)
    assert counted.calls == [len(mixed)]   # one generate: every distinct input of both adapters
    assert len(counted.rows) > 2 and set(counted.rows) == {len(mixed)}   # prefill and every cached step
    for name in LORA:
        own = [r for r in mixed if r["adapter"] == name]
        alone = runtime.predict(own)
        assert [t for t, r in zip(together, mixed) if r["adapter"] == name] == alone
        assert all(t["adapter"] == name for t in alone)
    # the adapters answer differently: a row generated in the other's slot would not go unseen
    by_input = {}
    for request, result in zip(mixed, together):
        by_input.setdefault((request["image"], request["text"]), {})[request["adapter"]] = result["answer"]
    assert any(a[LORA[0]] != a[LORA[1]] for a in by_input.values()), by_input
    # one request alone, in a batch of one, gives the same words as in the mixed call
    single = runtime.predict([mixed[3]])[0]
    assert single == together[3]


def test_streams_and_usage_follow_each_row_in_a_shared_call(served):
    runtime, images = served
    options = GenerationOptions(max_tokens=3)
    streamed: dict[int, list[str]] = {}
    requests = [{"adapter": LORA[k % 2], "image": images[k % 3], "messages": [{"role": "user", "content": q}],
                 "generation": options, "stream": streamed.setdefault(k, []).append}
                for k, q in enumerate(QUESTIONS * 2)]
    together = runtime.predict(requests)
    for k, (request, result) in enumerate(zip(requests, together)):
        alone = runtime.predict([{**request, "stream": None}])[0]
        assert result == alone
        assert result["usage"]["completion_tokens"] <= 3
        assert (streamed[k][-1] if streamed[k] else "") == result["answer"]


def test_a_prefix_adapter_is_generated_on_its_own_beside_a_shared_call(served):
    runtime, images = served
    lm = runtime._get(LORA[0]).model.towers["text"].model
    requests = _requests((*LORA, "chat-prefix"), images[:2])
    with Counted(lm) as counted:
        together = runtime.predict(requests)
    per = len(images[:2]) * 2
    assert sorted(counted.calls) == [per, 2 * per]   # the prefix adapter's rows, then both LoRA adapters'
    for name in (*LORA, "chat-prefix"):
        own = [r for r in requests if r["adapter"] == name]
        assert [t for t, r in zip(together, requests) if r["adapter"] == name] == runtime.predict(own)


def test_beam_search_and_seeded_sampling_stay_per_adapter(served):
    runtime, images = served
    sampled = GenerationOptions(temperature=1.5, seed=3)
    requests = [{"adapter": LORA[0], "image": images[0], "text": QUESTIONS[0], "generation": sampled},
                {"adapter": LORA[1], "image": images[0], "text": QUESTIONS[0], "generation": sampled},
                {"adapter": LORA[1], "image": images[1], "text": QUESTIONS[1]}]
    lm = runtime._get(LORA[0]).model.towers["text"].model
    with Counted(lm) as counted:
        together = runtime.predict(requests)
    assert len(counted.calls) == 3   # a seeded row is generated alone, so its seed repeats its words
    assert together == [runtime.predict([r])[0] for r in requests]
    task = runtime._get(LORA[0]).model.task
    beams = task.config.num_beams
    task.config.num_beams = 2
    try:
        assert task.shared_generation(GenerationOptions()) is None
        assert task.shared_generation(GenerationOptions(temperature=1.0)) is not None   # sampling: one sequence
    finally:
        task.config.num_beams = beams
