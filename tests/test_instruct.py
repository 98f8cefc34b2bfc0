"""Task instruct: assistant-only labels, training, KV-cache generation against a no-cache loop,
beam and sampling, bundle round trip, train/eval/predict/chat through the CLI, bad input, stage
chaining from a captioning bundle. Tiny LlamaForCausalLM + tiny MobileNetV2 over a chat-messages
file of easy-VQA questions; the real zoo models run in the last test."""

import base64
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from helpers import overfit, perturb

from peftmm import DataError, PeftmmError, RecipeError, recipe_from_dict
from peftmm.batching import Batcher
from peftmm.bundle import initialise_from, save_bundle
from peftmm.cli import main
from peftmm.data import load_splits
from peftmm.generation import GenerationOptions
from peftmm.model import MultimodalModel
from peftmm.predict import Predictor
from peftmm.runtime import Runtime
from peftmm.serve import create_app
from peftmm.tasks.decoder_lm import IGNORE, positions

# The tiny tokenizer knows easy-VQA's question words only: roles render as [UNK], [SEP] ends a turn.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
LONG = " ".join(["what color is the shape in the image ?"] * 6)   # no room for an answer in 32 tokens

pytestmark = pytest.mark.usefixtures("keep_torch_rng_module")


def _questions():
    import easy_vqa

    texts, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    by_image: dict = {}
    for t, a, i in zip(texts, answers, ids, strict=True):
        by_image.setdefault(paths[i], []).append((t, a))
    return list(by_image.items())


def _record(path, qa, split):
    messages = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": qa[0][0]}]},
                {"role": "assistant", "content": qa[0][1]}]
    for question, answer in qa[1:]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "split": split}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """48 train / 8 val / 8 test conversations; every fourth is two turns; one train conversation
    is too long for text.max_length = 32; one train record has no assistant turn, one an empty answer."""
    images = _questions()[:64]
    records = [_record(p, qa[:2] if k % 4 == 0 else qa[:1], "train" if k < 48 else "val" if k < 56 else "test")
               for k, (p, qa) in enumerate(images)]
    records.append({"messages": [{"role": "user", "content": [{"type": "image", "image": images[0][0]},
                                                              {"type": "text", "text": LONG}]},
                                 {"role": "assistant", "content": "red"}], "split": "train"})
    records.append({"messages": [{"role": "user", "content": [{"type": "image", "image": images[1][0]},
                                                              {"type": "text", "text": "what shape ?"}]}],
                    "split": "train"})
    records.append({"messages": [{"role": "user", "content": [{"type": "image", "image": images[2][0]},
                                                              {"type": "text", "text": "what shape ?"}]},
                                 {"role": "assistant", "content": "  "}], "split": "train"})
    path = tmp_path_factory.mktemp("conversations") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_models(tiny_models, tmp_path_factory):
    import tiny

    return {**tiny_models, "llama_lm": str(tiny.build("llama_lm", tmp_path_factory.mktemp("lm") / "llama_lm"))}


def instruct_recipe(tiny_models, data_file, methods=({"type": "lora", "r": 4},), **task) -> dict:
    return {
        "name": "tiny-instruct",
        "vision": {"backbone": tiny_models["mobilenet_v2"], "image_size": 96},   # 3x3 tokens, pooled to 4
        "text": {"backbone": tiny_models["llama_lm"], "methods": list(methods), "max_length": 32},
        "fusion": {"type": "projector", "max_tokens": 4},
        "task": {"type": "instruct", "chat_template": TEMPLATE, "end_of_turn": "[SEP]", "max_new_tokens": 4, **task},
        "data": {"source": "messages", "path": str(data_file), "on_bad_sample": "skip"},
        "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "lr": 3e-2, "warmup_ratio": 0.0},
    }


def build(data: dict):
    recipe = recipe_from_dict(data)
    return recipe, MultimodalModel.build(recipe, []), load_splits(recipe.data)


def prompts_of(examples):
    """Each conversation up to its last question, to be answered."""
    return [{"image": e["image"], "conversation": e["conversation"][:-1]} for e in examples]


def test_labels_are_the_assistant_tokens_only(tiny_models, data_file):
    _, model, splits = build(instruct_recipe(tiny_models, data_file))
    two_turns = splits.train[0]
    assert [t["role"] for t in two_turns["conversation"]] == ["user", "assistant", "user", "assistant"]
    batch = Batcher(model)([two_turns, splits.train[1]])
    tok = model.towers["text"].processor
    answers = [t["text"] for t in two_turns["conversation"][1::2]]
    learnt = batch["input_ids"][0][batch["labels"][0] != IGNORE]
    assert tok.decode(learnt) == f"{answers[0]} [SEP] {answers[1]} [SEP]"
    assert (batch["labels"][0][batch["image_positions"][0]] == IGNORE).all()
    assert batch["image_positions"].shape == (2, 4) and model.task.image_tokens == 4
    # the outputs are the full LM's logits at exactly the positions that predict an answer token
    perturb(model)
    model.eval()
    with torch.no_grad():
        scored = model(batch)
        lm = model.towers["text"].model
        embeds, mask = model.task._embed(model, lm, batch)
        full = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits[:, :-1]
    assert torch.allclose(scored, full[batch["labels"][:, 1:] != IGNORE], atol=1e-5)
    assert scored.shape[0] == int((batch["labels"] != IGNORE).sum())


@pytest.mark.parametrize("methods", [[{"type": "lora", "r": 4}], [{"type": "prefix", "length": 4}]],
                         ids=["lora", "prefix"])
def test_loss_falls_on_a_tiny_conversation_set(tiny_models, data_file, methods):
    torch.manual_seed(0)
    _, model, splits = build(instruct_recipe(tiny_models, data_file, methods))
    batch = Batcher(model)(splits.train[:8])
    losses = overfit(model, batch, steps=20, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_greedy_generation_with_the_cache_equals_a_loop_without_it(tiny_models, data_file):
    _, model, splits = build(instruct_recipe(tiny_models, data_file, max_new_tokens=6))
    perturb(model, 0.3)
    model.eval()
    # prompts of different lengths: left padding, positions from the mask
    batch = Batcher(model)(prompts_of([splits.train[0], splits.train[1], splits.train[2]]))
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1
    cached = model(batch)
    lm, stops = model.towers["text"].model, set(model.task._stops)
    pad = model.towers["text"].processor.pad_token_id
    with torch.no_grad():
        embeds, mask = model.task._embed(model, lm, batch)
        rows, done = [], torch.zeros(len(embeds), dtype=torch.bool)
        for _ in range(6):
            logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                        use_cache=False).logits[:, -1]
            token = logits.argmax(-1).masked_fill(done, pad)
            rows.append(token)
            done |= torch.tensor([t in stops for t in token.tolist()])
            embeds = torch.cat([embeds, lm.get_input_embeddings()(token)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if done.all():
                break
    manual = torch.stack(rows, 1)
    assert torch.equal(cached, manual[:, : cached.shape[1]])
    assert (manual[:, cached.shape[1]:] == pad).all()


@pytest.mark.usefixtures("keep_torch_rng")
def test_beam_and_sampling_respect_max_new_tokens_and_stop(tiny_models, data_file):
    # seeded: whether greedy's first token is one the tokenizer can spell (the stop check below
    # makes it the end of turn) depends on the random weights, not on which tests ran before
    torch.manual_seed(0)
    _, model, splits = build(instruct_recipe(tiny_models, data_file, max_new_tokens=5))
    perturb(model, 0.3)
    model.eval()
    batch = Batcher(model)(prompts_of(splits.train[:3]))
    task = model.task
    for options in ({"num_beams": 3}, {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": 7}):
        replies = task.reply(model, batch, options)
        assert len(replies) == 3 and all(1 <= r["completion_tokens"] <= 5 for r in replies)
        assert all(r["finish_reason"] == ("stop" if r["completion_tokens"] < 5 else r["finish_reason"])
                   for r in replies)
    sampled = [task.reply(model, batch, {"do_sample": True, "temperature": 2.0, "seed": s}) for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]   # the seed makes sampling repeatable
    assert len({json.dumps(s) for s in sampled}) > 1   # and different seeds sample differently
    assert all(r["completion_tokens"] == 2 for r in task.reply(model, batch, {"max_new_tokens": 2})
               if r["finish_reason"] == "length")
    with pytest.raises(RecipeError, match=r"generation.temperature = 0.0 is out of range: must be > 0.0"):
        task.reply(model, batch, {"temperature": 0, "do_sample": True})
    with pytest.raises(RecipeError, match="unknown generation option 'stop'"):
        task.reply(model, batch, {"stop": "x"})
    # stop: the token greedy writes first, made the end of turn, ends every answer at once
    first = model(batch)[:, 0]
    task.config.end_of_turn = model.towers["text"].processor.convert_ids_to_tokens(int(first[0]))
    task.attach(model)
    stopped = task.reply(model, batch)
    assert stopped[0] == {"text": "", "prompt_tokens": int(batch["attention_mask"][0].sum()), "completion_tokens": 1,
                          "finish_reason": "stop"}


def test_bundle_round_trip_gives_the_same_answers(tiny_models, data_file, tmp_path):
    recipe, model, splits = build(instruct_recipe(tiny_models, data_file))
    perturb(model, 0.3)
    model.eval()
    model.task.prepare(model, splits.train, None, "cpu")
    path = save_bundle(model, recipe, tmp_path / "bundle")
    predictor = Predictor.load(path, device="cpu")
    assert predictor.model.task.vocabulary == model.task.vocabulary and "image-text-to-text" in (
        path / "README.md").read_text()
    examples = prompts_of(splits.test)
    expected = model.task.decode(model(Batcher(model)(examples)))
    assert predictor.predict_batch(examples) == expected
    messages = [{"role": "user", "content": t["text"]} for t in examples[0]["conversation"]]
    reply = predictor.generate(messages, examples[0]["image"])
    assert reply["text"] == expected[0]["answer"]
    # the multi-adapter runtime answers a request's text in words, as the Predictor does
    runtime = Runtime(device="cpu")
    runtime.register(path, name="chat")
    asked = [{"image": e["image"], "text": q} for e in splits.test[:3] for q in ("what shape ?", "what color ?")]
    answers = runtime.predict([{"adapter": "chat", **a} for a in asked])
    assert [a["answer"] for a in answers] == [a["answer"] for a in predictor.predict_batch(asked)]
    assert runtime.question_use("chat") == "required"
    # the OpenAI API's path: checked messages, per-request options, a stream, token counts
    streamed: list[str] = []
    question = {"role": "user", "content": "what shape ?"}   # as serve/chat_kinds.py sends them
    served = runtime.predict([{"adapter": "chat", "image": asked[0]["image"], "messages": [question],
                               "generation": GenerationOptions(max_tokens=3), "stream": streamed.append}])[0]
    alone = predictor.generate([{"role": "user", "content": "what shape ?"}], asked[0]["image"], max_new_tokens=3)
    assert served["answer"] == alone["text"] == answers[0]["answer"][: len(served["answer"])]
    assert served["usage"] == {"prompt_tokens": alone["prompt_tokens"], "completion_tokens": alone["completion_tokens"],
                               "finish_reason": alone["finish_reason"]}
    assert (streamed[-1] if streamed else "") == served["answer"]
    sampled = [runtime.predict([{"adapter": "chat", "image": asked[0]["image"], "messages": [question],
                                 "generation": GenerationOptions(temperature=1.5, seed=5)}])[0] for _ in range(2)]
    assert sampled[0] == sampled[1]
    # eval outside training (no screening batcher): a conversation too long to learn from is counted
    too_long = next(e for e in splits.train if len(e["text"]) > 100)
    scored = predictor.model.task.evaluate(predictor.model, splits.test[:3] + [too_long], predictor.batcher, 8, "cpu")
    assert scored["skipped_unusable"] == 1 and scored["answered"] == 3
    with pytest.raises(DataError, match="non-empty question"):
        runtime.predict([{"adapter": "chat", "image": asked[0]["image"], "text": " "}])
    with pytest.raises(DataError, match=r"messages\[0\]: the last message must be the user's"):
        predictor.generate([{"role": "assistant", "content": "red"}], examples[0]["image"])
    with pytest.raises(DataError, match=r"messages\[1\].role: unknown role 'robot'"):
        predictor.generate([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], examples[0]["image"])
    with pytest.raises(DataError, match=r"messages\[1\].content: empty assistant message"):
        predictor.generate([{"role": "user", "content": "what ?"}, {"role": "assistant", "content": " "},
                            {"role": "user", "content": "what ?"}], examples[0]["image"])
    with pytest.raises(DataError, match="2 <image> placeholders but one image"):
        predictor.generate([{"role": "user", "content": "<image> <image> what ?"}], examples[0]["image"])
    # the OpenAI-compatible API answers with the same words, counted alike
    picture = {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(Path(asked[0]["image"]).read_bytes()).decode()}}
    with TestClient(create_app(runtime)) as http:
        body = http.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 3, "messages": [
            {"role": "user", "content": [picture, {"type": "text", "text": "what shape ?"}]}]}).json()
        assert body["choices"][0]["message"]["content"] == served["answer"], body
        assert body["usage"]["completion_tokens"] == served["usage"]["completion_tokens"]
        refused = http.post("/v1/chat/completions", json={"model": "chat", "messages": [
            {"role": "user", "content": [picture]}]})
        assert refused.status_code == 400 and "question" in refused.json()["error"]["message"]


def test_train_eval_predict_and_chat_from_the_cli(tiny_models, data_file, tmp_path):
    recipe = tmp_path / "instruct.yaml"
    recipe.write_text(yaml.safe_dump(instruct_recipe(tiny_models, data_file)))
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    # the records without an answer are left out by the source, the too-long one by training
    assert "peftmm: data: skipped 2 of 67 records" in result.stderr
    assert "(empty answer: 1, no assistant turn: 1)" in result.stderr
    assert summary["skipped_train"] == 1 and summary["truncated_train"] >= 1   # + two-turn ones cut after turn 1
    assert "skipped: no room for an answer: 1" in result.stderr
    for key in ("test_exact_match", "test_token_f1", "val_exact_match"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["test_answered"] == 8 and isinstance(summary["test_out_of_vocabulary"], int)
    evaluated = runner.invoke(main, ["eval", str(tmp_path / "run"), "--split", "test"])
    assert evaluated.exit_code == 0, evaluated.output
    measured = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    for key in ("exact_match", "token_f1", "out_of_vocabulary"):
        assert measured[key] == summary[f"test_{key}"], key
    assert measured["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)

    image = load_splits(recipe_from_dict(instruct_recipe(tiny_models, data_file)).data).test[0]["image"]
    asked = runner.invoke(main, ["predict", str(tmp_path / "run"), "--image", image, "--prompt", "what shape ?",
                                 "--json"])
    assert asked.exit_code == 0, asked.output
    answer = json.loads(asked.stdout)
    assert answer["prompt"] == "what shape ?" and answer["generation"]["completion_tokens"] <= 4
    plain = runner.invoke(main, ["predict", str(tmp_path / "run"), "--image", image, "--prompt", "what shape ?"])
    assert plain.stdout == f"image: {image}\nprompt: what shape ?\nanswer: {answer['answer']}\n"
    predictor = Predictor.load(tmp_path / "run", device="cpu")
    second = predictor.generate([{"role": "user", "content": "what shape ?"},
                                 {"role": "assistant", "content": answer["answer"] or "circle"},
                                 {"role": "user", "content": "what color ?"}], image)["text"]
    if not answer["answer"]:
        pytest.skip("the tiny model answered nothing: the chat transcript below would not be checkable")
    talk = runner.invoke(main, ["chat", str(tmp_path / "run")],
                         input=f"what shape ?\n/image {tmp_path}/none.png\n/image {image}\nwhat shape ?\n"
                               "what color ?\n/reset\nwhat shape ?\n")
    assert talk.exit_code == 0, talk.output
    assert "no image yet: attach one with /image PATH" in talk.stderr
    assert "image file not found" in talk.stderr
    assert talk.stdout == (f"assistant: {answer['answer']}\nassistant: {second}\nassistant: {answer['answer']}\n")


def test_recipes_and_models_the_task_refuses(tiny_models, data_file):
    data = instruct_recipe(tiny_models, data_file)
    with pytest.raises(RecipeError, match="cannot serve task 'instruct'; use projector"):
        recipe_from_dict({**data, "fusion": {"type": "concat-mlp"}})
    with pytest.raises(RecipeError, match="task instruct learns from conversations"):
        recipe_from_dict({**data, "data": {"source": "easy-vqa"}})
    with pytest.raises(PeftmmError, match="is a bert encoder"):
        build({**data, "text": {"backbone": tiny_models["bert"], "max_length": 32}})
    with pytest.raises(DataError, match=r"train.jsonl:66: no assistant turn"):
        load_splits(recipe_from_dict({**data, "data": {**data["data"], "on_bad_sample": "stop"}}).data)
    lines = data_file.read_text().splitlines()
    (data_file.parent / "empty.jsonl").write_text(lines[0] + "\n" + lines[66] + "\n")
    with pytest.raises(DataError, match=r"empty.jsonl:2: messages\[1\].content: empty answer"):
        load_splits(recipe_from_dict({**data, "data": {**data["data"], "on_bad_sample": "stop",
                                                       "path": str(data_file.parent / "empty.jsonl")}}).data)


def test_init_from_a_captioning_bundle_carries_the_projector_over(tiny_models, data_file, tmp_path):
    caption = {**instruct_recipe(tiny_models, data_file, methods=()),
               "task": {"type": "captioning", "prompt": "what is in the image ?"},
               "data": {"source": "easy-vqa", "max_train_samples": 8, "max_eval_samples": 8}}
    recipe = recipe_from_dict(caption)
    stage1 = MultimodalModel.build(recipe, [])
    perturb(stage1)
    path = save_bundle(stage1, recipe, tmp_path / "stage1")
    _, stage2, _ = build(instruct_recipe(tiny_models, data_file))
    done = initialise_from(stage2, path)
    assert done["parts"] == ["fusion"]
    for key, value in stage1.fusion.state_dict().items():
        assert torch.equal(stage2.fusion.state_dict()[key], value), key


def test_plan_runs_on_the_instruct_recipes():
    for recipe in ("recipes/easy-vqa-instruct.yaml", "recipes/emoji-instruct.yaml"):
        result = CliRunner().invoke(main, ["plan", recipe])
        assert result.exit_code == 0, result.output
        assert "estimated peak training memory" in result.stdout


@pytest.mark.integration
def test_a_few_steps_on_easy_vqa_conversations_lower_the_loss():
    import easy_vqa

    with open("recipes/easy-vqa-instruct.yaml") as f:
        data = yaml.safe_load(f)
    data["data"].update(max_train_samples=16, max_eval_samples=8)
    recipe = recipe_from_dict(data)
    model = MultimodalModel.build(recipe, [])
    assert model.task.image_tokens == 4 and model.towers["text"].info.hidden_size == 576
    splits = load_splits(recipe.data)
    batch = Batcher(model)(splits.train[:16])
    losses = overfit(model, batch, steps=4, lr=1e-3)
    assert losses[-1] < losses[0], losses
    model.eval()
    image = easy_vqa.get_test_image_paths()[0]
    answers = model.task.decode(model(Batcher(model)([{"image": image, "text": "What shape is in the image?"}])))
    assert isinstance(answers[0]["answer"], str)


def test_trains_on_a_parquet_data_set_with_embedded_images_and_a_messages_column(tiny_models, tmp_path):
    """`data.source: hf` feeds the instruct task: images as bytes inside the parquet file, the
    conversation from a chat-messages column named by data.columns.conversation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for path, qa in _questions()[:40]:   # val and test are cut from this one split by stable hash
        question, answer = qa[0]
        rows.append({"picture": {"bytes": Path(path).read_bytes(), "path": None},
                     "chat": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                              {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    data = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    recipe = instruct_recipe(tiny_models, data)
    recipe["data"] = {"source": "hf", "path": str(data), "columns": {"image": "picture", "conversation": "chat"},
                      "on_bad_sample": "stop"}
    splits = load_splits(recipe_from_dict(recipe).data)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 40 and splits.test
    assert all(not Path(str(e["image"])).exists() for e in splits.train)   # embedded: nothing written out
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["train", str(tmp_path / "chat.yaml"), "--output", str(tmp_path / "run"),
                                       "--no-progress", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert 0.0 <= summary["test_exact_match"] <= 1.0 and summary["test_answered"] == len(splits.test)
