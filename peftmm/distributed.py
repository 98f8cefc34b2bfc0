"""Several processes that train as one: what peftmm adds on top of HF accelerate.

peftmm has no distributed layer of its own. ``accelerate launch -m peftmm train RECIPE`` (or
``peftmm train --num-processes N``, which calls the same launcher) starts the processes and
accelerate wraps the model in DDP (or FSDP / DeepSpeed, as its config says). Three things make N
processes give the result of one:

* The global batch stays ``train.batch_size``. Every process draws the same batches from the
  same seeded sampler and trains on its own contiguous slice of each (:class:`ProcessSlices`),
  instead of accelerate's default of N whole batches per step (N times the batch, N times fewer
  steps, so another learning-rate schedule).
* The loss is the global batch's (:func:`batch_loss`). DDP averages the processes' gradients;
  a per-example (or per-token) mean is rescaled by the share of examples (tokens) a process
  holds, so the average is the gradient of the whole batch's mean even for unequal slices. A
  contrastive loss, where every example is every other one's negative, is computed over the
  whole batch's outputs, gathered with gradient (:func:`gather_rows`), on every process.
* Frozen weights and buffers are left out of DDP's synchronisation (:func:`ignore_frozen`):
  every process loads the same files, and int8 weights cannot be broadcast as parameters.

Evaluation shards the examples and gathers the outputs (trainer.evaluate). Only the main
process writes (checkpoints, metrics.jsonl, the bundle, plots) and shows progress.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from .errors import PeftmmError
from .precision import device_facts, mixed_precision

MAX_DIMS = 8    # gather_rows: tensors of at most this many dimensions
ERRORS_ENV = "PEFTMM_LAUNCH_ERRORS"   # relaunch's folder where processes leave their error


def process_slice(items: list, num_processes: int, index: int) -> list:
    """Process ``index``'s contiguous share of ``items``; shares differ in size by one at most."""
    base, extra = divmod(len(items), num_processes)
    start = index * base + min(index, extra)
    return items[start: start + base + (index < extra)]


class ProcessSlices(torch.utils.data.Sampler):
    """A batch sampler that yields this process's slice of each batch of ``batches``."""

    def __init__(self, batches, num_processes: int, index: int):
        self.batches, self.num_processes, self.index = batches, num_processes, index
        self.batch_size = getattr(batches, "batch_size", None)

    def __iter__(self):
        for batch in self.batches:
            yield process_slice(list(batch), self.num_processes, self.index)

    def __len__(self) -> int:
        return len(self.batches)


def gather_rows(tensor: torch.Tensor, accelerator, grad: bool = False) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in process order; row counts may
    differ, and a process with no rows may pass an empty tensor of any shape (of the same dtype).
    ``grad``: gradients flow back to each process's own rows (all_gather's backward sums what
    every process computed for them)."""
    if accelerator.num_processes == 1:
        return tensor
    tensor = tensor.to(accelerator.device)      # NCCL gathers on the GPU only
    shape = torch.zeros(MAX_DIMS + 1, dtype=torch.long, device=tensor.device)
    shape[0], shape[1: tensor.dim() + 1] = tensor.dim(), torch.tensor(tensor.shape)
    shapes = accelerator.gather(shape).view(-1, MAX_DIMS + 1).tolist()
    sizes = [s[1] if s[0] else 0 for s in shapes]
    row = next((s[2: s[0] + 1] for s in shapes if s[0] and s[1]), list(tensor.shape[1:]))
    if not tensor.numel():
        tensor = tensor.reshape(0, *row)
    padded = torch.cat([tensor, tensor.new_zeros((max(sizes) - tensor.shape[0], *row))])
    parts = _GatherWithGrad.apply(padded) if grad else _all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (same shape everywhere), stacked in process order."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the gradient of its own rows, summed over
    the processes (each computed the whole loss from everyone's rows)."""

    @staticmethod
    def forward(ctx, tensor):
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def batch_loss(task, outputs: torch.Tensor, targets: torch.Tensor, accelerator) -> tuple[torch.Tensor, float]:
    """The loss to backpropagate on this process, and the global batch's loss to log."""
    if accelerator.num_processes == 1:
        loss = task.loss(outputs, targets)
        return loss, loss.item()
    if task.loss_spans_batch:
        loss = task.loss(gather_rows(outputs, accelerator, grad=True), gather_rows(targets, accelerator))
        return loss, loss.item()     # the same on every process
    units = torch.as_tensor(task.loss_units(targets), dtype=torch.float32, device=outputs.device)
    total = accelerator.reduce(units.clone(), "sum")
    loss = task.loss(outputs, targets) * (units * accelerator.num_processes / total.clamp(min=1))
    return loss, accelerator.reduce(loss.detach().clone(), "mean").item()


def ignore_frozen(model: torch.nn.Module) -> None:
    """Keep DDP from broadcasting and bucketing what does not train (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)


def check_engine(accelerator) -> None:
    """DDP (multi-GPU, or gloo on CPU) is what peftmm trains under. Sharded engines are refused
    before any step: bundles, checkpoints and best-epoch copies read the trainable tensors and the
    optimizer state on the main process, which under FSDP or DeepSpeed ZeRO hold only its shard.
    (For frozen int8 backbones they would not save memory either: bitsandbytes' int8 weights
    cannot be flattened into sharded parameters and stay whole on every GPU; see the README.)"""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise PeftmmError(f"accelerate is configured for {kind.value}, which peftmm does not train under yet "
                          "(it would save only the main process's shard of the adapters); launch with a "
                          "multi-GPU DDP config instead (`accelerate launch --multi_gpu` or "
                          "`peftmm train --num-processes N`)")


def make_accelerator(spec, logging_dir=None):
    """accelerate's Accelerator for the recipe's train section (``spec``): its precision
    (``auto``: precision.mixed_precision) and accumulation, processes sharing each batch, and
    the trackers of ``spec.report_to`` (trackers.py) logging under ``logging_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    facts = device_facts()
    mixed = mixed_precision(spec.mixed_precision, facts)   # precision.py: bf16 only where native
    if facts.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 for whatever runs in fp32
    # split_batches: processes share each batch (ProcessSlices), so the scheduler steps once per step
    report_to = list(spec.report_to)
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=spec.grad_accum,
                       dataloader_config=DataLoaderConfiguration(split_batches=True),
                       log_with=report_to or None,
                       project_dir=str(logging_dir) if report_to and logging_dir is not None else None)


def prepare_for_training(accelerator, model, optimizer, loader, scheduler):
    """DDP (or what accelerate's config says) around the model; the loader is only wrapped for
    device placement and accumulation bookkeeping: it already yields this process's slices."""
    from accelerate.data_loader import prepare_data_loader

    check_engine(accelerator)
    if accelerator.num_processes > 1:
        ignore_frozen(model)
    # Backbones were loaded on the right device already (bitsandbytes weights must not be moved).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler,
                                                      device_placement=[False, True, True])
    loader = prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                 put_on_device=True, rng_types=None)
    return model, optimizer, loader, scheduler


def all_have_examples(batch: dict, accelerator) -> bool:
    """Whether to step on this batch. Under several processes they must agree, or the ones that
    step would wait for the others' gradients forever: a batch left empty on one skips all."""
    if accelerator.num_processes == 1:
        return bool(batch)
    flag = torch.tensor([1.0 if batch else 0.0], device=accelerator.device)
    return accelerator.gather(flag).min().item() > 0


def hand_error_to_launcher(message: str) -> bool:
    """In a process started by :func:`relaunch`: leave ``message`` for it to print (once, however
    many processes hit the same error). False elsewhere: the caller prints it."""
    folder = os.environ.get(ERRORS_ENV)
    if not (folder and launched()):
        return False
    path = Path(folder) / f"{os.environ.get('RANK', '0')}.txt"
    path.write_text(message)
    return True


def launched() -> bool:
    """Whether this process is one of several started by a launcher (torchrun, accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(num_processes: int, args: list[str]) -> int:
    """Run ``peftmm <args>`` in ``num_processes`` processes on this machine, through torch's
    elastic launcher (what ``torchrun`` and ``accelerate launch --multi_gpu`` use): one process
    per GPU on a CUDA machine, gloo on CPU otherwise. Their exit status, 0 when all succeeded;
    a failure is reported by the failing process itself (peftmm's one-line errors), not by a
    launcher traceback."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if torch.cuda.is_available():
        if num_processes > torch.cuda.device_count():
            raise PeftmmError(f"--num-processes {num_processes}: this machine has {torch.cuda.device_count()} "
                              "GPU(s); start at most one process per GPU")
    else:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        # a share of the cores each: several threads per process would spin against each other
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # the failures are ours to say
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    with tempfile.TemporaryDirectory(prefix="peftmm-errors-") as errors:
        os.environ[ERRORS_ENV] = errors
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "peftmm", *args)
            return 0
        except ChildFailedError as failed:
            codes = [f.exitcode for f in failed.failures.values()]
            messages = [p.read_text() for p in sorted(Path(errors).glob("*.txt"), key=lambda p: int(p.stem))]
            for message in dict.fromkeys(messages):
                print(f"error: {message}", file=sys.stderr)
            if not messages:   # killed, or an error that is not peftmm's: it printed its own traceback
                print(f"error: {len(failed.failures)} of {num_processes} training processes failed "
                      f"(exit status {codes[0]})", file=sys.stderr)
            return next((c for c in codes if c and c > 0), 1)
