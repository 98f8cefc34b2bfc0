"""What ``peftmm plan`` measures with: a meter of the tensors ops create (on the meta device,
where they cost nothing), the stand-ins for batches and feature caches it feeds the model, the
allocator model that turns them into resident memory on CPU, bf16 autocast for meta tensors,
bitsandbytes' allocations, and the bytes frozen weights take.

The allocator model (:class:`Heap`, replaying the traces :class:`Meter` records; :func:`replay_run`
runs a whole training through it and reports, besides the most resident, the freed bytes malloc
still holds then, ``free_at_peak``): CPU tensors come from glibc malloc. Blocks under its mmap
threshold are cut from the heap, and when they are freed the heap keeps them for later blocks:
the process does not get smaller. Blocks at or over the threshold are mapped on their own and
returned when freed. glibc raises the threshold to the size of each mapped block it frees, up to
32 MiB (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit), and a training run frees such blocks in its
first step, so 32 MiB is the threshold used. So a run's resident memory is not its largest phase
alone: the activations a training step cut from the heap stay held while a later phase
(evaluation, the test split's feature caching) maps its large blocks on top. How close the model
comes to real runs of this repo's recipes is measured by bench/plan_check.py, into
bench/results/plan_check.json (per recipe: the estimate's parts and phases, the measured peak).
"""

from __future__ import annotations

import bisect
import itertools
import math
import struct
import weakref
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from .backbones import QUANTIZATION_SKIP
from .batching import Batcher
from .bundle_files import MAX_HEADER_BYTES
from .errors import PeftmmError
from .safe_load import load_json
from .tensors import to_device

MMAP_THRESHOLD = 32 * 2**20   # glibc malloc: blocks this large are mapped alone (module docstring)


class Meter(TorchDispatchMode):
    """Follows every tensor that ops create while active, by storage, until it is freed: ``peak``
    is the most bytes alive at once, parameter gradients left out (``watch_gradients``: they are
    counted on their own). Tensors that existed before (parameters, and views of them) are not
    new memory and are not counted. On the meta device tensors have shapes but no data, so a run
    costs nothing; ``.item()`` there has no value, and is answered True (a full mask) or 1.

    ``trace()``: every allocation ``(serial, bytes)`` and free ``(serial, None)`` in order,
    gradients left out, for :class:`Heap` to replay."""

    def __init__(self):
        super().__init__()
        self.live = {}                 # storage -> (bytes, serial, weakref)
        self.grads = set()             # the serials of gradients
        self.events: list[tuple[int, int | None]] = []
        self.now = self.grad_bytes = self.peak = self.serial = 0
        self.recording = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for storage in (t.untyped_storage() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            if (key := storage._cdata) in self.live or key in given:   # a view or in place: no new bytes
                continue
            self.serial += 1
            self.live[key] = (storage.nbytes(), self.serial, weakref.ref(storage, lambda _, key=key: self._free(key)))
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now - self.grad_bytes)
            self.events.append((self.serial, storage.nbytes()))
        return out

    def __exit__(self, *exc):
        self.recording = False    # what is freed after this is not part of the phase
        return super().__exit__(*exc)

    def _free(self, key: int) -> None:
        size, serial, _ = self.live.pop(key, (0, None, None))
        self.now -= size
        if serial in self.grads:
            self.grad_bytes -= size
        if self.recording and serial is not None:
            self.events.append((serial, None))

    def watch_gradients(self, parameters) -> list:
        def hook(param):
            size, serial, _ = self.live.get(param.grad.untyped_storage()._cdata, (0, None, None))
            if serial is not None and serial not in self.grads:
                self.grads.add(serial)
                self.grad_bytes += size
        return [p.register_post_accumulate_grad_hook(hook) for p in parameters]

    def trace(self) -> list[tuple[int, int | None]]:
        """The events without the gradients (counted on their own, not in the heap)."""
        return [e for e in self.events if e[0] not in self.grads]


class Heap:
    """glibc malloc (one arena) as tensors see it, replaying :class:`Meter` traces phase after
    phase (module docstring). torch asks for 64-byte aligned blocks. A block at or over the mmap
    threshold is mapped alone and returned when freed, which raises the threshold to its size (up
    to 32 MiB). A smaller one takes the smallest free chunk it fits in (glibc's large bins are best
    fit), leaving the rest free, or else grows the heap at its top. Freed chunks merge with free
    neighbours; the heap shrinks only when its free top passes the trim threshold (twice the mmap
    threshold). ``peak``: the most the heap's extent plus the mapped blocks reached."""

    def __init__(self):
        self.threshold, self.top, self.brk = 128 * 1024, 0, 0   # M_MMAP_THRESHOLD's default start
        self.by_size: list[tuple[int, int]] = []    # free chunks (size, start), sorted
        self.at: dict[int, int] = {}                # free chunk start -> size
        self.ending: dict[int, int] = {}            # free chunk end -> start
        self.blocks: dict = {}                      # key -> (start, chunk size, bytes asked); start None: mapped
        self.mapped = self.live = self.peak = self.live_at_peak = self.base = 0   # live: bytes asked for, alive

    def _take(self, start: int) -> int:
        size = self.at.pop(start)
        del self.ending[start + size]
        self.by_size.pop(bisect.bisect_left(self.by_size, (size, start)))
        return size

    def _give(self, start: int, size: int) -> None:
        if start + size == self.top:          # merges into the top chunk (never trimmed: docstring)
            self.top = start
            return
        self.at[start], self.ending[start + size] = size, start
        bisect.insort(self.by_size, (size, start))

    def malloc(self, key, size: int) -> None:
        n = -(-(size + 8) // 64) * 64
        if n >= self.threshold:
            n = -(-n // 4096) * 4096
            self.blocks[key] = (None, n, size)
            self.mapped += n
        else:
            i = bisect.bisect_left(self.by_size, (n, -1))
            if i < len(self.by_size):
                start = self.by_size[i][1]
                rest = self._take(start) - n
                if rest:
                    self._give(start + n, rest)
            else:
                start, self.top = self.top, self.top + n
                self.brk = max(self.brk, self.top)
            self.blocks[key] = (start, n, size)
        self.live += size
        if self.brk + self.mapped > self.peak:
            self.peak, self.live_at_peak = self.brk + self.mapped, self.live

    def free(self, key) -> None:
        start, n, size = self.blocks.pop(key)
        self.live -= size
        if start is None:
            self.mapped -= n
            if n <= MMAP_THRESHOLD:
                self.threshold = max(self.threshold, n)
            return
        if start in self.ending:              # merges with the free chunk before
            before = self.ending[start]
            n += self._take(before)
            start = before
        if start + n in self.at:              # and the one after
            n += self._take(start + n)
        self._give(start, n)

    def replay(self, events, tag) -> tuple[int, int, int]:
        """Run a phase's ``events`` (keys made distinct by ``tag``): the most resident during it,
        the live bytes then, and how many of them this phase made."""
        self.peak, self.live_at_peak, self.base = self.brk + self.mapped, self.live, self.live
        for serial, size in events:
            if size is None:
                if (tag, serial) in self.blocks:
                    self.free((tag, serial))
            else:
                self.malloc((tag, serial), size)
        return self.peak, self.live_at_peak, self.live_at_peak - self.base


class ShapeCache:
    """Stands in for a FeatureCache: tokens of the right shape (``lengths``: per key, or one for all)."""

    def __init__(self, lengths, width: int):
        self.length = (lambda key: lengths) if isinstance(lengths, int) else lengths.__getitem__
        self.width, self.failed = width, {}

    def lookup(self, keys: list[str], prefix: str) -> dict:
        n = max(map(self.length, keys))
        return {f"{prefix}_tokens": torch.zeros(len(keys), n, self.width, device="meta"),
                f"{prefix}_mask": torch.ones(len(keys), n, dtype=torch.bool, device="meta")}

    def nbytes(self, keys) -> int:
        return sum(map(self.length, set(keys))) * self.width * 4   # fp32, padding dropped


class ShapeBatcher(Batcher):
    """The trainer's batcher, with pixels as meta tensors of their real shape (no image is read)."""

    def vision_inputs(self, images, pixels=None) -> dict:
        if "vision" in self.caches:
            return self.caches["vision"].lookup(images, "vision")
        size = self.model.towers["vision"].processor.size   # each image preprocessed, then stacked
        return {"pixel_values": torch.stack([torch.zeros(3, size, size, device="meta") for _ in images])}

    def __call__(self, examples):
        return to_device(super().__call__(examples), "meta")


def most_per_batch(examples, batches, text_of) -> dict:
    """The most rows, distinct images and distinct texts that any one batch (index lists) holds."""
    counts = [(len(b), len({str(examples[i]["image"]) for i in b}), len({text_of(examples[i]) for i in b}))
              for b in batches]
    return dict(zip(("rows", "images", "texts"), map(max, zip(*counts))))


def checkpoint_trace(sizes: list[int]) -> list[tuple[int, int | None]]:
    """checkpoint.py writing a checkpoint: a clone of each tensor (``sizes``: the trainable
    weights, AdamW's two moments, the best epoch's copy), its bytes for safetensors, the file's
    bytes; then all freed."""
    events = [(i, n) for i, n in enumerate(sizes * 2)] + [(-1, sum(sizes))]
    return events + [(i, None) for i, _ in events]


def replay_run(order: list[tuple[str, int | None, list]], most_steps: int = 10) -> dict:
    """Replay phases through one :class:`Heap` in ``order``: (phase, how many times, its trace),
    None times for training steps, which run until the heap stops growing (at most
    ``most_steps``). The most resident, during which phase, the bytes alive then (``live``; of
    them ``own``: the phase's, the rest kept from earlier ones), the steps run."""
    heap, top, runs, steps = Heap(), {"resident": -1}, itertools.count(), 0
    for phase, times, trace in order:
        for i in range(most_steps if times is None else times):
            before = heap.brk
            resident, live, own = heap.replay(trace, next(runs))
            if resident > top["resident"]:
                top.update(resident=resident, live=live, own=own, phase=phase)
            if times is None:
                steps = i + 1
                if heap.brk == before and i:
                    break
    return {"peak_phase": top["phase"], "resident": top["resident"], "live": top["live"], "own": top["own"],
            "free_at_peak": top["resident"] - top["live"], "steps": steps}


@contextmanager
def autocast(dtype: torch.dtype):
    """torch.autocast's rule on a GPU, for meta tensors (which autocast leaves alone): matrix
    products, convolutions and attention in ``dtype``; normalisation, softmax and losses in fp32.
    The functions are swapped in torch and torch.nn.functional meanwhile, backward included, where
    checkpointed blocks run their forward again and must cast the same way."""
    spots = [(F, n, dtype) for n in ("linear", "conv1d", "conv2d", "scaled_dot_product_attention")]
    spots += [(torch, n, dtype) for n in ("matmul", "bmm", "baddbmm", "einsum")]
    spots += [(F, n, torch.float32) for n in ("layer_norm", "group_norm", "softmax", "log_softmax", "cross_entropy")]
    originals = [getattr(module, name) for module, name, _ in spots]

    def casting(fn, to):
        cast = partial(tree_map_only, torch.Tensor, lambda t: t.to(to) if t.is_floating_point() else t)
        return lambda *args, **kwargs: fn(*cast(args), **cast(kwargs))

    for (module, name, to), fn in zip(spots, originals):
        setattr(module, name, casting(fn, to))
    try:
        yield
    finally:
        for (module, name, _), fn in zip(spots, originals):
            setattr(module, name, fn)


class _BitsAndBytesLinear(torch.autograd.Function):
    """What a bitsandbytes layer allocates around its product, on meta tensors. CPU int8
    (MatMul8bitFp) and nf4 (fp32 compute) dequantise the weight to fp32 in forward and again in
    backward, the input kept for backward; CUDA int8 (MatMul8bitLt) casts the input to fp16,
    quantises it to int8, multiplies into int32 and dequantises the output to fp16, and
    dequantises the weight in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, int8_cuda: bool):
        ctx.weight, ctx.x = weight, x
        if int8_cuda:   # the fp16 input and its int8 rows live until the int32 product is made
            quantised = (x.to(torch.float16, copy=True), torch.empty(x.shape, dtype=torch.int8, device=x.device))
            product = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=torch.int32, device=x.device)
            del quantised
            out = product.to(torch.float16).to(x.dtype)
            return out if bias is None else out + bias.to(out.dtype)
        dense = weight.to(torch.float32, copy=True)
        return torch._C._nn.linear(x.to(torch.float32), dense, bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        dense = ctx.weight.to(grad.dtype, copy=True)
        return torch.matmul(grad, dense), None, None, None


def emulate_bitsandbytes(model: nn.Module, precision: str, device: str) -> None:
    """Make the Linear layers int8/nf4 would quantise allocate as bitsandbytes' do (above)."""
    for module_name, module in model.named_modules():
        if _quantised(module_name, module, "weight", precision):
            int8_cuda = precision == "int8" and device == "cuda"
            module.forward = lambda x, m=module, q=int8_cuda: _BitsAndBytesLinear.apply(x, m.weight, m.bias, q)


def _quantised(module_name: str, module: nn.Module, name: str, precision: str) -> bool:
    return (precision in ("int8", "nf4") and isinstance(module, nn.Linear) and name == "weight"
            and not any(skip in module_name for skip in QUANTIZATION_SKIP))


def _frozen(model: nn.Module):
    seen = set()
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) not in seen and not tensor.requires_grad:
                seen.add(id(tensor))
                yield module_name, module, name, tensor


def weight_bytes(model: nn.Module, precision: str) -> int:
    """Bytes of a tower model's frozen parameters and buffers at ``precision``."""
    total = 0
    for module_name, module, name, tensor in _frozen(model):
        if not _quantised(module_name, module, name, precision):
            total += tensor.numel() * tensor.element_size()
        elif precision == "int8":  # int8 weights, one fp32 scale per output row (bitsandbytes' SCB)
            total += tensor.numel() + 4 * tensor.shape[0]
        else:                      # nf4: two weights a byte, one fp32 absmax per block of 64
            total += tensor.numel() // 2 + 4 * math.ceil(tensor.numel() / 64)
    return total


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def file_itemsize(folder: str, config) -> int:
    """Bytes per weight in the checkpoint's files: the dtype most of the bytes of its
    ``*.safetensors`` headers have (read without the tensors), else the config's dtype, else 4."""
    counts: dict[int, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with open(path, "rb") as f:
                length = struct.unpack("<Q", f.read(8))[0]
                if length > MAX_HEADER_BYTES:   # safetensors' own cap: not a header to read
                    continue
                header = load_json(f.read(length), str(path))
        except (OSError, PeftmmError, struct.error):
            continue
        if not isinstance(header, dict):
            continue
        for entry in header.values():
            if isinstance(entry, dict) and entry.get("dtype") in _ITEMSIZE:
                start, end = entry["data_offsets"]
                counts[_ITEMSIZE[entry["dtype"]]] = counts.get(_ITEMSIZE[entry["dtype"]], 0) + end - start
    if counts:
        return max(counts, key=counts.get)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def quantised_source_bytes(model: nn.Module, precision: str, itemsize: int) -> int:
    """Bytes the weights int8/nf4 quantises take in the checkpoint file (``itemsize`` a weight).
    On CPU they are read from the memory-mapped file, and the mapping outlives loading (the
    tensors left as they are point into it), so the pages read stay resident. Measured after
    loading SmolLM2-135M in int8: 405 MiB of its file mapped, its quantised Linear weights in
    fp32; MiniLM-L6: 41 MiB (tools: /proc/self/smaps)."""
    return sum(tensor.numel() * itemsize for module_name, module, name, tensor in _frozen(model)
               if _quantised(module_name, module, name, precision))
