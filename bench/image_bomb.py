"""Memory of `peftmm serve` under concurrent one-colour image bombs.

    .venv/bin/python bench/image_bomb.py --label after                       # this checkout
    PEFTMM_CODE=/path/to/other/checkout .venv/bin/python bench/image_bomb.py --label before

Starts `peftmm serve` (the code under PEFTMM_CODE, default this checkout) in its own process on
127.0.0.1 over a copy of adapters/easy-vqa-fusion-only, then sends --requests concurrent
predictions, each a one-colour PNG of --size x --size pixels (a few KB of file; the server's
byte limit does not stop it), as base64 JSON. The server's resident memory (VmRSS of its
process) is sampled every 20 ms: before the requests, its peak while they run, and 3 s after the
last answer. Each request has a 300 s timeout. Results are merged into
bench/results/image_bomb.json under "<label>-<size>".
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import free_port, wait_until_up  # noqa: E402  (bench/ is not a package)

RESULTS = ROOT / "bench" / "results" / "image_bomb.json"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.02)


def bomb_png(size: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(out, "PNG", optimize=True)
    return out.getvalue()


def post(url: str, payload: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()[:200]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()[:200]
    except OSError as e:
        return -1, f"{type(e).__name__}: {e}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True, help="name of this run in the results (before, after ...)")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--size", type=int, default=9400)
    parser.add_argument("--bundle", default="easy-vqa-fusion-only")
    args = parser.parse_args()
    code = Path(os.environ.get("PEFTMM_CODE", ROOT)).resolve()
    png = bomb_png(args.size)
    payload = json.dumps({"adapter": args.bundle, "question": "what shape is in the image?",
                          "image_base64": base64.b64encode(png).decode()}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "adapters" / args.bundle, Path(tmp) / args.bundle)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
        # cwd: `python -m` puts the working folder first on the path, before PYTHONPATH
        server = subprocess.Popen([sys.executable, "-m", "peftmm", "serve", "--adapters", tmp, "--host", "127.0.0.1",
                                   "--port", str(port), "--device", "cpu"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url, server)
            time.sleep(1)
            baseline = rss_mib(server.pid)
            sampler = Sampler(server.pid)
            sampler.start()
            answers: list = [None] * args.requests
            started = time.time()

            def send(i):
                answers[i] = post(url + "/api/predict", payload)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(args.requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.time() - started
            time.sleep(3)
            sampler.running = False
            sampler.join()
            after = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    result = {"code": str(code), "requests": args.requests, "image": f"{args.size}x{args.size} one-colour PNG",
              "png_bytes": len(png), "statuses": statuses, "example_answer": answers[0][1],
              "rss_mib": {"before_requests": round(baseline, 1), "peak": round(sampler.peak, 1),
                          "3s_after": round(after, 1)}, "seconds": round(seconds, 2)}
    print(json.dumps(result, indent=2))
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[f"{args.label}-{args.size}"] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
