"""A parquet data set several times larger than the training process's peak RSS trains.

Writes ``--images`` random-noise PNGs (``--size`` px a side, so they do not compress) embedded
in one parquet file. A first process has ``datasets`` convert it to its Arrow cache (what the
first load of a data file does; measured apart, see below); a second one trains on it
(``data.source: hf``): tiny random MobileNetV2 + BERT built from configs, the vision tower
frozen, so its feature cache reads every train and val image once, besides the load-time pass
that hashes every image. Each child samples its own ``/proc/self/status`` (VmRSS, RssAnon,
RssFile) every 0.1 s and reports ``ru_maxrss``.

The conversion is measured apart because it is ``datasets``' own (pyarrow reads the parquet
file, datasets writes Arrow): with pyarrow's default pre-buffering it peaked at 4.26 GB for a
3.54 GB file; data/hf.py turns pre-buffering off, and it peaks at 0.90 GB. A Hub data set or a
``save_to_disk`` folder is Arrow already and skips it.

    PYTHONPATH=. python bench/hf_larger_than_memory.py            # ~3.5 GB of parquet, ~8 minutes
    PYTHONPATH=. python bench/hf_larger_than_memory.py --images 600 --size 256   # quick look

Writes bench/results/hf_memory.json: bytes on disk (the parquet and the Arrow cache ``datasets``
converts it to) against the peak RSS. The work folder is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SAMPLER = r"""
import json, resource, sys, threading, time

peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            name, _, value = line.partition(":")
            if name in peaks:
                peaks[name] = max(peaks[name], int(value.split()[0]) * 1024)
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
def peaks_now():
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_sampled_bytes": dict(peaks)}
"""

CONVERT = SAMPLER + r"""
from peftmm.data.hf import open_dataset
started = time.perf_counter()
open_dataset(sys.argv[1])
time.sleep(0.2)
print(json.dumps({**peaks_now(), "seconds": round(time.perf_counter() - started, 1)}))
"""

CHILD = SAMPLER + r"""
from peftmm import recipe_from_dict
from peftmm.trainer import train
recipe = json.loads(sys.argv[1])
started = time.perf_counter()
result = train(recipe_from_dict(recipe), sys.argv[2], progress=False, log=lambda m: print(m, file=sys.stderr))
time.sleep(0.2)
print(json.dumps({**peaks_now(), "seconds": round(time.perf_counter() - started, 1),
                  "steps": result.metrics["steps"], "test_examples": result.metrics["test_examples"],
                  "train_examples_cached": True}))
"""


def write_parquet(path: Path, images: int, size: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("text", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, images, 64):
            rows = []
            for i in range(start, min(images, start + 64)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG",
                                                                                            compress_level=1)
                rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "text": "what is it?",
                             "label": ["noise", "static"][i % 2]})
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=64)


def run_child(args: list[str], env: dict, what: str) -> dict:
    child = subprocess.run([sys.executable, "-c", *args], env=env, capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"{what} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hf_memory.json"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    import tiny

    work = Path(tempfile.mkdtemp(prefix="peftmm-hf-memory-"))
    try:
        started = time.perf_counter()
        data = work / "noise.parquet"
        write_parquet(data, args.images, args.size)
        written = time.perf_counter() - started
        models = {kind: str(tiny.build(kind, work / "models" / kind)) for kind in ("mobilenet_v2", "bert")}
        recipe = {"name": "hf-memory", "vision": {"backbone": models["mobilenet_v2"]},
                  "text": {"backbone": models["bert"], "max_length": 16},
                  "fusion": {"type": "concat-mlp", "dim": 16}, "task": {"type": "classification", "hidden": 16},
                  "data": {"source": "hf", "path": str(data)},
                  "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "max_steps": args.max_steps}}
        env = dict(os.environ, HF_DATASETS_CACHE=str(work / "datasets-cache"), HF_HUB_OFFLINE="1",
                   PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        converted = run_child([CONVERT, str(data)], env, "the conversion")
        measured = run_child([CHILD, json.dumps(recipe), str(work / "run")], env, "the training process")
        parquet_bytes, arrow_bytes = data.stat().st_size, folder_bytes(work / "datasets-cache")
        report = {
            "command": "PYTHONPATH=. python bench/hf_larger_than_memory.py " + " ".join(sys.argv[1:]),
            "images": args.images, "image_px": args.size, "parquet_bytes": parquet_bytes,
            "arrow_cache_bytes": arrow_bytes, "training": measured,
            "parquet_over_training_peak_rss": round(parquet_bytes / measured["peak_rss_bytes"], 2),
            "conversion": converted,
            "write_seconds": round(written, 1),
            "note": "peak RSS is each process's ru_maxrss (anonymous and file-backed pages). Training: the Arrow "
                    "files are memory-mapped and the pages read are handed back (data/hf.py ArrowImages); the "
                    "frozen vision tower's feature cache reads every train and val image. Conversion: datasets' "
                    "first load of the parquet file into its Arrow cache, in a process of its own.",
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
