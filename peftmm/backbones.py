"""Frozen backbones: load a vision or text tower by zoo name, hub id or folder, at a precision.

A :class:`Tower` wraps one backbone and turns its output into tokens ``[B, N, D]`` with a
boolean mask, whatever the architecture: a CNN's ``[B, C, H, W]`` feature map becomes H*W
tokens, a transformer's hidden states are used as they are. Module names used by methods
(LoRA targets, adapter placement) are always relative to the tower's own model, so a target
in one tower can never match a module of the other.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from . import zoo
from .errors import PeftmmError
from .hub_access import hub_allowed, hub_cached, local_only, probe_hub
from .images import parse_background
from .methods.base import ActiveSlots
from .precision import device_facts, int8_threshold, nf4_compute_dtype
from .preprocess import ImagePreprocessor, image_preprocessor
from .safe_load import short_repr
from .weight_files import check_safetensors_only, pickle_refused

TOWERS = ("vision", "text")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32, "nf4": torch.float32}
QUANTIZATION_SKIP = ("lm_head", "classifier", "pooler")  # Linear layers int8/nf4 leave in full precision


def quiet_libraries() -> None:
    """bitsandbytes logs every int8 matmul on CPU and transformers prints a load report per model."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@cache
def architectures() -> dict[str, dict]:
    data = json.loads(resources.files("peftmm").joinpath("architectures.json").read_text())
    data.pop("_about", None)
    return data


def resolve_source(source: str) -> str:
    """A zoo name becomes its cached folder; a folder stays a folder; anything else must be a hub
    id (``owner/name``), found in the local Hugging Face cache or, only where the user allows the
    Hub (``hub_allowed``), checked there with one request. A name from an untrusted bundle so
    never sets off transformers' download retries: a misspelt zoo name fails here, offline."""
    if zoo.is_zoo_name(source):
        return str(zoo.resolve(source))
    if Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or not all(source.split("/")):
        hint = difflib.get_close_matches(source, list(zoo.catalogue()), n=1)
        raise PeftmmError(f"backbone {short_repr(source)} is neither a zoo name ({', '.join(zoo.catalogue())}"
                          f"{f'; did you mean {hint[0]!r}?' if hint else ''}), an existing folder, nor a hub id "
                          "(owner/name)")
    if hub_cached(source):
        return source
    if not hub_allowed():
        raise PeftmmError(f"backbone {source!r} is a hub id that is not in the local Hugging Face cache, and the Hub "
                          "may not be contacted (HF_HUB_OFFLINE or --offline): download it where the Hub is allowed, "
                          "or point the recipe at a local folder")
    probe_hub(source)
    return source


@lru_cache(maxsize=32)
def _fingerprint_files(files: tuple[tuple[str, int, float], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        digest.update(zoo.sha256_file(Path(name)).encode())
    return digest.hexdigest()


def fingerprint(folder: str) -> str:
    """sha256 over the backbone's weight files: identifies the weights whatever the precision."""
    path = Path(folder)
    if not path.is_dir():  # a hub id: fingerprint the files transformers cached for it
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(folder, allow_patterns=["*.safetensors", "*.bin"], local_files_only=True))
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise PeftmmError(f"no weight files (*.safetensors, *.bin) in {path}")
    return _fingerprint_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime) for f in files))


def _quantization_config(precision: str, skip: list[str], device="cpu"):
    """Threshold and compute dtype per device: see precision.py (outliers decomposed on CUDA only,
    4-bit weights dequantised into the dtype autocast computes in there)."""
    from transformers import BitsAndBytesConfig

    facts = device_facts(device)
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold(facts),
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=nf4_compute_dtype(facts), llm_int8_skip_modules=skip)


def _model_class(config, tower: str, causal_lm: bool):
    """Pick the transformers class for one tower, taking it out of a dual-tower model if need be."""
    from transformers import AutoModel, AutoModelForCausalLM

    sub = getattr(config, f"{tower}_config", None)
    if sub is not None and config.model_type not in architectures():  # e.g. a full CLIP checkpoint
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        return MODEL_MAPPING[type(sub)], sub
    return (AutoModelForCausalLM if causal_lm else AutoModel), config


@dataclass
class BackboneInfo:
    source: str          # what the recipe said (zoo name, hub id or path)
    model_type: str
    fingerprint: str
    precision: str
    hidden_size: int
    layout: str          # "sequence" (transformer) or "feature_map" (CNN)


class Tower(nn.Module):
    """One frozen backbone plus what it needs to turn raw inputs into tokens."""

    def __init__(self, name: str, model: nn.Module, info: BackboneInfo, processor):
        super().__init__()
        self.name = name
        self.model = model
        self.info = info
        self.processor = processor  # tokenizer (text) or ImagePreprocessor (vision)
        self.input_dtype = _param_dtype(model)
        self.slots = ActiveSlots()  # which injected modules act (methods/base.py)
        self.causal_lm = False      # text towers: loaded with their LM head (load_tower(causal_lm=True))
        self.checkpointed: list[nn.Module] = []  # blocks under activation checkpointing (enable_checkpointing)

    @property
    def arch(self) -> dict:
        return architectures().get(self.info.model_type, {})

    def train(self, mode: bool = True):
        # The backbone stays in eval mode for ever: dropout off, batch-norm statistics fixed.
        # peft's LoRA layers follow the mode (their dropout), and with them the frozen layer
        # they wrap: an int8 base then multiplies through bitsandbytes' dequantising path.
        super().train(mode)
        if getattr(self, "peftmm_full", False):  # full fine-tuning: dropout on, like any module;
            self.model.train(mode)               # batch-norm statistics stay fixed all the same,
            for module in self.model.modules():  # since VQA batches hold few distinct images
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        else:
            self.model.eval()
            for module in self.model.modules():
                if type(module).__module__.startswith("peft."):
                    module.train(mode)
        # A checkpointed block recomputes only while its own flag says training (transformers'
        # rule, kept for ours): set on the block alone, so dropout and batch norm inside it stay
        # as they are, and evaluation runs the blocks plainly.
        for block in self.checkpointed:
            block.training = mode
        return self

    def enable_checkpointing(self) -> None:
        """Activation checkpointing: the forward pass keeps only each block's input, and backward
        runs the block again to get what it needs. Through transformers' own switch where the model
        supports it, else by checkpointing each block or stage that architectures.json names for
        adapters (``adapter_stage``: MobileNetV2's inverted-residual blocks, ConvNeXt's stages).

        Always non-reentrant (``use_reentrant=False``), which is what makes it work on a frozen
        backbone: a block's input comes from frozen layers and does not require grad, and the
        reentrant variant then returns an output without a grad_fn, so LoRA, adapters and prefixes
        inside the block would silently get no gradient. The non-reentrant one records the block's
        autograd graph as usual (recomputing its saved tensors when backward asks for them), so the
        block's trainable parameters get their gradients whatever its inputs.
        """
        if self.checkpointed:
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        model, options = self.model, {"use_reentrant": False}
        if getattr(model, "supports_gradient_checkpointing", False):
            if hasattr(model, "activation_checkpointing_enable"):   # transformers' current name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:                                                    # before it (deprecated since)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
            # transformers makes the embeddings' output require grad for the reentrant variant's sake;
            # non-reentrant checkpointing needs no such thing, and backward stops where training does
            model.disable_input_require_grads()
            self.checkpointed = [m for m in model.modules()
                                 if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        elif self.arch.get("adapter_stage"):
            stage = self.arch["adapter_stage"]
            self.checkpointed = [m for n, m in model.named_modules() if n and re.fullmatch(stage, n)]
            for block in self.checkpointed:
                _checkpoint_each_call(block)
        if not self.checkpointed:
            raise PeftmmError(f"{self.name}.gradient_checkpointing: {type(model).__name__} ({self.info.model_type}) "
                              "supports no activation checkpointing in transformers, and peftmm knows no blocks of it "
                              "to checkpoint (adapter_stage in architectures.json); set gradient_checkpointing: false")
        self.train(self.training)

    def forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "vision":
            pixels = inputs["pixel_values"].to(self.input_dtype)
            if self.info.layout == "feature_map":  # ~5x faster convolutions on CPU, same numbers
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            out = self.model(pixel_values=pixels)
            hidden = out.last_hidden_state
            if hidden.dim() == 4:  # CNN feature map -> one token per position
                hidden = hidden.flatten(2).transpose(1, 2)
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            return hidden.float(), mask
        # A causal LM (loaded for captioning) gives its decoder's final hidden states, without the
        # vocabulary projection: base_model is the decoder inside it (the model itself otherwise).
        model = self.model.base_model if self.causal_lm else self.model
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
        return hidden.float(), inputs["attention_mask"].bool()

    def image_processor(self, size: int, background=None) -> ImagePreprocessor:
        """This tower's preprocessing at another image size (CNNs take any size, and a bundle
        sharing the tower may have trained at another one), or over another background."""
        background = self.processor.background if background is None else parse_background(background)
        if size == self.processor.size and background == self.processor.background:
            return self.processor
        variants = self.__dict__.setdefault("_resized_processors", {})
        if (size, background) not in variants:
            variants[size, background] = self.processor.variant(size, background)
        return variants[size, background]

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        encoded = self.processor(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def probe_inputs(self) -> dict:
        """The smallest valid input (one blank image, or two tokens): for the forward passes that
        discover what an architecture looks like (widths, attention layers)."""
        device = next(self.model.parameters()).device
        if self.name == "vision":
            size = self.processor.size
            return {"pixel_values": torch.zeros(1, 3, size, size, device=device)}
        ids = torch.tensor([[self.processor.pad_token_id or 0, 1]], device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def module_names(self, kinds=(nn.Linear, nn.Conv2d)) -> list[str]:
        return [n for n, m in self.model.named_modules() if n and _is_kind(m, kinds)]


def _checkpoint_each_call(block: nn.Module) -> None:
    """Run ``block`` under torch.utils.checkpoint (non-reentrant, see Tower.enable_checkpointing)
    whenever it is training and gradients are on. Its forward is replaced on the instance, not
    wrapped in another module, so parameter names (and bundles) stay the same."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def checkpointed(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    block.forward = checkpointed


def _is_kind(module, kinds) -> bool:
    return isinstance(module, kinds) or hasattr(module, "base_layer") and isinstance(module.base_layer, kinds)


@dataclass
class BackboneFiles:
    """What a tower is before any weight loads: its files, config, model class and processor
    (the planner builds its meta-device model from this too: plan_blueprint.Blueprint)."""
    folder: str
    cls: type            # the transformers class to instantiate
    config: object       # the checkpoint's config
    tower_config: object  # this tower's (a dual-tower checkpoint's sub-config, or config itself)
    layout: str
    processor: object    # tokenizer (text) or ImagePreprocessor (vision)

    @property
    def model_type(self) -> str:
        return self.tower_config.model_type


def read_backbone(name: str, source: str, *, image_size: int | None = None, causal_lm: bool = False,
                  background="white") -> BackboneFiles:
    """Resolve a backbone (zoo name, folder or hub id) and read its config and processor only."""
    from transformers import AutoConfig, AutoTokenizer

    quiet_libraries()
    folder = resolve_source(source)
    offline = {"local_files_only": True} if local_only(folder) else {}
    try:
        config = AutoConfig.from_pretrained(folder, **offline)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftmmError(f"cannot load {name} backbone {source!r}: it is neither a zoo name "
                          f"({', '.join(zoo.catalogue())}), an existing folder, nor a hub id the hub "
                          f"could provide ({reason})") from None
    cls, tower_config = _model_class(config, name, causal_lm)
    layout = architectures().get(tower_config.model_type, {}).get("layout", "sequence")
    if name == "vision":
        processor = image_preprocessor(folder, tower_config, image_size, layout, background)
    else:
        processor = AutoTokenizer.from_pretrained(folder, **offline)
        if processor.pad_token is None:  # decoder LMs often ship without one
            processor.pad_token = processor.eos_token
    return BackboneFiles(folder, cls, config, tower_config, layout, processor)


def load_tower(name: str, source: str, precision: str = "fp32", *, image_size: int | None = None,
               device: str | torch.device = "cpu", causal_lm: bool = False, background="white") -> Tower:
    """Load one frozen tower. ``name`` is "vision" or "text"; ``background``: what transparent
    pixels are composited onto (vision)."""
    files = read_backbone(name, source, image_size=image_size, causal_lm=causal_lm, background=background)
    folder, cls, config, tower_config = files.folder, files.cls, files.config, files.tower_config
    kwargs: dict = {"dtype": DTYPES[precision]}
    if precision in ("int8", "nf4"):
        if str(device).startswith("cpu"):
            kwargs["device_map"] = "cpu"
        else:
            kwargs["device_map"] = {"": torch.device(device).index or 0}
        kwargs["quantization_config"] = _quantization_config(precision, list(QUANTIZATION_SKIP), device)
    check_safetensors_only(name, source, folder, config, tower_config)
    try:
        # use_safetensors: a folder or hub repo with only pytorch_model.bin (a pickle) is refused,
        # never torch.load-ed
        model = cls.from_pretrained(folder, **({"config": tower_config} if tower_config is not config else {}),
                                    use_safetensors=True, local_files_only=local_only(folder), **kwargs)
    except OSError as e:
        if "safetensors" not in str(e):
            raise
        raise pickle_refused(name, source, folder, "the repository has no model.safetensors") from None
    if precision not in ("int8", "nf4"):
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    if precision == "nf4":
        _keep_nf4_trainable(model)
    if precision in ("int8", "nf4"):
        keep_bias_dtype(model)
    for module in model.modules():  # channels-last convolutions (see Tower.forward)
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    info = BackboneInfo(source, files.model_type, fingerprint(folder), precision, 0, files.layout)
    tower = Tower(name, model, info, files.processor)
    tower.causal_lm = causal_lm and name == "text"
    info.hidden_size = _probe_hidden_size(tower)
    return tower


@torch.no_grad()
def _probe_hidden_size(tower: Tower) -> int:
    """One tiny forward pass: the only way that works for every architecture (CNN widths vary)."""
    tokens, _ = tower(**tower.probe_inputs())
    return tokens.shape[-1]


def _keep_nf4_trainable(model: nn.Module) -> None:
    """bitsandbytes repacks 4-bit CPU weights on the first no-grad forward, after which any
    forward with grad fails in place; opting out keeps evaluation and training interleavable."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def keep_bias_dtype(model: nn.Module) -> None:
    """bitsandbytes' Linear8bitLt and Linear4bit cast their bias in place to the input's dtype
    (``bias.data = bias.data.to(x.dtype)``): a bf16 input under autocast would leave the frozen
    fp32 bias rounded to bf16 for good. Each forward gets its cast, and the bias its own tensor back."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) and module.bias is not None:
            _restore_bias_after_each_call(module)


def _restore_bias_after_each_call(module: nn.Module) -> None:
    forward = module.forward   # replaced on the instance (as _checkpoint_each_call does): names stay

    def kept(*args, **kwargs):
        bias = module.bias.data
        try:
            return forward(*args, **kwargs)
        finally:
            module.bias.data = bias

    module.forward = kept


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32
