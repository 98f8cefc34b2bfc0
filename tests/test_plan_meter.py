"""peftmm/plan_meter.py: the meter (views of existing tensors are not new memory, gradients are
left out of the trace), the glibc malloc model that replays traces (mapped blocks, best fit,
merging, a heap that does not shrink), bitsandbytes' allocations, and the weight files' dtype."""

import json
import struct
import types

import torch
from torch import nn

from peftmm.plan_meter import MMAP_THRESHOLD, Heap, Meter, emulate_bitsandbytes, file_itemsize, quantised_source_bytes

MiB = 2**20


def test_views_of_existing_tensors_are_not_new_memory():
    layer = nn.Linear(1000, 1000, device="meta").requires_grad_(False)   # its weight.t() is a view
    with Meter() as meter:
        out = layer(torch.zeros(2, 1000, device="meta"))
    assert meter.peak == 2 * 1000 * 4 + 2 * 1000 * 4    # the input, made inside, and the output
    del out


def test_the_trace_pairs_allocations_and_frees_without_gradients():
    weight = nn.Parameter(torch.zeros(64, 64, device="meta"))
    with Meter() as meter:
        hooks = meter.watch_gradients([weight])
        x = torch.zeros(8, 64, device="meta")
        (x @ weight).sum().backward()
        del x
    for hook in hooks:
        hook.remove()
    trace = meter.trace()
    allocated = {serial for serial, size in trace if size is not None}
    assert allocated and {serial for serial, size in trace if size is None} <= allocated
    assert all(size != 64 * 64 * 4 for _, size in trace)    # the gradient is counted on its own
    assert meter.grads and not meter.grads & allocated


def test_large_blocks_are_mapped_and_raise_the_threshold():
    heap = Heap()
    heap.malloc("a", 8 * MiB)              # over the 128 KiB the threshold starts at: mapped
    assert heap.brk == 0 and heap.mapped > 8 * MiB
    heap.free("a")                         # ... returned, and blocks up to its size now use the heap
    assert heap.mapped == 0 and heap.threshold > 8 * MiB
    heap.malloc("b", 8 * MiB)
    assert heap.brk > 8 * MiB and heap.mapped == 0
    heap.malloc("c", MMAP_THRESHOLD)       # at the most the threshold rises to: always mapped
    assert heap.mapped >= MMAP_THRESHOLD


def test_the_heap_keeps_what_it_grew_to_and_reuses_it_best_fit():
    heap = Heap()
    heap.threshold = MMAP_THRESHOLD
    for key, size in (("a", 4 * MiB), ("pin", 1), ("b", 2 * MiB), ("pin2", 1), ("c", 3 * MiB), ("top", 1)):
        heap.malloc(key, size)
    grown = heap.brk
    for key in ("a", "b", "c"):
        heap.free(key)
    assert heap.brk == grown                            # freed, but the process does not shrink
    heap.malloc("d", 2 * MiB)                           # the smallest hole it fits: where b was
    where_b = heap.blocks["pin"][0] + heap.blocks["pin"][1]
    assert heap.blocks["d"][0] == where_b
    heap.free("pin2")                                   # d's, pin2's and c's chunks merge
    heap.free("d")
    heap.malloc("e", 5 * MiB)                           # fits the merged chunk: no growth
    assert heap.blocks["e"][0] == where_b and heap.brk == grown


def test_a_phase_maps_its_large_blocks_on_top_of_the_held_heap():
    heap = Heap()
    heap.threshold = MMAP_THRESHOLD
    step = [(1, 20 * MiB), (2, 20 * MiB), (1, None), (2, None)]         # 40 MiB cut from the heap
    evaluation = [(1, 100 * MiB), (1, None)]                            # one mapped block
    assert heap.replay(step, "step")[0] >= 40 * MiB
    resident, live, own = heap.replay(evaluation, "eval")
    assert resident >= 140 * MiB and live == own == 100 * MiB and heap.mapped == 0


def test_bitsandbytes_layers_allocate_a_dequantised_weight():
    plain = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)).to("meta").requires_grad_(False)
    quantised = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)).to("meta").requires_grad_(False)
    emulate_bitsandbytes(quantised, "int8", "cpu")
    peaks = []
    for model in (plain, quantised):
        with Meter() as meter:
            x = torch.zeros(4, 256, device="meta", requires_grad=True)
            model(x).sum().backward()
            del x
        peaks.append(meter.peak)
    assert peaks[1] >= peaks[0] + 256 * 512 * 4     # a layer's fp32 weight, made while it runs
    cuda = nn.Linear(256, 512).to("meta").requires_grad_(False)
    emulate_bitsandbytes(cuda, "int8", "cuda")      # int8 rows of the input, an int32 product
    with Meter() as meter:
        cuda(torch.zeros(4, 256, device="meta"))
    assert meter.peak >= 4 * 256 * (2 + 1) + 4 * 512 * 4


def test_file_itemsize_reads_the_safetensors_header(tmp_path):
    header = {"a": {"dtype": "BF16", "shape": [1000], "data_offsets": [0, 2000]},
              "b": {"dtype": "F32", "shape": [10], "data_offsets": [2000, 2040]}, "__metadata__": {"format": "pt"}}
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(2040))
    assert file_itemsize(str(tmp_path), None) == 2                       # most bytes are bf16
    assert file_itemsize(str(tmp_path / "none"), types.SimpleNamespace(dtype="bfloat16")) == 2
    assert file_itemsize(str(tmp_path / "none"), types.SimpleNamespace()) == 4
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).requires_grad_(False)
    assert quantised_source_bytes(model, "int8", 2) == 2 * (8 * 16 + 16 * 4)
    assert quantised_source_bytes(model, "fp32", 2) == 0
