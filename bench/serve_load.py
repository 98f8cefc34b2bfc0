"""Load test of `peftmm serve`: concurrent clients naming different adapters.

    .venv/bin/python bench/serve_load.py                      # 8 clients x 200 requests, 3 adapters
    .venv/bin/python bench/serve_load.py --clients 2 --requests 20
    .venv/bin/python bench/serve_load.py --api openai             # the same through /v1/chat/completions
    .venv/bin/python bench/serve_load.py --instruct easy-vqa-instruct emoji-instruct --vqa easy-vqa-lora \
        --clients 8 --requests 25                                 # instruct + VQA mix, 200 in all

Starts the server in its own process on 127.0.0.1 (a free port) over the bundles in adapters/,
then each client thread sends its requests one after another, cycling through the adapters and
through easy-VQA test images (sent as base64) and questions. Every answer is checked against a
single-adapter run of the same (adapter, image, question) in this process, one request at a
time: the answer must be the same and the scores equal within 1e-4. Writes
bench/results/serve.json and serve.png (latency distribution per adapter); with ``--api openai``
the requests go through the OpenAI-compatible API with the official ``openai`` client (the
image as a data: URL, the scores from the response's ``peftmm`` object), into serve-openai.*.

With ``--instruct NAME...`` (instruct bundles in the --adapters folder) and ``--vqa NAME`` the load
goes through the ``openai`` client only, over those adapters: each adapter asks questions from
its own bundle's test split (the data its recipe names); instruct requests stream (``stream:
true``) and are timed to their first content chunk as well as to their end, VQA requests are
plain. Every answer is checked against the same request run alone in-process (instruct: the
generated words; VQA: the answer and its scores), into serve-instruct.{json,png}.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def ask_openai(client, item: dict) -> tuple[int, dict]:
    """One chat completion for an item, as (status, the /api/predict shape of its answer)."""
    import openai

    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + item["image_base64"]}},
               {"type": "text", "text": item["question"]}]
    try:
        completion = client.chat.completions.create(model=item["adapter"],
                                                    messages=[{"role": "user", "content": content}])
    except openai.APIStatusError as e:
        return e.status_code, e.response.json()
    extra = completion.model_extra["peftmm"]
    return 200, {"adapter": completion.model, "answer": completion.choices[0].message.content,
                 "scores": extra["scores"]}


def run_clients(client, count: int) -> float:
    """Run ``client(k)`` for k in range(count) in threads at once; the wall time until all end."""
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def wait_until_up(url: str, process, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("server did not come up")


def workload(adapters: list[str], distinct: int) -> list[dict]:
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    items = []
    for i in range(distinct):
        path = paths[image_ids[i * 7]]
        items.append({"adapter": adapters[i % len(adapters)], "question": questions[i * 7],
                      "image_base64": base64.b64encode(Path(path).read_bytes()).decode()})
    return items


def references(adapters_dir: Path, items: list[dict]) -> list[dict]:
    """Each item alone through an in-process runtime: what the server must answer."""
    from PIL import Image

    from peftmm.backbones import quiet_libraries
    from peftmm.runtime import Runtime

    quiet_libraries()
    runtime = Runtime(device="cpu", root=adapters_dir)
    for name in sorted({item["adapter"] for item in items}):
        runtime.register(name)
    out = []
    for item in items:
        image = Image.open(io.BytesIO(base64.b64decode(item["image_base64"]))).convert("RGB")
        out.append(runtime.predict([{"adapter": item["adapter"], "image": image, "text": item["question"]}])[0])
    return out


def matches(served: dict, reference: dict) -> bool:
    if (served.get("answer") != reference["answer"]
            or served.get("adapter", reference["adapter"]) != reference["adapter"]):
        return False
    return all(a["answer"] == b["answer"] and abs(a["score"] - b["score"]) < 1e-4
               for a, b in zip(served["scores"], reference["scores"]))


def screenshot(url: str, adapter: str, image: str, question: str, path: Path) -> str:
    """The page as a person uses it, in headless Chromium (the picture in the README and docs/serving.md)."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=args, headless=True)
        page = browser.new_page(viewport={"width": 900, "height": 1000})
        page.goto(url + "/")
        page.wait_for_selector(f"#adapter option[value='{adapter}']", state="attached", timeout=20_000)
        page.select_option("#adapter", adapter)
        page.set_input_files("#image", image)
        page.fill("#question", question)
        page.click("#submit")
        page.wait_for_selector("#result", state="visible", timeout=60_000)
        answer = page.inner_text("#answer")
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    return answer


def start_server(adapters_dir: Path, max_batch: int = 16) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "peftmm", "serve", "--adapters", str(adapters_dir),
                               "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    wait_until_up(url, server)
    return url, server


def bundle_items(adapters_dir: Path, name: str, count: int) -> list[dict]:
    """The first ``count`` test examples (else validation) of the data the bundle's recipe names."""
    from PIL import Image

    from peftmm.bundle import read_config
    from peftmm.data import load_splits
    from peftmm.recipe import from_dict

    splits = load_splits(from_dict(read_config(adapters_dir / name)["recipe"]).data)
    items = []
    for example in (splits.test or splits.val)[:count]:
        image = example["image"]
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
        else:
            data = Path(image).read_bytes()
        items.append({"adapter": name, "question": example["text"], "image_base64": base64.b64encode(data).decode()})
    return items


def instruct_references(adapters_dir: Path, items: list[dict], instruct: set[str]) -> list[dict]:
    """Each item alone through an in-process runtime, as the API asks it (instruct: the question as
    the conversation's one user turn, default generation options)."""
    from PIL import Image

    from peftmm.backbones import quiet_libraries
    from peftmm.generation import GenerationOptions
    from peftmm.runtime import Runtime

    quiet_libraries()
    runtime = Runtime(device="cpu", root=adapters_dir)
    for name in sorted({item["adapter"] for item in items}):
        runtime.register(name)
        if (runtime.task_of(name) == "instruct") != (name in instruct):
            raise SystemExit(f"{name} is a bundle of task {runtime.task_of(name)}: give instruct bundles to --instruct "
                             "and VQA bundles to --vqa")
    out = []
    for item in items:
        image = Image.open(io.BytesIO(base64.b64decode(item["image_base64"]))).convert("RGB")
        request = {"adapter": item["adapter"], "image": image}
        if item["adapter"] in instruct:
            request.update(messages=[{"role": "user", "content": item["question"]}], generation=GenerationOptions())
        else:
            request["text"] = item["question"]
        out.append(runtime.predict([request])[0])
    return out


def same_adapter_answers(adapters_dir: Path, items: list[dict], index: int, sizes=(4, 8, 16)) -> set[str]:
    """What item ``index`` is answered in-process when batched behind other rows of its OWN adapter
    only (batches of each size in ``sizes``): a served answer among these is the batch's floating-point
    rounding tipping a near-tie in greedy decoding, not another adapter's or image's answer."""
    from PIL import Image

    from peftmm.generation import GenerationOptions
    from peftmm.runtime import Runtime

    runtime = Runtime(device="cpu", root=adapters_dir)
    name = items[index]["adapter"]
    runtime.register(name)
    own = [k for k, item in enumerate(items) if item["adapter"] == name and k != index]

    def request(item):
        image = Image.open(io.BytesIO(base64.b64decode(item["image_base64"]))).convert("RGB")
        return {"adapter": name, "image": image, "messages": [{"role": "user", "content": item["question"]}],
                "generation": GenerationOptions()}

    answers = set()
    for size in sizes:
        for start in range(0, max(len(own) - size + 2, 1), size - 1):
            batch = [request(items[k]) for k in own[start:start + size - 1]] + [request(items[index])]
            answers.add(runtime.predict(batch)[-1]["answer"])
    return answers


def ask_streaming(client, item: dict, started: float) -> tuple[int, dict, float | None]:
    """One streamed chat completion: (status, {adapter, answer}, seconds to the first content chunk)."""
    import openai

    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + item["image_base64"]}},
               {"type": "text", "text": item["question"]}]
    first, pieces, model = None, [], None
    try:
        for chunk in client.chat.completions.create(model=item["adapter"], stream=True,
                                                    messages=[{"role": "user", "content": content}]):
            model = chunk.model
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                first = first if first is not None else time.perf_counter() - started
                pieces.append(piece)
    except openai.APIStatusError as e:
        return e.status_code, e.response.json(), None
    except openai.APIError as e:   # an error event inside the stream (the status was 200 by then)
        return 500, {"error": str(e)}, None
    return 200, {"adapter": model, "answer": "".join(pieces)}, first


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    return {"p50": statistics.median(values), "p95": values[int(0.95 * (len(values) - 1))], "max": values[-1]}


def instruct_mix(args) -> None:
    """8 openai clients over instruct and VQA adapters: see the module's docstring."""
    import openai

    instruct, names = set(args.instruct), [*args.instruct, *args.vqa]
    per = -(-args.distinct // len(names))
    groups = [bundle_items(args.adapters, name, per) for name in names]
    items = [group[k] for k in range(per) for group in groups if k < len(group)]   # the adapters interleaved
    expected = instruct_references(args.adapters, items, instruct)
    url, server = start_server(args.adapters, args.max_batch)
    results: list[tuple] = []
    lock = threading.Lock()
    try:
        chat = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for item in items[: len(names)]:   # warm-up: one request per adapter
            if item["adapter"] in instruct:
                ask_streaming(chat, item, time.perf_counter())
            else:
                ask_openai(chat, item)
        before = json.loads(urllib.request.urlopen(url + "/api/health", timeout=10).read())

        def client(k: int) -> None:
            for j in range(args.requests):
                index = (k * 7 + j) % len(items)
                start = time.perf_counter()
                if items[index]["adapter"] in instruct:
                    status, body, first = ask_streaming(chat, items[index], start)
                else:
                    (status, body), first = ask_openai(chat, items[index]), None
                elapsed = time.perf_counter() - start
                with lock:
                    results.append((index, status, body, elapsed, first))

        wall = run_clients(client, args.clients)
        after = json.loads(urllib.request.urlopen(url + "/api/health", timeout=10).read())
    finally:
        server.terminate()
        server.wait(timeout=30)

    def right(i: int, status: int, body: dict) -> bool:
        if status != 200 or body.get("adapter") != items[i]["adapter"]:
            return False
        if items[i]["adapter"] in instruct:
            return body["answer"] == expected[i]["answer"]
        return matches(body, expected[i])

    wrong = [(i, s, b) for i, s, b, _, _ in results if not right(i, s, b)]
    # A served instruct answer that the same request also gets in a batch of its own adapter's rows is
    # batch numerics (a near-tie), not a mix; anything else (other adapter, error, unexplained) is mixed.
    numerics = {i for i in {i for i, s, b in wrong if s == 200 and b.get("adapter") == items[i]["adapter"]
                            and items[i]["adapter"] in instruct}
                if {b["answer"] for j, s, b in wrong if j == i} <= same_adapter_answers(args.adapters, items, i)}
    mixed = [w for w in wrong if w[0] not in numerics]
    kind = {name: "instruct" if name in instruct else "vqa" for name in names}
    per_adapter = {name: sorted(e for i, _, _, e, _ in results if items[i]["adapter"] == name) for name in names}
    batches = after["batches"] - before["batches"]
    report = {
        "api": "openai", "mix": "instruct", "clients": args.clients, "requests_per_client": args.requests,
        "total": len(results), "adapters": {k: [n for n in names if kind[n] == k] for k in ("instruct", "vqa")},
        "distinct_items": len(items), "wrong_or_mixed": len(wrong), "mixed": len(mixed),
        "differs_from_alone_by_batch_numerics": sum(i in numerics for i, *_ in wrong),
        "errors": sum(s != 200 for _, s, *_ in results),
        "latency_s": percentiles([e for *_, e, _ in results]),
        "latency_by_kind_s": {k: percentiles([e for i, _, _, e, _ in results if kind[items[i]["adapter"]] == k])
                              for k in ("instruct", "vqa")},
        "time_to_first_token_s": percentiles([f for *_, f in results if f is not None]),
        "streamed": sum(kind[items[i]["adapter"]] == "instruct" for i, *_ in results),
        "per_adapter_p50_s": {k: statistics.median(v) for k, v in per_adapter.items() if v},
        "server": {"max_batch": args.max_batch, "batches": batches,
                   "mean_batch": (after["requests"] - before["requests"]) / max(batches, 1),
                   "largest_batch": after["largest_batch"], "device": after["device"]},
        "wall_s": wall, "requests_per_s": len(results) / wall,
        "examples_of_wrong": [{"item": i, "status": s, "body": b, "expected": expected[i].get("answer")}
                              for i, s, b in wrong[:3]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-instruct.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(per_adapter, report, args.out / "serve-instruct.png",
          f"openai clients, {args.clients} x {args.requests}: {len(args.instruct)} instruct + {len(args.vqa)} VQA "
          f"adapters, {report['wrong_or_mixed']} wrong")
    print(json.dumps({k: report[k] for k in ("total", "wrong_or_mixed", "mixed", "differs_from_alone_by_batch_numerics",
                                             "errors", "latency_s",
                                             "time_to_first_token_s", "requests_per_s")}, indent=2))
    if mixed:
        raise SystemExit(f"{len(mixed)} mixed or wrong answers")


def chart(per_adapter: dict, report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftmm.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([[1000 * e for e in v] for v in per_adapter.values()], bins=30, label=list(per_adapter), stacked=True)
    ax.axvline(1000 * report["latency_s"]["p50"], color="k", linestyle="--", label="p50")
    ax.axvline(1000 * report["latency_s"]["p95"], color="r", linestyle=":", label="p95")
    ax.set_xlabel("request latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(title, fontsize=9)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, default=ROOT / "adapters")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--distinct", type=int, default=60, help="distinct (adapter, image, question) items")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--screenshot", type=Path, help="also save a screenshot of the page here (needs chromium)")
    parser.add_argument("--api", choices=("peftmm", "openai"), default="peftmm",
                        help="/api/predict, or /v1/chat/completions through the openai client")
    parser.add_argument("--instruct", nargs="+", metavar="NAME",
                        help="instruct bundles (in --adapters) for the instruct + VQA mix (streamed requests)")
    parser.add_argument("--vqa", nargs="*", default=[], metavar="NAME", help="VQA bundles for the instruct mix")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    args = parser.parse_args()
    if args.instruct:
        instruct_mix(args)
        return

    adapters = sorted(p.name for p in args.adapters.iterdir() if (p / "peftmm_config.json").is_file())[:3]
    items = workload(adapters, args.distinct)
    expected = references(args.adapters, items)

    url, server = start_server(args.adapters, args.max_batch)
    try:
        post(url + "/api/predict", items[0])  # warm-up
        results: list[tuple] = []
        lock = threading.Lock()
        if args.api == "openai":
            import openai

            chat = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def client(k: int) -> None:
            for j in range(args.requests):
                index = (k * 7 + j) % len(items)
                start = time.perf_counter()
                if args.api == "openai":
                    status, body = ask_openai(chat, items[index])
                else:
                    status, body = post(url + "/api/predict", items[index])
                elapsed = time.perf_counter() - start
                with lock:
                    results.append((index, status, body, elapsed))

        wall = run_clients(client, args.clients)
        if args.screenshot:
            import easy_vqa

            image = easy_vqa.get_test_image_paths()[0]
            answer = screenshot(url, adapters[0], image, "what shape is in the image?", args.screenshot)
            print(f"screenshot {args.screenshot}: {adapters[0]} answered {answer!r} for {image}")
    finally:
        server.terminate()
        server.wait(timeout=30)

    wrong = [(i, s, b) for i, s, b, _ in results if s != 200 or not matches(b, expected[i])]
    latencies = sorted(e for *_, e in results)
    per_adapter = {name: sorted(e for i, _, _, e in results if items[i]["adapter"] == name) for name in adapters}
    report = {
        "api": args.api, "clients": args.clients, "requests_per_client": args.requests, "total": len(results),
        "adapters": adapters, "distinct_items": len(items), "wrong_or_mixed": len(wrong),
        "errors": sum(1 for _, s, _, _ in results if s != 200),
        "latency_s": {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
                      "max": latencies[-1]},
        "per_adapter_p50_s": {k: statistics.median(v) for k, v in per_adapter.items()},
        "wall_s": wall, "requests_per_s": len(results) / wall,
        "examples_of_wrong": [{"item": i, "status": s, "body": b} for i, s, b in wrong[:3]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "serve" if args.api == "peftmm" else "serve-openai"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")

    chart(per_adapter, report, args.out / f"{stem}.png",
          f"{args.api} API, {args.clients} clients x {args.requests} requests, {len(adapters)} adapters: "
          f"{report['wrong_or_mixed']} wrong")
    print(json.dumps({k: report[k] for k in ("total", "wrong_or_mixed", "mixed", "differs_from_alone_by_batch_numerics",
                                             "errors", "latency_s", "requests_per_s")},
                     indent=2))
    if wrong:
        raise SystemExit(f"{len(wrong)} wrong or mixed answers")


if __name__ == "__main__":
    main()
