"""Which number formats a run computes in, decided in one place from the device's facts.

Training, planning, the benchmarks and inference all ask here, so a bundle is served at the
precision it was trained and validated under. The decisions are pure functions of
:class:`DeviceFacts` (tested with stubbed facts on CPU); :func:`device_facts` reads the real ones.

- ``mixed_precision: auto`` is bf16 autocast only where the GPU computes bf16 natively (compute
  capability 8.0 and up: A100, RTX 30xx and later). ``torch.cuda.is_bf16_supported()`` is true on
  older cards too, where bf16 is emulated and slow (T4, V100, RTX 20xx): those get fp16 autocast
  with a gradient scaler (accelerate adds one for ``fp16``), and cards older than 7.0 (no fp16
  tensor cores) compute in fp32. On CPU ``auto`` stays fp32, as it always was.
- nf4 towers dequantise into the dtype autocast computes in on CUDA (fp32 would dequantise to fp32
  and have autocast cast back: a silent slowdown on the large decoders nf4 is for); fp32 on CPU.
- int8 towers decompose outliers on CUDA (``llm_int8_threshold`` 6.0, bitsandbytes' default):
  there activations go through fp16 int8 matmuls, and an LLM's outlier features would lose
  accuracy or overflow without it. On CPU the threshold stays 0, which makes an input's output
  independent of the rest of its batch (NOTES: max diff 0.045 otherwise).
- fp32 work on CUDA may use TF32 tensor cores (10-bit mantissa products, fp32 accumulation).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .errors import PeftmmError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16 = (8, 0)    # Ampere: bf16 tensor cores
FP16_TENSOR_CORES = (7, 0)   # Volta/Turing
CUDA_INT8_THRESHOLD = 6.0
CPU_INT8_THRESHOLD = 0.0


@dataclass(frozen=True)
class DeviceFacts:
    type: str                                  # "cuda", "cpu" (or any other torch device type)
    capability: tuple[int, int] | None = None  # CUDA compute capability; None elsewhere


def device_facts(device: str | torch.device | None = None) -> DeviceFacts:
    """The facts of ``device`` (default: cuda when available, else cpu)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_available():
        return DeviceFacts("cuda", tuple(torch.cuda.get_device_capability(device)))
    return DeviceFacts(device.type)


def mixed_precision(requested: str, facts: DeviceFacts) -> str:
    """``train.mixed_precision`` resolved for ``facts``: "no", "bf16" or "fp16" (accelerate's names).
    An explicit choice is kept as it is (bf16 on a card that emulates it too: asked for by name)."""
    if requested == "auto":
        if facts.type != "cuda":
            return "no"
        capability = facts.capability or (0, 0)
        if capability >= NATIVE_BF16:
            return "bf16"
        return "fp16" if capability >= FP16_TENSOR_CORES else "no"
    if requested not in ("no", *AUTOCAST_DTYPES):
        raise PeftmmError(f"train.mixed_precision = {requested!r}: choose one of auto, no, bf16, fp16")
    return requested


def autocast_dtype(requested: str, facts: DeviceFacts) -> torch.dtype | None:
    """The dtype autocast computes in under ``requested`` on ``facts`` (None: no autocast)."""
    return AUTOCAST_DTYPES.get(mixed_precision(requested, facts))


def nf4_compute_dtype(facts: DeviceFacts) -> torch.dtype:
    """What 4-bit weights dequantise into: the dtype ``auto`` computes in on this device."""
    return autocast_dtype("auto", facts) or torch.float32


def int8_threshold(facts: DeviceFacts) -> float:
    """``llm_int8_threshold``: outlier decomposition on CUDA, none on CPU (see the module's notes)."""
    return CUDA_INT8_THRESHOLD if facts.type == "cuda" else CPU_INT8_THRESHOLD


def planned_facts(device: str) -> DeviceFacts:
    """The card ``peftmm plan --device cuda`` imagines: this machine's when it has one, else a
    current one (native bf16), which is what the plan was always written for."""
    if device == "cuda":
        here = device_facts()
        return here if here.type == "cuda" else DeviceFacts("cuda", NATIVE_BF16)
    return DeviceFacts(device)


@dataclass(frozen=True)
class InferencePlan:
    """How inference runs: autocast in ``dtype`` (None: none) and whether fp32 matmuls may use TF32."""
    dtype: torch.dtype | None
    tf32: bool


def record(mixed: str, facts: DeviceFacts) -> dict:
    """What a bundle's config says about the precision it was trained and validated under."""
    return {"mixed_precision": mixed, "device": facts.type,
            "capability": list(facts.capability) if facts.capability else None}


def inference_plan(recorded: dict | None, facts: DeviceFacts) -> InferencePlan:
    """On CUDA: the autocast the bundle was trained and validated under (none for a bundle trained
    without, or saved before bundles recorded it), TF32 for whatever runs in fp32. Elsewhere:
    plain fp32, as inference always ran on CPU, so CPU numbers stay what they were."""
    if facts.type != "cuda":
        return InferencePlan(None, False)
    mixed = (recorded or {}).get("mixed_precision", "no")
    if mixed == "bf16" and facts.capability is not None and facts.capability < NATIVE_BF16:
        mixed = "fp16"   # trained on a newer card: the nearest this one computes natively
    return InferencePlan(AUTOCAST_DTYPES.get(mixed), True)


def common_record(records: list[dict | None]) -> dict | None:
    """One record for rows of several bundles that go through a tower together: theirs when they
    agree, else none (fp32: no bundle computes less precisely than it was validated)."""
    first = records[0] if records else None
    return first if all(r == first for r in records) else None


@contextmanager
def tf32_allowed():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def inference_context(recorded: dict | None, device: str | torch.device):
    """The context inference runs under on ``device`` (a null one off CUDA)."""
    facts = device_facts(device)
    plan = inference_plan(recorded, facts)
    return entered(plan, facts.type)


@contextmanager
def entered(plan: InferencePlan, device_type: str):
    with (tf32_allowed() if plan.tf32 else nullcontext(),
          torch.autocast(device_type, dtype=plan.dtype) if plan.dtype is not None else nullcontext()):
        yield
