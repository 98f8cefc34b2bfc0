"""Prompt building for instruction tuning: chat template, image slots, assistant-only labels, truncation."""

from __future__ import annotations

from collections import Counter

import pytest
import tiny
import torch

from peftmm import zoo
from peftmm.errors import DataError, PeftmmError
from peftmm.tasks.instruct_prompt import (
    CHATML,
    IGNORE,
    TooLong,
    encode_conversation,
    encode_generation_prompt,
    pad_batch,
    stop_token_ids,
    truncation_line,
)

SIMPLE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
          "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo.resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.build("llama", tmp_path_factory.mktemp("llama")))


def turns(*texts) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "text": t} for i, t in enumerate(texts)]


def learnt(tok, encoded) -> str:
    return tok.decode(encoded.input_ids[encoded.labels != IGNORE])


def segments(tok, encoded) -> tuple[str, str]:
    ids = encoded.input_ids.tolist()
    start, end = encoded.image_start, encoded.image_start + encoded.image_tokens
    return tok.decode(ids[:start]), tok.decode(ids[end:])


def test_smollm2_single_turn(smol):
    e = encode_conversation(smol, turns("<image>\nWhat shape is it?", "circle"), 5)
    before, after = segments(smol, e)
    assert before == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\n")
    assert after == "\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n"
    slots = e.input_ids[e.image_positions]
    assert slots.tolist() == [smol.pad_token_id] * 5 and (e.labels[e.image_positions] == IGNORE).all()
    assert e.labels[e.labels != IGNORE].tolist() == smol("circle<|im_end|>", add_special_tokens=False)["input_ids"]
    assert e.input_ids.dtype == e.labels.dtype == torch.long and e.truncated is None


def test_without_a_placeholder_the_image_opens_the_first_user_turn(smol):
    e = encode_conversation(smol, turns("What shape is it?", "circle"), 3, system_prompt="Answer in one word.")
    before, after = segments(smol, e)
    assert before == "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n"
    assert after.startswith("\nWhat shape is it?<|im_end|>")
    alone = encode_conversation(smol, turns("", "a circle"), 3, template=CHATML)
    assert segments(smol, alone) == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\na circle<|im_end|>\n")


def test_placeholder_in_the_middle_and_the_conversations_own_system_turn(smol):
    conversation = [{"role": "system", "text": "Be terse."}, *turns("Look:\n<image>\nwhat is it?", "a dog")]
    e = encode_conversation(smol, conversation, 2, system_prompt="ignored: the conversation has its own")
    before, after = segments(smol, e)
    assert before == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nLook:\n"
    assert after.startswith("\nwhat is it?<|im_end|>")


def test_multi_turn_labels_every_answer_and_its_end_of_turn(smol):
    conversation = turns("<image>\nWhat shape?", "circle", "And the colour?", "dark red")
    e = encode_conversation(smol, conversation, 4, template=CHATML)
    assert learnt(smol, e) == "circle<|im_end|>dark red<|im_end|>"
    # labels sit on the very positions of those tokens: nothing shifted by the image slots
    assert (e.labels[e.labels != IGNORE] == e.input_ids[e.labels != IGNORE]).all()


def test_pieces_tokenize_as_the_whole_text_does(smol):
    """Without an image the ids are exactly what the tokenizer's own apply_chat_template gives."""
    conversation = turns("What shape?", "circle", "And the colour, exactly?", "dark red, I think.")
    messages = [{"role": t["role"], "content": t["text"]} for t in conversation]
    e = encode_conversation(smol, conversation, 0)
    assert e.image_tokens == 0 and len(e.image_positions) == 0
    assert e.input_ids.tolist() == smol.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_generation_prompt_is_the_training_prefix(smol):
    conversation = turns("<image>\nWhat shape?", "circle", "And the colour?", "dark red", "Size?", "small")
    full = encode_conversation(smol, conversation, 4, template=CHATML)
    starts = [i for i in range(1, len(full.labels)) if full.labels[i] != IGNORE and full.labels[i - 1] == IGNORE]
    assert len(starts) == 3
    for k, start in zip((1, 3, 5), starts):
        prompt = encode_generation_prompt(smol, conversation[:k], 4, template=CHATML)
        assert prompt.input_ids.tolist() == full.input_ids[:start].tolist()
        assert smol.decode(prompt.input_ids[-4:]) == "<|im_start|>assistant\n"
        assert (prompt.labels == IGNORE).all() and prompt.image_start == full.image_start
    assert stop_token_ids(smol) == [smol.convert_tokens_to_ids("<|im_end|>")]
    assert stop_token_ids(smol, "<|im_end|>") == stop_token_ids(smol)


def test_training_truncation_keeps_whole_early_turns(smol):
    conversation = turns("<image>\nWhat shape?", "circle", "And the colour?", "dark red")
    whole = encode_conversation(smol, conversation, 4, template=CHATML)
    first_turn_end = whole.input_ids.tolist().index(smol.convert_tokens_to_ids("<|im_end|>"), 17) + 2
    cut = encode_conversation(smol, conversation, 4, template=CHATML, max_length=len(whole.input_ids) - 1)
    assert cut.truncated == "later turns" and len(cut.input_ids) == first_turn_end
    assert learnt(smol, cut) == "circle<|im_end|>"
    assert cut.input_ids.tolist() == whole.input_ids[:first_turn_end].tolist()
    answer_start = int((whole.labels != IGNORE).nonzero()[0])
    short = encode_conversation(smol, conversation, 4, template=CHATML, max_length=answer_start + 1)
    assert short.truncated == "answer cut" and learnt(smol, short) == "circle"
    with pytest.raises(TooLong, match=f"no room for an answer in max_length={answer_start}"):
        encode_conversation(smol, conversation, 4, template=CHATML, max_length=answer_start)
    assert encode_conversation(smol, conversation, 4, template=CHATML, max_length=len(whole.input_ids)).truncated \
        is None


def test_training_truncation_never_cuts_off_the_image(smol):
    conversation = turns("Hi", "hello", "<image>\nWhat shape?", "circle")
    whole = encode_conversation(smol, conversation, 6, template=CHATML)
    assert whole.image_start > 10
    answer_start = int((whole.labels != IGNORE).nonzero()[0])
    with pytest.raises(TooLong):                  # turn 1 fits, but without the image
        encode_conversation(smol, conversation, 6, template=CHATML, max_length=whole.image_start + 3)
    kept = encode_conversation(smol, conversation, 6, template=CHATML, max_length=whole.image_start + 8)
    assert kept.truncated == "answer cut" and learnt(smol, kept) == "hello<|im_end|>"
    assert len(kept.input_ids) == whole.image_start + 8 and answer_start < whole.image_start


def test_generation_prompt_drops_its_earliest_exchanges(smol):
    conversation = turns("<image>\nWhat shape?", "circle", "And the colour?", "dark red", "Size?", "small", "Why?")
    whole = encode_generation_prompt(smol, conversation, 4, template=CHATML)
    shorter = encode_generation_prompt(smol, conversation, 4, template=CHATML, max_length=len(whole.input_ids) - 1)
    text = smol.decode(shorter.input_ids)
    assert shorter.truncated == "earlier turns" and "What shape?" in text and "circle" in text
    assert "And the colour?" not in text and "Size?" in text
    assert text.endswith("Why?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(TooLong, match="even without its earlier exchanges"):
        encode_generation_prompt(smol, conversation, 4, template=CHATML, max_length=20)


def test_tiny_llama_tokenizer_with_a_template_string(small):
    conversation = turns("<image> what shape is in the image ?", "circle", "what color ?", "red")
    e = encode_conversation(small, conversation, 3, template=SIMPLE, end_of_turn="[SEP]")
    # "user" and ":" are not in the tiny vocabulary
    assert small.decode(e.input_ids[: e.image_start]) == "[UNK] [UNK]"
    after = small.decode(e.input_ids[e.image_start + 3:])
    assert after.startswith("what shape is in the image? [SEP] [UNK] [UNK] circle")
    assert learnt(small, e) == "circle [SEP] red [SEP]"
    assert e.input_ids[e.image_positions].tolist() == [small.pad_token_id] * 3
    # the tiny tokenizer has no EOS: without end_of_turn the whole rendered answer is learnt
    assert learnt(small, encode_conversation(small, conversation, 3, template=SIMPLE)) == "circle [SEP] red [SEP]"
    prompt = encode_generation_prompt(small, conversation[:3], 3, template=SIMPLE, end_of_turn="[SEP]")
    assert small.decode(prompt.input_ids[prompt.image_start + 3:]).endswith("what color? [SEP] [UNK] [UNK]")
    assert stop_token_ids(small, "[SEP]") == [small.sep_token_id]
    with pytest.raises(PeftmmError, match=r"end-of-turn string 'what color' is 2 tokens"):
        stop_token_ids(small, "what color")


def test_bad_conversations_and_templates(smol, small):
    with pytest.raises(DataError, match="2 <image> placeholders but 1 image"):
        encode_conversation(smol, turns("<image> <image> hi", "x"), 4)
    with pytest.raises(DataError, match="1 <image> placeholders but no image"):
        encode_conversation(smol, turns("<image> hi", "x"), 0)
    with pytest.raises(DataError, match="no assistant turn"):
        encode_conversation(smol, turns("hi"), 4)
    with pytest.raises(DataError, match="ends with a user turn, not a assistant turn"):
        encode_generation_prompt(smol, turns("hi", "x"), 4)
    with pytest.raises(PeftmmError, match="tokenizer has no chat template; give one in the recipe"):
        encode_conversation(small, turns("hi", "x"), 4)
    counting = "{{ messages|length }}" + SIMPLE    # renders the turn count first: prefixes are not prefixes
    with pytest.raises(PeftmmError, match="does not render the conversation up to turn 1 as the beginning"):
        encode_conversation(small, turns("hi", "x"), 4, template=counting)
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}" + SIMPLE
    with pytest.raises(PeftmmError, match="cannot render this conversation: .*system first"):
        encode_conversation(small, turns("hi", "x"), 4, template=strict)


def test_a_tokenizer_whose_pieces_do_not_join_up_is_refused():
    """A SentencePiece-style tokenizer (a space before every text it is given) would see answers
    in training that it never sees after "assistant :" when it generates: refused, not mis-trained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "\u2581user", "\u2581assistant", "\u2581:", "\u2581red", "\u2581circle"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    spm_like = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    glued = ("{% for m in messages %}{{ m['role'] }} :{{ m['content'] }}</s>{% endfor %}"
             "{% if add_generation_prompt %}assistant :{% endif %}")
    with pytest.raises(PeftmmError, match="other tokens for a conversation cut at its turns than for the whole"):
        encode_conversation(spm_like, turns("red circle", "red"), 2, template=glued)
    # the space written at the start of each text instead: what such a tokenizer adds anyway
    spaced = glued.replace(":{{ m['content'] }}", ":{{ ' ' + m['content'] }}")
    e = encode_conversation(spm_like, turns("red circle", "red"), 2, template=spaced)
    assert spm_like.convert_ids_to_tokens(e.input_ids[e.labels != IGNORE].tolist()) == ["\u2581red", "</s>"]


def test_pad_batch_right_for_training_left_for_generation(smol):
    short = encode_conversation(smol, turns("<image>\nShape?", "circle"), 3, template=CHATML)
    long = encode_conversation(smol, turns("What shape is in the picture, please?", "a circle"), 3, template=CHATML)
    batch = pad_batch([short, long], pad_id=smol.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids)) and n < len(long.input_ids)
    assert batch["input_ids"][0, :n].tolist() == short.input_ids.tolist()
    assert (batch["labels"][0, n:] == IGNORE).all() and batch["attention_mask"][0].tolist() == [1] * n + [0] * (
        len(long.input_ids) - n)
    assert batch["image_positions"].tolist() == [short.image_positions.tolist(), long.image_positions.tolist()]
    prompts = [encode_generation_prompt(smol, turns("Shape?"), 3, template=CHATML),
               encode_generation_prompt(smol, turns("What shape is in the picture, please?"), 3, template=CHATML)]
    left = pad_batch(prompts, pad_id=smol.pad_token_id, left=True)
    shift = len(prompts[1].input_ids) - len(prompts[0].input_ids)
    assert left["input_ids"][0, shift:].tolist() == prompts[0].input_ids.tolist()
    assert left["attention_mask"][0, :shift].sum() == 0 and left["attention_mask"][1].all()
    assert left["image_positions"][0].tolist() == (prompts[0].image_positions + shift).tolist()
    with pytest.raises(ValueError, match=r"different numbers of image tokens in one batch: \[0, 3\]"):
        pad_batch([short, encode_conversation(smol, turns("Shape?", "circle"), 0)], pad_id=0)


def test_truncation_line():
    assert truncation_line(Counter(), "train", 64) is None
    line = truncation_line(Counter({"later turns": 3, "answer cut": 1, "too long": 2}), "train", 64)
    assert line == ("peftmm: train: 6 conversations longer than text.max_length=64 (first answer cut at the limit: 1, "
                    "later turns dropped: 3, skipped: no room for an answer: 2); raise text.max_length")
