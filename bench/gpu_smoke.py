"""The five-minute GPU smoke check: does peftmm train and serve right on this CUDA machine?

    .venv/bin/python bench/gpu_smoke.py                  # prints JSON, writes bench/results/gpu_smoke_<device>.json
    .venv/bin/python bench/gpu_smoke.py --out /tmp/x     # elsewhere

Nothing is downloaded: the backbones are tiny ones built from configs (tests/tiny.py), plus the zoo
recipe (recipes/easy-vqa-lora.yaml) when the zoo's cache holds its backbones. Every part runs under
``mixed_precision: auto`` as training picks it on this device (precision.py). The parts:

- ``cuda_build``: torch is a CUDA build, the GPU and what auto picks on it, bitsandbytes' CUDA library
  (an int8 matmul runs on the GPU);
- ``quantised_lora/{int8,nf4}-{bert,llama}``: LoRA on a quantised text tower with gradient
  checkpointing, ``--steps`` steps on one batch: loss finite and falling, LoRA gradients non-zero,
  the quantised tower's output against an fp32 load of the same weights, biases still fp32;
- ``prefix_autocast``: prefix tuning's output under autocast against the same forward without
  (plain fp32), the prefix gradients, and a captioning LM generating with a prefix under autocast;
- ``adapters_int8``: bottleneck adapters in two int8 towers with gated cross-attention, trained;
- ``runtime_mixed_slots``: two bundles on shared towers, one Runtime.predict mixing them against
  each adapter alone and against its own Predictor;
- ``train_bundle_eval``: peftmm.train -> bundle (its recorded precision) -> Predictor.load ->
  evaluate_bundle reproducing the run's test metrics;
- ``plan_vs_reserved`` (CUDA, zoo): ``peftmm plan --device cuda`` against
  torch.cuda.max_memory_reserved of a short run of the zoo recipe;
- ``int8_vs_bf16``: step time and peak memory of LoRA training on a Llama built from a config
  (8 layers, 512 wide: its Linear layers are what int8 quantises), int8 against bf16.

On a machine without CUDA the CUDA-only parts are reported ``skipped`` with the reason and the rest
runs on CPU (where ``auto`` is fp32; the autocast parts use CPU bf16 autocast there), so the script
is exercised by the test suite (tests/test_gpu_smoke.py) and cannot rot. ``--budget`` seconds: a part
that would start after them is skipped. Exit code 1 when any part failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
import tiny  # noqa: E402  (the test suite's tiny backbones, built from configs)

from peftmm import evaluate_bundle, recipe_from_dict, save_bundle, train  # noqa: E402
from peftmm.backbones import load_tower, quiet_libraries  # noqa: E402
from peftmm.batching import Batcher  # noqa: E402
from peftmm.data import load_splits  # noqa: E402
from peftmm.model import MultimodalModel  # noqa: E402
from peftmm.precision import autocast_dtype, device_facts, mixed_precision, record  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FACTS = device_facts(DEVICE)
MIXED = mixed_precision("auto", FACTS)
AUTOCAST = autocast_dtype("auto", FACTS)
# the parts about autocast itself need one: on CPU, CPU bf16 autocast stands in for the GPU's
PROBE_DTYPE = AUTOCAST or torch.bfloat16
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


def _cast(dtype=AUTOCAST):
    return torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None)


def _to(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _steps(model, batch: dict, steps: int, lr: float = 1e-2, dtype=AUTOCAST,
           times: list | None = None) -> tuple[list[float], dict]:
    """Train on one batch under autocast (fp16: with a gradient scaler); the losses, and the
    gradient norm of each trainable tensor after the first backward. ``times``: receives each
    step's seconds (the device synchronised)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scaler = torch.amp.GradScaler(DEVICE, enabled=dtype == torch.float16)
    model.train()
    losses, first = [], {}
    for step in range(steps):
        tick = time.perf_counter()
        with _cast(dtype):
            loss = model.task.loss(model(batch), batch["labels"])
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if step == 0:
            first = {n: (p.grad.norm().item() if p.grad is not None else 0.0)
                     for n, p in model.named_parameters() if p.requires_grad}
        scaler.step(optimizer)
        scaler.update()
        if times is not None:
            torch.cuda.synchronize()
            times.append(time.perf_counter() - tick)
    return losses, first


def _falls(losses: list[float]) -> bool:
    k = max(1, len(losses) // 5)
    return all(map(torch.isfinite, torch.tensor(losses))) and sum(losses[-k:]) / k < sum(losses[:k]) / k


def _biases_fp32(model) -> bool:
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    return bool(layers) and all(m.bias is None or m.bias.dtype == torch.float32 for m in layers)


class Smoke:
    def __init__(self, models: dict, scratch: Path, steps: int, budget: float):
        self.models, self.scratch, self.steps, self.budget = models, scratch, steps, budget
        self.started, self.parts = time.perf_counter(), []
        self.examples = load_splits(recipe_from_dict(tiny.recipe(models["vit"], models["bert"])).data)

    def run(self, name: str, part, cuda_only: bool = False, needs: str | None = None) -> None:
        spent = time.perf_counter() - self.started
        entry = {"name": name}
        if cuda_only and DEVICE != "cuda":
            entry |= {"status": "skipped", "reason": NO_CUDA}
        elif needs:
            entry |= {"status": "skipped", "reason": needs}
        elif spent > self.budget:
            entry |= {"status": "skipped", "reason": f"time budget of {self.budget:.0f} s spent ({spent:.0f} s)"}
        else:
            tick = time.perf_counter()
            try:
                details = part()
                entry |= {"status": "passed" if details.pop("ok") else "failed", "details": details}
            except Exception as error:   # one broken part must not hide the others' results
                entry |= {"status": "failed", "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc().splitlines()[-6:]}
            entry["seconds"] = round(time.perf_counter() - tick, 2)
        print(f"gpu_smoke: {name}: {entry['status']}" + (f" ({entry.get('reason') or entry.get('error')})"
                                                         if entry["status"] != "passed" else ""),
              file=sys.stderr, flush=True)
        self.parts.append(entry)

    def build(self, data: dict, labels=None):
        recipe = recipe_from_dict(data)
        return recipe, MultimodalModel.build(recipe, self.examples.labels if labels is None else labels, device=DEVICE)

    # -- the parts -----------------------------------------------------------------------------
    def cuda_build(self) -> dict:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import lib

        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0).to(DEVICE)
        out = layer(torch.randn(4, 64, device=DEVICE, dtype=torch.float16))
        return {"ok": bool(torch.version.cuda) and type(lib).__name__ == "CudaBNBNativeLibrary"
                and bool(torch.isfinite(out).all()),
                "torch_cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
                "capability": list(FACTS.capability), "auto_mixed_precision": MIXED,
                "bitsandbytes": bnb.__version__, "bitsandbytes_library": type(lib).__name__}

    def quantised_lora(self, precision: str, text: str) -> dict:
        data = tiny.recipe(self.models["vit"], self.models[text], text_methods=[{"type": "lora", "r": 4}])
        data["text"] |= {"precision": precision, "gradient_checkpointing": True}
        _, model = self.build(data)
        batch = _to(Batcher(model)(self.examples.train[:16]))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        reference = load_tower("text", self.models[text], "fp32", device=DEVICE)
        model.eval()
        with torch.no_grad(), _cast():   # LoRA's B starts at zero: the quantised backbone alone
            agreement = _cosine(model.towers["text"](**inputs)[0], reference(**inputs)[0])
        losses, grads = _steps(model, batch, self.steps)
        lora_b = {n: g for n, g in grads.items() if "lora_B" in n}
        return {"ok": _falls(losses) and bool(lora_b) and all(g > 0 for g in lora_b.values())
                and agreement > 0.98 and _biases_fp32(model.towers["text"])
                and bool(model.towers["text"].checkpointed),
                "loss_first": losses[0], "loss_last": losses[-1], "lora_B_tensors": len(lora_b),
                "lora_B_grads_nonzero": sum(g > 0 for g in lora_b.values()),
                "tower_vs_fp32_cosine": round(agreement, 6),
                "checkpointed_blocks": len(model.towers["text"].checkpointed)}

    def prefix_autocast(self) -> dict:
        data = tiny.recipe(self.models["vit"], self.models["llama"], text_methods=[{"type": "prefix", "length": 4}])
        _, model = self.build(data)
        batch = _to(Batcher(model)(self.examples.train[:16]))
        tower = model.towers["text"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        model.eval()
        with torch.no_grad():
            eager = tower(**inputs)[0]
            with _cast(PROBE_DTYPE):
                cast = tower(**inputs)[0]
        losses, grads = _steps(model, batch, max(3, self.steps // 4), dtype=PROBE_DTYPE)
        prefix = {n: g for n, g in grads.items() if "prefix" in n}
        # a captioning LM generating with a prefix under autocast, against the same without
        lm = tiny.build("llama_lm", self.scratch / "llama_lm") if not (self.scratch / "llama_lm").is_dir() \
            else self.scratch / "llama_lm"
        caption = {"name": "smoke-caption", "vision": {"backbone": self.models["mobilenet_v2"]},
                   "text": {"backbone": str(lm), "methods": [{"type": "prefix", "length": 4}], "max_length": 12},
                   "fusion": {"type": "projector", "max_tokens": 4},
                   "task": {"type": "captioning", "prompt": "what is in the image?", "max_new_tokens": 4},
                   "data": {"source": "easy-vqa"}}
        _, captioner = self.build(caption, labels=[])
        captioner.eval()
        images = _to(Batcher(captioner)([{"image": e["image"], "text": None} for e in self.examples.test[:4]]))
        with torch.no_grad():
            plain = captioner.task.decode(captioner(images))
            with _cast(PROBE_DTYPE):
                generated = captioner.task.decode(captioner(images))
        return {"ok": _cosine(cast, eager) > 0.99 and bool(prefix) and all(g > 0 for g in prefix.values())
                and all(map(torch.isfinite, torch.tensor(losses))) and len(generated) == 4
                and all(isinstance(g["caption"], str) for g in generated),
                "autocast": str(PROBE_DTYPE), "prefix_output_vs_eager_cosine": round(_cosine(cast, eager), 6),
                "prefix_grads_nonzero": sum(g > 0 for g in prefix.values()), "prefix_tensors": len(prefix),
                "captions_same_as_fp32": sum(a == b for a, b in zip(plain, generated)), "captions": len(generated)}

    def adapters_int8(self) -> dict:
        data = tiny.recipe(self.models["vit"], self.models["bert"],
                           vision_methods=[{"type": "adapter", "reduction_factor": 4}],
                           text_methods=[{"type": "adapter", "reduction_factor": 4}])
        data["vision"]["precision"] = data["text"]["precision"] = "int8"
        _, model = self.build(data)
        losses, grads = _steps(model, _to(Batcher(model)(self.examples.train[:16])), self.steps)
        adapters = {n: g for n, g in grads.items() if n.startswith("towers.")}
        gates = {n: g for n, g in grads.items() if "gate" in n}
        return {"ok": _falls(losses) and bool(adapters) and any(g > 0 for g in adapters.values())
                and all(_biases_fp32(t) for t in model.towers.values()),
                "fusion": data["fusion"]["type"], "loss_first": losses[0], "loss_last": losses[-1],
                "adapter_tensors": len(adapters), "adapter_grads_nonzero": sum(g > 0 for g in adapters.values()),
                "gate_tensors": len(gates)}

    def runtime_mixed_slots(self) -> dict:
        from peftmm.predict import Predictor
        from peftmm.runtime import Runtime

        folder = self.scratch / "bundles"
        for name, seed, methods in (("a", 1, [{"type": "lora", "r": 2}]), ("b", 2, [{"type": "adapter"}])):
            torch.manual_seed(seed)
            recipe, model = self.build(tiny.recipe(self.models["vit"], self.models["bert"], text_methods=methods))
            _steps(model, _to(Batcher(model)(self.examples.train[:16])), 4, lr=3e-2)
            save_bundle(model, recipe, folder / name, {}, precision=record(MIXED, FACTS))
        runtime = Runtime(device=DEVICE, root=folder)
        for name in ("a", "b"):
            runtime.register(name)
        pairs = [{"image": e["image"], "text": e["text"]} for e in self.examples.test[:6]]
        mixed = runtime.predict([{"adapter": "ab"[i % 2], **p} for i, p in enumerate(pairs)])
        alone = {n: runtime.predict([{"adapter": n, **p} for p in pairs]) for n in "ab"}
        own = {n: Predictor.load(folder / n, device=DEVICE).predict_batch(pairs) for n in "ab"}
        worst = 0.0
        for i, row in enumerate(mixed):
            for other in (alone["ab"[i % 2]][i], own["ab"[i % 2]][i]):
                if row["answer"] != other["answer"]:
                    worst = float("inf")
                worst = max([worst] + [abs(x["score"] - y["score"]) for x, y in zip(row["scores"], other["scores"])])
        return {"ok": worst <= (1e-4 if AUTOCAST is None else 2e-2), "requests": len(pairs),
                "max_score_difference": worst}

    def train_bundle_eval(self) -> dict:
        data = tiny.recipe(self.models["mobilenet_v2"], self.models["bert"], text_methods=[{"type": "lora", "r": 2}],
                           train={"max_steps": max(6, self.steps // 2), "eval_batch_size": 32})
        recipe = recipe_from_dict(data)
        result = train(recipe, self.scratch / "run", progress=False, log=lambda *a, **k: None)
        config = json.loads((result.bundle_dir / "adapter_config.json").read_text())
        again = evaluate_bundle(result.bundle_dir, "test", batch_size=32, progress=False, device=DEVICE)
        loss_diff = abs(again["loss"] - result.metrics["test_loss"])
        accuracy_diff = abs(again["accuracy"] - result.metrics["test_accuracy"])
        exact = AUTOCAST is None
        return {"ok": config.get("precision") == record(MIXED, FACTS) and accuracy_diff <= (0 if exact else 1 / 32)
                and loss_diff <= (1e-5 if exact else 1e-2),
                "recorded_precision": config.get("precision"), "test_accuracy_run": result.metrics["test_accuracy"],
                "test_accuracy_eval": again["accuracy"], "test_loss_difference": loss_diff}

    def plan_vs_reserved(self) -> dict:
        import peftmm
        from peftmm.plan import Planner

        overrides = ["train.max_steps=20", "train.epochs=1", "data.max_train_samples=2560",
                     "data.max_eval_samples=256"]
        recipe = peftmm.load_recipe(ROOT / "recipes" / "easy-vqa-lora.yaml", overrides)
        estimate = Planner(recipe).estimate(device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        train(recipe, self.scratch / "zoo-run", progress=False, log=lambda *a, **k: None)
        reserved = torch.cuda.max_memory_reserved()
        ratio = estimate.total / reserved
        return {"ok": abs(ratio - 1) <= 0.25, "planned_bytes": estimate.total, "max_memory_reserved": reserved,
                "planned_over_reserved": round(ratio, 3)}

    def int8_vs_bf16(self) -> dict:
        from gpu_bench import quantised_layers

        folder = _mid_llama(self.scratch / "llama-mid", Path(self.models["llama"]))
        rows = {}
        for precision in ("int8", "bf16"):
            data = tiny.recipe(self.models["mobilenet_v2"], str(folder),
                               text_methods=[{"type": "lora", "r": 8, "targets": ["q_proj", "v_proj"]}],
                               train={"batch_size": 64})
            data["vision"]["precision"], data["text"]["precision"] = "bf16", precision
            data["text"]["max_length"] = 32
            recipe, model = self.build(data)
            batch = _to(Batcher(model)(self.examples.train[:64]))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times: list[float] = []
            losses, _ = _steps(model, batch, self.steps, times=times)
            rows[precision] = {"median_step_ms": round(1000 * statistics.median(times[3:] or times), 2),
                               "loss_first": losses[0], "loss_last": losses[-1],
                               "max_memory_allocated": torch.cuda.max_memory_allocated(),
                               "quantised_linear_layers": quantised_layers(recipe).get("text", 0)}
            del model
            torch.cuda.empty_cache()
        return {"ok": rows["int8"]["quantised_linear_layers"] > 0
                and all(_falls([r["loss_first"], r["loss_last"]]) for r in rows.values()), **rows}


def _mid_llama(folder: Path, tokenizer_from: Path) -> Path:
    """A Llama of 8 layers, 512 wide, from a config (its tokenizer: the tiny one's)."""
    import shutil

    import transformers as tf

    if not folder.is_dir():
        torch.manual_seed(0)
        tf.LlamaModel(tf.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
                      ).save_pretrained(folder)
        for item in tokenizer_from.iterdir():
            if not item.name.startswith(("model", "config")):
                shutil.copy(item, folder / item.name)
    return folder


def zoo_missing() -> str | None:
    from peftmm import zoo

    absent = [n for n in ("mobilenet-v2", "minilm-l6") if not zoo.is_cached(n)]
    return f"the zoo's cache lacks {', '.join(absent)} (nothing is downloaded here)" if absent else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per part (default 20)")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds after which no part starts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    quiet_libraries()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as scratch:
        scratch = Path(scratch)
        models = {kind: str(tiny.build(kind, scratch / kind)) for kind in ("vit", "mobilenet_v2", "bert", "llama")}
        smoke = Smoke(models, scratch, args.steps, args.budget)
        smoke.run("cuda_build", smoke.cuda_build, cuda_only=True)
        for precision in ("int8", "nf4"):
            for text in ("bert", "llama"):
                smoke.run(f"quantised_lora/{precision}-{text}", lambda p=precision, t=text: smoke.quantised_lora(p, t))
        smoke.run("prefix_autocast", smoke.prefix_autocast)
        smoke.run("adapters_int8", smoke.adapters_int8)
        smoke.run("runtime_mixed_slots", smoke.runtime_mixed_slots)
        smoke.run("train_bundle_eval", smoke.train_bundle_eval)
        smoke.run("plan_vs_reserved", smoke.plan_vs_reserved, cuda_only=True, needs=zoo_missing())
        smoke.run("int8_vs_bf16", smoke.int8_vs_bf16, cuda_only=True)
    import bitsandbytes

    counts = {s: sum(p["status"] == s for p in smoke.parts) for s in ("passed", "failed", "skipped")}
    report = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
              "mixed_precision_auto": MIXED, "steps": args.steps, **counts,
              "total_seconds": round(time.perf_counter() - started, 1), "parts": smoke.parts}
    text = json.dumps(report, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_smoke_{'cuda' if DEVICE == 'cuda' else 'cpu'}.json").write_text(text + "\n")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
