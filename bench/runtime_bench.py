"""Multi-adapter runtime: swap latency, memory per adapter, unmerged against merged LoRA.

    .venv/bin/python bench/runtime_bench.py                 # bundles under adapters/, writes bench/results/runtime.*
    .venv/bin/python bench/runtime_bench.py --quick         # fewer repetitions

Measured in one process, side by side:
- swap: the switch itself (``Runtime.activate``: make another adapter act), single-request
  latency with the adapter alternating on every call against the same adapter every call, and
  a cold start (backbones plus adapter loaded from disk, ``Predictor.load``) for the ratio;
- memory: resident set size after registering each of 10 adapters (copies of the shipped
  bundles under new names) against the bytes of their files;
- merge: a batch through a LoRA bundle with the adapter unmerged and merged into fp32 backbones
  (int8 weights cannot take a merge), for the shipped recipe and for LoRA on every linear layer.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peftmm.backbones import quiet_libraries  # noqa: E402
from peftmm.bundle import read_config, read_tensors  # noqa: E402
from peftmm.model import MultimodalModel  # noqa: E402
from peftmm.predict import Predictor  # noqa: E402
from peftmm.recipe import from_dict  # noqa: E402
from peftmm.runtime import Runtime  # noqa: E402


def rss_bytes() -> int:
    """Resident set size after handing freed heap back to the OS (else freed load-time buffers
    get reused and hide what an adapter really keeps)."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def parameter_bytes(runtime) -> int:
    """Bytes of every tensor the runtime holds: backbones, injected modules, fusions and heads."""
    seen, total = set(), 0
    modules = list(runtime._towers.values()) + [m for e in runtime._adapters.values()
                                                for m in (e.model.fusion, e.model.head)]
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "n": len(ordered)}


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def examples(n: int) -> list[dict]:
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [{"image": paths[image_ids[i]], "text": questions[i]} for i in range(n)]


def bench_swap(bundles: list[Path], repeat: int) -> dict:
    runtime = Runtime(device="cpu", root=bundles[0].parent)
    for path in bundles:
        runtime.register(path.name)
    names = runtime.names()
    request = examples(1)[0]
    for name in names:  # warm up every adapter once
        runtime.predict([{"adapter": name, **request}])
    switch = []
    for i in range(repeat * 20):
        name = names[i % len(names)]
        start = time.perf_counter()
        runtime.activate(name)
        switch.append(time.perf_counter() - start)
    same = timed(lambda: runtime.predict([{"adapter": names[0], **request}]), repeat)
    cycle = iter(range(10 ** 9))
    alternating = timed(lambda: runtime.predict([{"adapter": names[next(cycle) % len(names)], **request}]), repeat)
    cold = []
    for i in range(max(3, repeat // 10)):
        gc.collect()
        start = time.perf_counter()
        Predictor.load(bundles[i % len(bundles)], device="cpu").predict(request["image"], request["text"])
        cold.append(time.perf_counter() - start)
    result = {"adapters": names, "switch_s": summary(switch), "request_same_adapter_s": summary(same),
              "request_alternating_adapters_s": summary(alternating), "cold_load_and_predict_s": summary(cold)}
    result["cold_over_switch"] = result["cold_load_and_predict_s"]["median"] / result["switch_s"]["median"]
    result["alternating_over_same"] = (result["request_alternating_adapters_s"]["median"]
                                       / result["request_same_adapter_s"]["median"])
    return result


def bench_memory(bundles: list[Path], count: int = 10) -> dict:
    runtime = Runtime(device="cpu", root=bundles[0].parent)
    runtime.register(bundles[0].name, name="base")  # backbones loaded and warmed before the baseline
    runtime.predict([{"adapter": "base", **examples(1)[0]}])
    rows = []
    previous, previous_tensors = rss_bytes(), parameter_bytes(runtime)
    for i in range(count):
        path = bundles[i % len(bundles)]
        runtime.register(path.name, name=f"copy-{i}")
        now, tensors = rss_bytes(), parameter_bytes(runtime)
        rows.append({"adapter": f"copy-{i}", "bundle": path.name,
                     "file_bytes": (path / "adapter_model.safetensors").stat().st_size,
                     "rss_growth_bytes": now - previous, "tensor_growth_bytes": tensors - previous_tensors})
        previous, previous_tensors = now, tensors
    return {"per_adapter": rows,
            "median_rss_growth_bytes": statistics.median(r["rss_growth_bytes"] for r in rows),
            "total_rss_growth_bytes": sum(r["rss_growth_bytes"] for r in rows),
            "total_tensor_growth_bytes": sum(r["tensor_growth_bytes"] for r in rows),
            "total_file_bytes": sum(r["file_bytes"] for r in rows)}


def fp32_model(bundle: Path, lora: dict | None = None):
    """The bundle's model on fp32 backbones (same weights: same fingerprints). With ``lora``,
    the text tower's LoRA is replaced by that config, randomly initialised (a heavier adapter)."""
    config = read_config(bundle)
    data = config["recipe"]
    for tower in ("vision", "text"):
        data[tower]["precision"] = "fp32"
    if lora is not None:
        data["text"]["methods"] = [lora]
    model = MultimodalModel.build(from_dict(data), config["labels"])
    if lora is None:
        model.load_trainable_state_dict(read_tensors(bundle))
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return model.eval()


def bench_merge(bundle: Path, repeat: int, batch_size: int = 32) -> list[dict]:
    from peftmm.batching import Batcher

    rows = []
    variants = {"shipped recipe (r=4 on query, value)": None,
                "r=16 on every linear layer": {"type": "lora", "r": 16, "alpha": 32,
                                               "targets": ["query", "key", "value", "dense"]}}
    for label, lora in variants.items():
        model = fp32_model(bundle, lora)
        batch = Batcher(model)(examples(batch_size))
        with torch.no_grad():
            run = lambda model=model, batch=batch: model(batch)  # noqa: E731
            run()
            unmerged_logits = run()
            unmerged = timed(run, repeat)
            model.merge_methods()
            run()
            merged_logits = run()
            merged = timed(run, repeat)
        rows.append({"variant": label, "batch_size": batch_size, "unmerged_s": summary(unmerged),
                     "merged_s": summary(merged),
                     "ratio": statistics.median(unmerged) / statistics.median(merged),
                     "max_logit_diff": (unmerged_logits - merged_logits).abs().max().item()})
    return rows


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    swap = result["swap"]
    labels = ["switch", "request\nsame adapter", "request\nalternating", "cold load\n+ predict"]
    keys = ["switch_s", "request_same_adapter_s", "request_alternating_adapters_s", "cold_load_and_predict_s"]
    values = [swap[k]["median"] * 1000 for k in keys]
    axes[0].bar(labels, values, color=["#2a9d8f", "#457b9d", "#1d3557", "#e76f51"])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median ms (log)")
    axes[0].set_title(f"swap: cold / switch = {swap['cold_over_switch']:,.0f}x")
    for i, v in enumerate(values):
        axes[0].text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    memory = result["memory"]["per_adapter"]
    x = range(1, len(memory) + 1)
    axes[1].bar([i - 0.2 for i in x], [r["file_bytes"] / 2 ** 20 for r in memory], 0.4, label="file MiB")
    axes[1].bar([i + 0.2 for i in x], [r["rss_growth_bytes"] / 2 ** 20 for r in memory], 0.4, label="RSS growth MiB")
    axes[1].plot(list(x), [r["tensor_growth_bytes"] / 2 ** 20 for r in memory], "k.", label="tensor bytes MiB")
    axes[1].set_xlabel("adapter registered")
    axes[1].set_title("memory per registered adapter")
    axes[1].legend()
    merge = result["merge"]
    names = [r["variant"] for r in merge]
    axes[2].bar([i - 0.2 for i in range(len(merge))], [r["unmerged_s"]["median"] * 1000 for r in merge], 0.4,
                label="unmerged")
    axes[2].bar([i + 0.2 for i in range(len(merge))], [r["merged_s"]["median"] * 1000 for r in merge], 0.4,
                label="merged")
    axes[2].set_xticks(range(len(merge)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    axes[2].set_ylabel(f"median ms per batch of {merge[0]['batch_size']}")
    axes[2].set_title("LoRA unmerged vs merged: " + ", ".join(f"{r['ratio']:.2f}x" for r in merge))
    axes[2].legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, default=ROOT / "adapters")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    bundles = sorted(p for p in args.adapters.iterdir() if (p / "peftmm_config.json").is_file())
    lora = next(p for p in bundles if "lora" in p.name)
    repeat = 20 if args.quick else 100
    result = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
              "swap": bench_swap(bundles, repeat),
              "memory": bench_memory(bundles),
              "merge": bench_merge(lora, max(5, repeat // 5))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, args.out / "runtime.png")
    print(json.dumps({"switch_median_us": result["swap"]["switch_s"]["median"] * 1e6,
                      "switch_p95_us": result["swap"]["switch_s"]["p95"] * 1e6,
                      "cold_over_switch": round(result["swap"]["cold_over_switch"]),
                      "memory_median_rss_growth_bytes": result["memory"]["median_rss_growth_bytes"],
                      "merge_ratios": [round(r["ratio"], 3) for r in result["merge"]]}, indent=2))


if __name__ == "__main__":
    main()
