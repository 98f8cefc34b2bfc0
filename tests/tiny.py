"""Tiny random backbones built from configs (no downloads), saved as local folders.

Every family peftmm claims to support gets one here, small enough that building, training a
few steps and reloading takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

VISION = ["vit", "clip", "siglip", "dinov2", "mobilenet_v2", "convnext"]
TEXT = ["bert", "llama"]  # and "llama_lm" (with its LM head, for captioning; built by its tests)
IMAGE = 32


def _vocab() -> list[str]:
    import easy_vqa

    words = set()
    for text in easy_vqa.get_train_questions()[0][:2000]:
        words.update(text.replace("?", " ?").split())
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *sorted(words - {"?"})]


def build(kind: str, folder: Path) -> Path:
    """Write a tiny model of ``kind`` (plus tokenizer or image config) into ``folder``."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    vision = dict(small, image_size=IMAGE, patch_size=8, num_channels=3)
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=512, max_position_embeddings=64, **small))
    elif kind == "llama":
        model = tf.LlamaModel(tf.LlamaConfig(vocab_size=512, max_position_embeddings=64, num_key_value_heads=2,
                                             **small))
    elif kind == "llama_lm":
        # initializer_range 0.3: with the default 0.02 a frozen random output layer cannot move the
        # logits far from uniform, so no trainable module could bring the loss down
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, max_position_embeddings=128, num_key_value_heads=1,
                                                   initializer_range=0.3, **small))
    elif kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(**vision))
    elif kind == "clip":  # a full CLIP checkpoint: peftmm must take the vision tower out of it
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=dict(small, vocab_size=512),
                                           projection_dim=16))
    elif kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**vision))
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**vision))
    elif kind == "mobilenet_v2":
        model = tf.MobileNetV2Model(tf.MobileNetV2Config(image_size=IMAGE, depth_multiplier=0.25,
                                                         tf_padding=False))
    elif kind == "convnext":
        model = tf.ConvNextModel(tf.ConvNextConfig(image_size=IMAGE, hidden_sizes=[8, 16, 24, 32],
                                                   depths=[1, 1, 1, 1]))
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    if kind in TEXT or kind == "llama_lm":
        vocab = folder / "vocab.txt"
        vocab.write_text("\n".join(_vocab()) + "\n")
        # transformers 5 ignores vocab_file= (every word would become [UNK]); vocab= reads the file
        tf.BertTokenizerFast(vocab=str(vocab)).save_pretrained(folder)
    return folder


def recipe(vision: str, text: str, vision_methods=(), text_methods=(), **sections) -> dict:
    """A recipe dict over tiny folders, training on a small slice of easy-VQA."""
    data = {
        "name": "tiny",
        "vision": {"backbone": vision, "methods": list(vision_methods)},
        "text": {"backbone": text, "methods": list(text_methods), "max_length": 16},
        "fusion": {"type": "gated-cross-attention", "dim": 32, "heads": 2},
        "task": {"type": "vqa", "hidden": 32, "dropout": 0.0},
        "data": {"source": "easy-vqa", "max_train_samples": 96, "max_eval_samples": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data
