"""The OpenAI-compatible API of `peftmm serve`, driven by the official `openai` client against a
live server on 127.0.0.1: models, plain and streamed completions for VQA, captioning and
retrieval bundles, concurrent requests over several adapters, and every bad input answered in
OpenAI's error shape. Each answer is checked against the runtime's own prediction."""

import base64
import shutil
import threading

import httpx
import openai
import pytest
import tiny
import torch
from helpers import build, perturb
from PIL import Image
from serving import METHODS, live_server, make_bundle
from test_runtime_captioning import _caption_recipe, _lm_of_the_tokenizers_size

from peftmm import recipe_from_dict
from peftmm.bundle import save_bundle
from peftmm.generation import GenerationOptions
from peftmm.model import MultimodalModel
from peftmm.runtime import Runtime
from peftmm.serve import create_app

LIMIT = 64 * 1024  # max_image_bytes of the test server
VQA = ("lora-text", "adapter-both")

pytestmark = pytest.mark.usefixtures("keep_torch_rng_module")


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    import easy_vqa

    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(VQA):
        _, splits = make_bundle(tiny_models, root, name, seed, **dict(METHODS[name]))
    models = {**tiny_models, "llama_lm": _lm_of_the_tokenizers_size(tmp_path_factory.mktemp("lm") / "llama_lm")}
    torch.manual_seed(5)
    recipe = recipe_from_dict(_caption_recipe(models, "caption", [{"type": "lora", "r": 2}], max_new_tokens=6))
    model = MultimodalModel.build(recipe, [])
    perturb(model, scale=1.0)
    save_bundle(model, recipe, root / "caption")
    retrieval = tiny.recipe(models["vit"], models["bert"], text_methods=[{"type": "lora", "r": 2}])
    retrieval.update(task={"type": "retrieval"}, fusion={"type": "dual-projection", "dim": 16}, name="retrieval")
    torch.manual_seed(6)
    recipe, model, _ = build(retrieval)
    perturb(model, scale=1.0)
    save_bundle(model, recipe, root / "retrieval")
    images = tmp_path_factory.mktemp("images")
    paths = easy_vqa.get_test_image_paths()
    for i in range(4):
        shutil.copy(paths[i], images / f"{i}.png")
    runtime = Runtime(device="cpu", root=root)
    for name in (*VQA, "caption", "retrieval"):
        runtime.register(name)
    questions = [e["text"] for e in splits.test[:4]]
    app = create_app(runtime, allowed_image_dirs=[images], max_image_bytes=LIMIT, max_batch=16, batch_wait_ms=20)
    with live_server(app) as base:
        yield runtime, images, questions, base


@pytest.fixture(scope="module")
def client(setup):
    with openai.OpenAI(base_url=setup[3] + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        yield client


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _messages(url: str, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": content + ([{"type": "text", "text": text}] if text else [])}]


def _ask(client, model, image, text=None, **options):
    return client.chat.completions.create(model=model, messages=_messages(_data_url(image), text), **options)


def _expected(runtime, model, image, text=None, **generation):
    request = {"adapter": model, "image": Image.open(image).convert("RGB"), "text": text}
    if generation:
        request["generation"] = GenerationOptions(**generation)
    return runtime.predict([request])[0]


def _streamed(client, model, image, text=None, **options):
    chunks = list(client.chat.completions.create(model=model, messages=_messages(_data_url(image), text),
                                                 stream=True, stream_options={"include_usage": True}, **options))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return chunks, pieces


def test_models_lists_every_adapter(client, setup):
    models = client.models.list().data
    assert [m.id for m in models] == setup[0].names() == sorted((*VQA, "caption", "retrieval"))
    assert all(m.object == "model" and m.owned_by == "peftmm" and m.created > 0 for m in models)


def test_vqa_answers_its_top_label_with_scores_and_usage(client, setup):
    runtime, images, questions, _ = setup
    tokenizer = runtime._get(VQA[0]).model.towers["text"].processor
    for model in VQA:
        for i, question in enumerate(questions[:2]):
            expected = _expected(runtime, model, images / f"{i}.png", question)
            completion = _ask(client, model, images / f"{i}.png", question)
            assert completion.model == model and completion.object == "chat.completion"
            choice = completion.choices[0]
            assert choice.message.content == expected["answer"] and choice.finish_reason == "stop"
            extra = completion.model_extra["peftmm"]
            assert extra["answer"] == expected["answer"] and extra["question"] == question
            assert [s["answer"] for s in extra["scores"]] == [s["answer"] for s in expected["scores"]]
            assert all(abs(s["score"] - t["score"]) < 1e-4 for s, t in zip(extra["scores"], expected["scores"]))
            usage = completion.usage
            assert usage.prompt_tokens == len(tokenizer(question)["input_ids"]) > 2
            assert usage.completion_tokens == len(tokenizer(expected["answer"], add_special_tokens=False)["input_ids"])
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_caption_is_generated_as_the_runtime_does(client, setup):
    runtime, images, _, _ = setup
    captions = set()
    for i in range(3):
        expected = _expected(runtime, "caption", images / f"{i}.png")["caption"]
        # the user's text is not read by a captioner: with or without it, the same caption
        for text in (None, "Describe this image."):
            completion = _ask(client, "caption", images / f"{i}.png", text)
            assert completion.choices[0].message.content == expected
        assert completion.model_extra["peftmm"]["question"] is None
        usage = completion.usage
        assert 1 <= usage.completion_tokens <= 6 and usage.prompt_tokens > 17   # 17 vision tokens + the prompt
        assert completion.choices[0].finish_reason == ("length" if usage.completion_tokens == 6 else "stop")
        captions.add(expected)
    assert len(captions) > 1   # the image matters: a wrong image would not go unseen


def test_generation_options_reach_the_captioner(client, setup):
    runtime, images, _, _ = setup
    short = _ask(client, "caption", images / "0.png", max_tokens=2)
    assert short.usage.completion_tokens <= 2
    assert short.choices[0].message.content == _expected(runtime, "caption", images / "0.png", max_tokens=2)["caption"]
    sampled = {}
    for seed in (1, 2, 3, 1):
        completion = _ask(client, "caption", images / "0.png", temperature=1.5, top_p=0.95, seed=seed)
        text = completion.choices[0].message.content
        assert sampled.setdefault(seed, text) == text   # a seed repeats its sample
        assert text == _expected(runtime, "caption", images / "0.png", temperature=1.5, top_p=0.95,
                                 seed=seed)["caption"]
    greedy = _expected(runtime, "caption", images / "0.png")["caption"]
    assert len(set(sampled.values()) | {greedy}) > 1   # sampling does sample


def test_streaming_concatenates_to_the_plain_answer(client, setup):
    _, images, questions, _ = setup
    for model, text in (("caption", None), (VQA[0], questions[0]), ("retrieval", "a circle, a square, a triangle")):
        plain = _ask(client, model, images / "1.png", text)
        chunks, pieces = _streamed(client, model, images / "1.png", text)
        assert "".join(pieces) == plain.choices[0].message.content
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(final) == 1 and final[0].choices[0].finish_reason == plain.choices[0].finish_reason
        assert final[0].model_extra["peftmm"] == plain.model_extra["peftmm"]
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
        if model == "caption" and len(plain.choices[0].message.content.split()) > 1:
            assert len(pieces) > 1   # greedy decoding streams its text as it is written


def test_retrieval_answers_the_most_similar_candidate(client, setup):
    runtime, images, _, _ = setup
    candidates = ["a red circle", "a blue square", "a green triangle"]
    for i, text in enumerate(("candidates: " + ", ".join(candidates), "\n".join(candidates))):
        similarity = {c: _expected(runtime, "retrieval", images / f"{i}.png", c)["similarity"] for c in candidates}
        completion = _ask(client, "retrieval", images / f"{i}.png", text)
        assert completion.choices[0].message.content == max(similarity, key=similarity.get)
        ranked = completion.model_extra["peftmm"]["similarities"]
        assert [r["candidate"] for r in ranked] == sorted(candidates, key=lambda c: -similarity[c])
        assert all(abs(r["similarity"] - similarity[r["candidate"]]) < 1e-4 for r in ranked)


def test_concurrent_requests_over_adapters_each_get_their_own_answer(client, setup):
    runtime, images, questions, base = setup
    inputs = [(VQA[i % 2], i % 4, questions[i % 3]) for i in range(8)] + [("caption", i, None) for i in range(4)]
    expected = {key: _expected(runtime, key[0], images / f"{key[1]}.png", key[2]) for key in inputs}
    expected = {key: value.get("answer", value.get("caption")) for key, value in expected.items()}
    before = httpx.get(f"{base}/api/health").json()
    failures, lock = [], threading.Lock()

    def worker(offset):
        for k in range(6):
            key = inputs[(offset * 5 + k) % len(inputs)]
            answer = _ask(client, key[0], images / f"{key[1]}.png", key[2]).choices[0].message.content
            if answer != expected[key]:
                with lock:
                    failures.append((key, answer, expected[key]))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    after = httpx.get(f"{base}/api/health").json()
    assert not failures, failures[:3]
    assert after["requests"] - before["requests"] == 36
    assert after["batches"] - before["batches"] < 36   # requests were batched together


def _error(excinfo, status: int, code: str | None, param: str | None, says: str):
    response = excinfo.value.response
    body = response.json()
    assert response.status_code == status and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["param"] == param, body
    assert says in body["error"]["message"] and says in str(excinfo.value)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, setup):
    runtime, images, questions, base = setup
    url = _data_url(images / "0.png")
    good = _messages(url, questions[0])
    bad = openai.BadRequestError
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody", messages=good)
    _error(e, 404, "model_not_found", "model", "no adapter named 'nobody'")
    cases = [  # (request arguments, code, param, part of the message)
        (dict(messages="what?"), "invalid_type", "messages", "must be a non-empty list"),
        (dict(messages=[]), "invalid_type", "messages", "must be a non-empty list"),
        (dict(messages=[{"role": "system", "content": "be brief"}]), "invalid_value", "messages", "no user message"),
        (dict(messages=[{"role": "pirate", "content": "x"}]), "invalid_value", "messages[0].role", "'pirate'"),
        (dict(messages=[{"role": "user", "content": "what shape?"}]), "invalid_value", "messages", "no image"),
        (dict(messages=_messages(url)), "invalid_value", "messages", "has no text"),
        (dict(messages=_messages("https://example.com/cat.png", "what?")), "remote_image_url",
         "messages[0].content[0].image_url", "remote image URLs are not fetched"),
        (dict(messages=_messages("ftp://host/cat.png", "what?")), "invalid_image",
         "messages[0].content[0].image_url", "ftp: URLs are not understood"),
        (dict(messages=_messages("data:image/png;base64,@@@@", "what?")), "invalid_image",
         "messages[0].content[0].image_url", "not valid base64"),
        (dict(messages=_messages("data:image/png;base64," + "A" * (LIMIT * 4 // 3 + 400), "what?")),
         "image_too_large", "messages[0].content[0].image_url", f"over the limit of {LIMIT}"),
        (dict(messages=_messages("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "what?")),
         "invalid_image", "messages[0].content[0].image_url", "not an image"),
        (dict(messages=_messages("/etc/hostname", "what?")), "image_path_not_allowed",
         "messages[0].content[0].image_url", "outside the folders"),
        (dict(messages=_messages(f"file://{images}/missing.png", "what?")), "image_not_found",
         "messages[0].content[0].image_url", "no image file"),
        (dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
         "unsupported_content", "messages[0].content[0]", "'input_audio'"),
        (dict(messages=good, n=2), "unsupported_parameter", "n", "unsupported parameter(s): n"),
        (dict(messages=good, logprobs=True), "unsupported_parameter", "logprobs", "logprobs"),
        (dict(messages=good, tools=[{"type": "function", "function": {"name": "f"}}]), "unsupported_parameter",
         "tools", "tools"),
        (dict(messages=good, temperature=2.5), "invalid_value", "temperature", "from 0 to 2"),
        (dict(messages=good, top_p=0), "invalid_value", "top_p", "above 0"),
        (dict(messages=good, max_tokens=0), "invalid_value", "max_tokens", "from 1 to 1024"),
        (dict(messages=good, max_completion_tokens=5000), "invalid_value", "max_completion_tokens", "from 1 to 1024"),
        (dict(messages=good, seed=-1), "invalid_value", "seed", "from 0 to"),
        (dict(messages=good, stop=["a", "b", "c", "d", "e"]), "invalid_value", "stop", "at most 4"),
        (dict(messages=good, stream_options={"include_usage": True}), "invalid_value", "stream_options",
         "only with stream: true"),
    ]
    for arguments, code, param, says in cases:
        with pytest.raises(bad) as e:
            client.chat.completions.create(model=VQA[0], **arguments)
        _error(e, 400, code, param, says)
    with pytest.raises(bad) as e:  # a retrieval adapter with too many candidates
        client.chat.completions.create(model="retrieval", messages=_messages(url, ",".join(map(str, range(65)))))
    _error(e, 400, "invalid_value", "messages", "at most 64 candidate texts")
    raw = [httpx.post(f"{base}/v1/chat/completions", content=b"{not json", timeout=30),
           httpx.post(f"{base}/v1/chat/completions", json={"messages": good}, timeout=30),
           httpx.post(f"{base}/v1/chat/completions", content=b"x" * (LIMIT * 3), timeout=30)]
    assert [r.status_code for r in raw] == [400, 400, 413]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in raw)
    assert raw[1].json()["error"]["param"] == "model"
    # an image file under --allow-image-dir is read, as path or file:// URL; the server still answers
    expected = _expected(runtime, VQA[0], images / "0.png", questions[0])["answer"]
    for where in (str(images / "0.png"), f"file://{images}/0.png", "0.png"):
        answer = client.chat.completions.create(model=VQA[0], messages=_messages(where, questions[0]))
        assert answer.choices[0].message.content == expected


def test_stop_cuts_the_text_in_plain_and_streamed_answers(client, setup):
    runtime, images, _, _ = setup
    caption = _expected(runtime, "caption", images / "2.png")["caption"]
    words = caption.split()
    assert len(words) > 1, caption
    stop = [" " + words[1]]
    plain = _ask(client, "caption", images / "2.png", stop=stop)
    assert plain.choices[0].message.content == caption[: caption.index(stop[0])]
    assert plain.choices[0].finish_reason == "stop"
    _, pieces = _streamed(client, "caption", images / "2.png", stop=stop)
    assert "".join(pieces) == plain.choices[0].message.content


# -- without a live server ------------------------------------------------------------------------
def test_candidate_syntax_and_stop_helpers():
    from peftmm.generation import cut_at_stop, safe_prefix
    from peftmm.serve.chat_kinds import candidates

    assert candidates("candidates: a red circle, a blue square") == ["a red circle", "a blue square"]
    assert candidates("Candidates:\na red circle\n\na blue, square\na red circle") == ["a red circle", "a blue, square"]
    assert candidates("   ") == [] and candidates("one") == ["one"]
    assert cut_at_stop("a cat. a dog.", [".", "dog"]) == ("a cat", True)
    assert cut_at_stop("a cat", ["dog"]) == ("a cat", False)
    assert safe_prefix("a cat do", ["dog"]) == "a cat " and safe_prefix("a cat dog x", ["dog"]) == "a cat "
    assert safe_prefix("a cat", ()) == "a cat"


def test_generation_options_refuse_values_out_of_range():
    from peftmm.errors import DataError

    assert GenerationOptions(temperature=0.0).sampling is False and GenerationOptions(temperature=0.7).sampling
    for bad in (dict(max_tokens=0), dict(max_tokens=True), dict(temperature=float("nan")), dict(top_p=1.5),
                dict(seed=2**63), dict(stop=("",)), dict(stop=["x"])):
        with pytest.raises(DataError, match=next(iter(bad))):
            GenerationOptions(**bad)


def test_classifier_with_a_fixed_prompt_reads_no_question(setup, tiny_models, tmp_path):
    from fastapi.testclient import TestClient

    images = setup[1]
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], name="shapes")
    data["task"] = {"type": "classification", "hidden": 16, "prompt": "which shape?"}
    recipe, model, _ = build(data)
    save_bundle(model, recipe, tmp_path / "shapes")
    alone = Runtime(device="cpu", root=tmp_path)
    alone.register("shapes")
    expected = alone.predict([{"adapter": "shapes", "image": str(images / "0.png")}])[0]
    with TestClient(create_app(alone)) as http:
        for text in (None, "ignored words"):
            body = http.post("/v1/chat/completions", json={"model": "shapes", "messages": _messages(
                _data_url(images / "0.png"), text)}).json()
            assert body["choices"][0]["message"]["content"] == expected["answer"]
            assert body["peftmm"]["question"] is None and body["peftmm"]["task"] == "classification"
            tokens = len(alone._get("shapes").model.towers["text"].processor("which shape?")["input_ids"])
            assert body["usage"]["prompt_tokens"] == tokens


def test_a_bug_answers_in_openai_shape_before_and_during_a_stream(setup):
    from fastapi.testclient import TestClient

    class Broken(Runtime):  # a runtime whose predict fails for reasons of its own
        def predict(self, requests):
            raise RuntimeError("boom")

    runtime, images, questions, _ = setup
    broken = Broken(device="cpu", root=runtime.root)
    broken.register(VQA[0])
    request = {"model": VQA[0], "messages": _messages(_data_url(images / "0.png"), questions[0])}
    with TestClient(create_app(broken), raise_server_exceptions=False) as http:
        plain = http.post("/v1/chat/completions", json=request)
        assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
        assert "RuntimeError: boom" in plain.json()["error"]["message"]
        streamed = http.post("/v1/chat/completions", json={**request, "stream": True})
        events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "RuntimeError: boom" in events[-2] and '"error"' in events[-2]
        assert http.get("/v1/models").json()["data"][0]["id"] == VQA[0]   # still serving


def test_token_stream_sends_each_rows_text_so_far_until_its_end(tiny_models):
    from transformers import AutoTokenizer

    from peftmm.generation import TokenStream

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    words = tok("what is the red shape", add_special_tokens=False)["input_ids"]
    eos, pad = tok.sep_token_id, tok.pad_token_id
    rows = [words + [eos, pad], words[:2] + [eos] + [pad] * (len(words) - 1), words + words[:2]]
    seen: list[list[str]] = [[], []]
    stream = TokenStream(tok, [seen[0].append, None, seen[1].append], eos)
    for step in range(1, len(rows[0]) + 1):
        assert not stream(torch.tensor([row[:step] for row in rows])).any()   # never stops a row
    assert seen[0] == ["what", "what is", "what is the", "what is the red", "what is the red shape"]
    assert seen[1][-1] == tok.decode(rows[2], skip_special_tokens=True) and len(seen[1]) == len(rows[2])
