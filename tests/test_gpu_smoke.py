"""bench/gpu_smoke.py's dry run on CPU: it runs end to end, the CUDA-only parts say why they were
skipped, and every part that can run on CPU passes (so the script a GPU session runs cannot rot)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CPU_PARTS = {"quantised_lora/int8-bert", "quantised_lora/int8-llama", "quantised_lora/nf4-bert",
             "quantised_lora/nf4-llama", "prefix_autocast", "adapters_int8", "runtime_mixed_slots",
             "train_bundle_eval"}
CUDA_PARTS = {"cuda_build", "plan_vs_reserved", "int8_vs_bf16"}


def test_the_smoke_check_runs_on_cpu_with_the_cuda_parts_skipped(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--steps", "4",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.stdout.strip(), f"the smoke check printed no report (exit {done.returncode}): {done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    written = tmp_path / ("gpu_smoke_cuda.json" if torch.cuda.is_available() else "gpu_smoke_cpu.json")
    assert json.loads(written.read_text()) == report
    parts = {p["name"]: p for p in report["parts"]}
    assert set(parts) == CPU_PARTS | CUDA_PARTS
    assert report["torch"] == torch.__version__ and report["steps"] == 4
    assert report["passed"] + report["failed"] + report["skipped"] == len(parts)
    failed = {n: p.get("error") or p.get("details") for n, p in parts.items() if p["status"] == "failed"}
    assert not failed and done.returncode == 0, failed
    for name in CPU_PARTS:
        assert parts[name]["status"] == "passed" and parts[name]["seconds"] >= 0
    if not torch.cuda.is_available():
        assert report["device"] == "cpu" and report["mixed_precision_auto"] == "no"
        for name in CUDA_PARTS:
            assert parts[name] == {"name": name, "status": "skipped",
                                   "reason": "no CUDA device (torch.cuda.is_available() is False)"}
    lora = parts["quantised_lora/int8-llama"]["details"]
    assert lora["loss_last"] < lora["loss_first"] and lora["lora_B_grads_nonzero"] == lora["lora_B_tensors"] > 0
    recorded = parts["train_bundle_eval"]["details"]["recorded_precision"]
    assert recorded["mixed_precision"] == report["mixed_precision_auto"]
