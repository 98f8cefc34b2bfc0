"""What the tasks that write text with a decoder LM share (captioning, instruct).

The text tower is loaded as a causal LM with its output layer; the ``projector`` fusion turns the
image into tokens in the LM's input-embedding space. Both tasks train on target tokens only
(labels -100 elsewhere), take positions from the attention mask (so left padding never shifts
them, exactly as transformers' ``generate`` derives them) and generate from input embeddings
with the LM's own ``generate`` (KV cache, greedy / beam / sampling).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..errors import PeftmmError

IGNORE = -100


def causal_lm(model, task_name: str):
    """The text tower's LM, checked (a causal LM behind the projector) and made active."""
    tower = model.towers["text"]
    if not tower.causal_lm:
        raise PeftmmError(f"task {task_name} needs the text tower loaded as a causal LM (with its output "
                          "layer); this one was loaded as an encoder")
    if not getattr(model.fusion, "yields_tokens", False):
        raise PeftmmError(f"task {task_name} needs fusion type 'projector' (vision tokens for the LM)")
    model.activate("text")
    return tower.model


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the attended tokens only, exactly as generation derives them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def eos_id(tok, task_name: str) -> int:
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise PeftmmError(f"{task_name}: the LM's tokenizer has no end-of-sequence token")
    return eos


def pad_id(tok, task_name: str) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else eos_id(tok, task_name)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the target tokens (labels not -100); 0 for a batch without any.
    ``logits``: ``[..., V]`` aligned with ``labels`` ``[...]``."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens ``token_loss`` averages over."""
    return (labels != IGNORE).sum()


def generation_config(max_new_tokens: int, num_beams: int, stop: int | list[int], pad: int, *,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, **extra):
    """transformers' GenerationConfig for these tasks; sampling settings only when sampling (so
    transformers does not warn about unused ones)."""
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, eos_token_id=stop,
                            pad_token_id=pad, **sampling, **extra)
