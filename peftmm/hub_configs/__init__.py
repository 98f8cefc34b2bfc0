"""Offline copies of a few public Hugging Face Hub configs, for ``peftmm plan`` only.

``peftmm plan`` needs a backbone's ``config.json`` (its shapes), never its weights. For a hub id
it asks the hub, like training would. Where the hub cannot be reached (no network, or
``HF_HUB_OFFLINE=1``) and the id is one of the folders here (``<org>--<name>``, the hub's own
naming), the plan uses this copy instead and says so (``Estimate.details["offline"]``).

The files are the architecture fields of each repository's public ``config.json`` (and, for
vision towers, of ``preprocessor_config.json``); what is left out (generation settings, version
stamps) transformers fills with the same defaults as for the full file. They are read by the
planner only: training and prediction always load the real repository (recipes/hub/ need hub
access to train). A tokenizer is not copied: without one the planner counts tokens with
:class:`ApproximateTokenizer`, which errs long.

- openai/clip-vit-base-patch16: CLIP ViT-B/16 (vision 12 x 768, patch 16, 224 px; text 12 x 512)
- google/siglip-base-patch16-224: SigLIP ViT-B/16 (vision 12 x 768, patch 16, 224 px)
- Qwen/Qwen2.5-0.5B-Instruct: Qwen2, 24 layers, hidden 896, 14 heads (2 key/value), tied embeddings
- HuggingFaceTB/SmolLM2-1.7B-Instruct: Llama, 24 layers, hidden 2048, 32 heads, tied embeddings
- BAAI/bge-base-en-v1.5: BERT-base, 12 layers, hidden 768
"""

from __future__ import annotations

import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..backbones import _model_class, architectures, quiet_libraries
from ..plan_blueprint import Blueprint
from ..preprocess import image_preprocessor

HERE = Path(__file__).resolve().parent


def folder_for(source: str) -> Path | None:
    """This package's copy of hub id ``source`` (``org/name``), if it has one."""
    if source.count("/") != 1:
        return None
    folder = HERE / source.replace("/", "--")
    return folder if (folder / "config.json").is_file() else None


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (``HF_HUB_OFFLINE`` set: no)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class ApproximateTokenizer:
    """Stands in for a hub model's tokenizer where the hub cannot be reached: it counts tokens
    and gives no real ids. A token per word piece of up to three letters or digits and per
    punctuation mark, plus two special tokens where the real one adds any: English BPE and
    WordPiece tokenizers average about four characters a token, so lengths err long (a larger
    estimate), and ``text.max_length`` caps them as it caps real ones."""

    pad_token, eos_token, sep_token_id, padding_side, truncation_side = "<pad>", "</s>", None, "right", "right"

    def __init__(self, config):
        def first(value):
            return value[0] if isinstance(value, (list, tuple)) else value

        self.eos_token_id = first(getattr(config, "eos_token_id", None))
        self.pad_token_id = first(getattr(config, "pad_token_id", None))
        self.eos_token_id = 0 if self.eos_token_id is None else self.eos_token_id
        self.pad_token_id = self.eos_token_id if self.pad_token_id is None else self.pad_token_id

    def _ids(self, text: str, special: bool) -> list[int]:
        pieces = re.findall(r"[^\W_]{1,3}|[^\w\s]|_", text)
        return [self.eos_token_id] * (len(pieces) + (2 if special else 0))

    def __call__(self, texts, add_special_tokens: bool = True, padding=False, truncation=False,
                 max_length: int | None = None, return_tensors: str | None = None, **_):
        single = isinstance(texts, str)
        rows = [self._ids(t, add_special_tokens) for t in ([texts] if single else texts)]
        if truncation and max_length:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding:
            width = max(map(len, rows), default=0)
            masks = [m + [0] * (width - len(m)) for m in masks]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        return {"input_ids": rows[0], "attention_mask": masks[0]} if single else \
            {"input_ids": rows, "attention_mask": masks}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def blueprint(name: str, source: str, folder: Path, image_size: int | None, causal_lm: bool):
    """plan_blueprint.blueprint for ``source`` from this package's copy ``folder`` (no hub)."""
    from transformers import AutoConfig

    quiet_libraries()
    config = AutoConfig.from_pretrained(str(folder))
    cls, tower_config = _model_class(config, name, causal_lm)
    layout = architectures().get(tower_config.model_type, {}).get("layout", "sequence")
    processor = (image_preprocessor(str(folder), tower_config, image_size, layout) if name == "vision"
                 else ApproximateTokenizer(tower_config))
    return Blueprint(str(folder), cls, config, tower_config, layout, processor, offline=True)
