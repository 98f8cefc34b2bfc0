"""Several processes train as one (peftmm/distributed.py), on this CPU machine with gloo:

* the loss each process backpropagates, averaged over processes as DDP does, has the gradient of
  the whole batch's loss (per-example means, per-token means, and the contrastive loss that needs
  every example's outputs), for uneven slices too;
* `peftmm train --num-processes 2` gives the weights and metrics of a 1-process run with the same
  recipe (global batch, seed) within TOLERANCE, only one process writes, and a 2-process run
  resumed from its epoch-1 checkpoint ends bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
import yaml

from peftmm.bundle import read_tensors
from peftmm.distributed import ProcessSlices, process_slice

ROOT = Path(__file__).resolve().parent.parent
# Float sums run in another order on two processes (half-batch matmuls, gradient all-reduce), so
# the runs are not bit-identical. Measured on these runs (12 steps, lr 1e-3): 1.2e-7 (VQA) and
# 6e-8 (retrieval) at most; a sharding or weighting bug is 1e-3 and more. AdamW can carry such
# noise much further (it scales tiny gradients up: a zero-initialised gate at lr 5e-3 took it to
# 2e-2 in 12 steps), which is why these recipes use a concat-mlp fusion and a small lr.
TOLERANCE = 1e-5


def test_process_slices_cover_each_batch_once():
    for size in (1, 7, 16):
        for processes in (2, 3):
            slices = [process_slice(list(range(size)), processes, i) for i in range(processes)]
            assert sum(slices, []) == list(range(size))          # in order, nothing twice
            assert max(map(len, slices)) - min(map(len, slices)) <= 1
    batches = [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert list(ProcessSlices(batches, 2, 0)) == [[0, 1], [3, 4, 5]]
    assert list(ProcessSlices(batches, 2, 1)) == [[2], [6, 7]] and len(ProcessSlices(batches, 2, 1)) == 2


# ---- gradients: one process of a gloo group (spawned), then the whole batch in the parent ----

def _task(kind: str):
    from peftmm.tasks.captioning import IGNORE, CaptioningTask
    from peftmm.tasks.retrieval import RetrievalTask
    from peftmm.tasks.vqa import VQATask

    task = {"vqa": VQATask, "retrieval": RetrievalTask, "captioning": CaptioningTask}[kind]
    return task(task.Config(), ["a", "b", "c"]), IGNORE


def _problem(kind: str, rows: int = 7):
    """A linear layer and a batch whose loss is the task's: (layer, inputs, targets)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 6)
    if kind == "captioning":    # [B, T, vocab] logits; labels with ignored positions, uneven per row
        inputs = torch.randn(rows, 4, 5)
        _, ignore = _task(kind)
        targets = torch.randint(0, 6, (rows, 4))
        targets[torch.rand(rows, 4) < 0.4] = ignore
    else:
        inputs = torch.randn(rows, 5)
        targets = torch.randint(0, 3, (rows,)) if kind == "vqa" else torch.arange(rows)
    return layer, inputs, targets


def _outputs(kind, layer, inputs):
    out = layer(inputs)
    if kind == "retrieval":     # L2-normalised image and text halves, as dual-projection gives
        out = torch.cat([torch.nn.functional.normalize(h, dim=-1) for h in out.split(3, -1)], -1) * 3.0
    return out


def _gradient_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
    from accelerate import Accelerator

    from peftmm.distributed import batch_loss

    accelerator = Accelerator()
    results = {}
    for kind in ("vqa", "captioning", "retrieval"):
        layer, inputs, targets = _problem(kind)
        mine = torch.tensor(process_slice(list(range(len(inputs))), world, rank))
        loss, logged = batch_loss(_task(kind)[0], _outputs(kind, layer, inputs[mine]), targets[mine], accelerator)
        loss.backward()
        for p in layer.parameters():  # what DDP does with the gradients
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        results[kind] = {"logged": logged, "grads": [p.grad.tolist() for p in layer.parameters()]}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()     # neither process tears the group down while the other still uses it
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_losses_have_the_whole_batch_gradient(tmp_path):
    out = tmp_path / "grads.json"
    torch.multiprocessing.start_processes(_gradient_worker, args=(2, _free_port(), str(out)), nprocs=2,
                                          start_method="spawn")
    results = json.loads(out.read_text())
    for kind in ("vqa", "captioning", "retrieval"):
        layer, inputs, targets = _problem(kind)
        loss = _task(kind)[0].loss(_outputs(kind, layer, inputs), targets)
        loss.backward()
        assert results[kind]["logged"] == pytest.approx(loss.item(), abs=1e-6), kind
        for expected, got in zip(layer.parameters(), results[kind]["grads"]):
            assert torch.allclose(torch.tensor(got), expected.grad, atol=1e-6), kind
        # the plain per-process mean (no reweighting, no gathering) would not have matched
        assert kind == "vqa" or not torch.allclose(torch.tensor(results[kind]["grads"][0]),
                                                   _local_mean_grad(kind), atol=1e-4)


def _local_mean_grad(kind: str) -> torch.Tensor:
    """The weight gradient DDP would average from each half's own loss."""
    grads = []
    for rank in range(2):
        layer, inputs, targets = _problem(kind)
        mine = torch.tensor(process_slice(list(range(len(inputs))), 2, rank))
        _task(kind)[0].loss(_outputs(kind, layer, inputs[mine]), targets[mine]).backward()
        grads.append(layer.weight.grad)
    return sum(grads) / 2


# ---- whole runs through the CLI ----

@pytest.fixture(scope="module")
def recipes(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Tiny runs: VQA (per-example loss) with adapters in an uncached vision tower and LoRA in the
    text tower; retrieval (contrastive) with LoRA in the text tower and cached vision features."""
    root = tmp_path_factory.mktemp("distributed-recipes")
    train = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.0, "seed": 3, "patience": 5}
    vqa = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                      vision_methods=[{"type": "adapter", "reduction_factor": 4}],
                      text_methods=[{"type": "lora", "r": 2}], train=train)
    vqa["fusion"] = {"type": "concat-mlp", "dim": 32, "dropout": 0.0}   # no random draws per example
    vqa["vision"]["cache_features"] = False
    retrieval = tiny.recipe(tiny_models["vit"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}],
                            train=train)      # the vision tower frozen: its features cached
    retrieval["task"], retrieval["fusion"] = {"type": "retrieval"}, {"type": "dual-projection", "dim": 16}
    paths = {}
    for name, data in (("vqa", vqa), ("retrieval", retrieval)):
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(data))
    return paths


def _train(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "peftmm", "train", *args, "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)      # one JSON document: only the main process printed


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_two_processes_train_like_one(recipes, tmp_path, task):
    one = _train([str(recipes[task]), "--output", str(tmp_path / "one")])
    two = _train([str(recipes[task]), "--output", str(tmp_path / "two"), "--num-processes", "2"])
    a, b = read_tensors(tmp_path / "one" / "bundle"), read_tensors(tmp_path / "two" / "bundle")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
    for key, value in one.items():
        if key.startswith(("test_", "val_")) and isinstance(value, float):
            assert two[key] == pytest.approx(value, abs=1e-3), key
    assert {k: two[k] for k in ("steps", "best_epoch", "test_examples")} == \
        {k: one[k] for k in ("steps", "best_epoch", "test_examples")}
    # one writer: as many records as the 1-process run, each logged loss the whole batch's
    first, second = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(first) == len(second)
    losses = [(r["loss"], s["loss"]) for r, s in zip(first, second) if "loss" in r]
    assert losses[0][0] == pytest.approx(losses[0][1], abs=1e-5)


def test_two_process_run_resumes_bit_identical(recipes, tmp_path):
    whole = tmp_path / "whole"
    _train([str(recipes["vqa"]), "--output", str(whole), "--num-processes", "2"])
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    pointer = json.loads((resumed / "checkpoints" / "latest.json").read_text())
    # the last checkpoint damaged: resuming falls back to the one at the end of epoch 1
    (resumed / "checkpoints" / pointer["checkpoint"] / "state.json").write_text("{")
    shutil.rmtree(resumed / "bundle")
    metrics = _train(["--resume", str(resumed), "--num-processes", "2"])
    assert metrics["steps"] == 12
    a, b = read_tensors(whole / "bundle"), read_tensors(resumed / "bundle")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda rs: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rs if "final" not in r]  # noqa: E731
    assert drop(_records(resumed)) == drop(_records(whole))


def test_sharded_engines_are_refused_before_training():
    from accelerate.utils import DistributedType

    from peftmm.distributed import check_engine
    from peftmm.errors import PeftmmError

    class Configured:
        def __init__(self, kind):
            self.distributed_type = kind

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(PeftmmError, match=f"configured for {kind.value}.*multi-GPU DDP"):
            check_engine(Configured(kind))
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_engine(Configured(kind))


def test_an_error_in_the_processes_is_one_line(recipes, tmp_path):
    """Both processes fail on the same bad input: the launcher prints it once, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "peftmm", "train", str(recipes["vqa"]), "--set",
                           f"init_from={tmp_path / 'missing'}", "--output", str(tmp_path / "run"),
                           "--num-processes", "2", "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no adapter bundle here" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_documented_launch_configs_are_accelerate_ddp_configs(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(path)
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_processes > 1
