"""`peftmm serve`: the JSON API over the runtime, its errors, micro-batching, and the CLI."""

import base64
import io
import shutil
import threading

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from serving import METHODS, live_server, make_adapters, same

from peftmm.bundle import CONFIG
from peftmm.cli import main
from peftmm.errors import DataError
from peftmm.runtime import Runtime
from peftmm.serve import MicroBatcher, create_app

LIMIT = 64 * 1024  # max_image_bytes of the test app


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    examples = make_adapters(tiny_models, root)
    (root.parent / "outside").mkdir(exist_ok=True)
    images = tmp_path_factory.mktemp("images")
    for i, example in enumerate(examples[:3]):
        shutil.copy(example["image"], images / f"{i}.png")
    (images / "escape.png").symlink_to(examples[3]["image"])  # a link out of the allowed folder
    runtime = Runtime(device="cpu", root=root)
    for name in METHODS:
        runtime.register(name)
    return root, images, examples, runtime


@pytest.fixture(scope="module")
def client(setup):
    _, images, _, runtime = setup
    with TestClient(create_app(runtime, allowed_image_dirs=[images], max_image_bytes=LIMIT)) as client:
        yield client


def _noise_png(side: int) -> bytes:
    import os

    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def _expected(runtime, adapter, image, question) -> dict:
    return runtime.predict([{"adapter": adapter, "image": str(image), "text": question}])[0]


def test_page_health_and_adapters(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="ask"' in page.text and "/static/app.js" in page.text and "http" not in page.text.split("<body")[0]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/api/health").json()["adapters"] == sorted(METHODS)
    listing = client.get("/api/adapters").json()
    assert [a["name"] for a in listing["adapters"]] == sorted(METHODS)
    assert sorted(b["tower"] for b in listing["backbones"]) == ["text", "vision"]
    assert all(b["adapters"] == sorted(METHODS) for b in listing["backbones"])
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/predict", "/api/adapters"}


def test_predict_by_upload_base64_and_path_answers_as_the_runtime(client, setup):
    _, images, examples, runtime = setup
    for i, name in enumerate(sorted(METHODS)):
        image, question = images / f"{i}.png", examples[i]["text"]
        expected = _expected(runtime, name, image, question)
        data = image.read_bytes()
        answers = [
            client.post("/api/predict", data={"adapter": name, "question": question},
                        files={"image": ("x.png", data, "image/png")}),
            client.post("/api/predict", json={"adapter": name, "question": question,
                                              "image_base64": base64.b64encode(data).decode()}),
            client.post("/api/predict", json={"adapter": name, "question": question, "image_base64":
                                              "data:image/png;base64," + base64.b64encode(data).decode()}),
            client.post("/api/predict", json={"adapter": name, "question": question, "image_path": str(image)}),
            client.post("/api/predict", json={"adapter": name, "question": question, "image_path": f"{i}.png"}),
        ]
        for response in answers:
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["adapter"] == name and body["question"] == question and same(body, expected)


def test_load_and_unload_at_run_time(client, setup):
    _, images, examples, _ = setup
    created = client.post("/api/adapters", json={"bundle": "lora-text", "name": "extra"})
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "extra" and created.json()["methods"]["text"] == ["lora"]
    assert "extra" in [a["name"] for a in client.get("/api/adapters").json()["adapters"]]
    ask = {"question": examples[0]["text"], "image_path": "0.png"}
    extra = client.post("/api/predict", json={"adapter": "extra", **ask}).json()
    assert same(extra, client.post("/api/predict", json={"adapter": "lora-text", **ask}).json())
    assert client.delete("/api/adapters/extra").status_code == 204
    gone = client.post("/api/predict", json={"adapter": "extra", **ask})
    assert gone.status_code == 404 and "no adapter named 'extra'" in gone.json()["error"]
    assert client.delete("/api/adapters/extra").status_code == 404
    assert client.get("/api/health").json()["adapters"] == sorted(METHODS)


def _upload(question="what shape?", adapter="lora-text", data=None, name="x.png"):
    fields = {k: v for k, v in {"adapter": adapter, "question": question}.items() if v is not None}
    return dict(data=fields, files={"image": (name, data, "image/png")})


BAD = {  # kind: (method, url, request arguments (given the setup), status, part of the message)
    "unknown adapter": ("post", "/api/predict", lambda png: _upload(adapter="nope", data=png), 404,
                        "no adapter named 'nope'"),
    "missing question (form)": ("post", "/api/predict", lambda png: _upload(question=None, data=png), 422,
                                "question: Field required"),
    "missing question (json)": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text",
                                "image_path": "0.png"}), 422, "question: Field required"),
    "blank question": ("post", "/api/predict", lambda png: _upload(question="  ", data=png), 422, "question"),
    "missing image": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text", "question": "q?"}),
                      422, "image_base64, image_path"),
    "unknown field": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text", "question": "q?",
                      "image_path": "0.png", "imagepath": 1}), 422, "imagepath"),
    "non-image upload": ("post", "/api/predict", lambda png: _upload(data=b"hello, not an image"), 415,
                         "not an image"),
    "oversized image": ("post", "/api/predict", lambda png: _upload(data=_noise_png(160)), 413, "over the limit"),
    "oversized body": ("post", "/api/predict", lambda png: _upload(data=_noise_png(320)), 413, "over the limit"),
    "bad base64": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text", "question": "q?",
                   "image_base64": "not*base64!"}), 400, "image_base64: not valid base64"),
    "invalid json": ("post", "/api/predict", lambda png: dict(content=b"{nope", headers={
                     "content-type": "application/json"}), 400, "not valid JSON"),
    "plain text body": ("post", "/api/predict", lambda png: dict(content=b"hi"), 415, "multipart/form-data"),
    "path outside": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text", "question": "q?",
                     "image_path": "/etc/passwd"}), 403, "outside the folders"),
    "relative path out": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text", "question": "q?",
                          "image_path": "../outside/x.png"}), 403, "outside the folders"),
    "link out": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text", "question": "q?",
                 "image_path": "escape.png"}), 403, "outside the folders"),
    "missing file": ("post", "/api/predict", lambda png: dict(json={"adapter": "lora-text", "question": "q?",
                     "image_path": "missing.png"}), 404, "no image file"),
    "bundle escaping": ("post", "/api/adapters", lambda png: dict(json={"bundle": "../outside"}), 400,
                        "outside the adapters folder"),
    "absolute bundle": ("post", "/api/adapters", lambda png: dict(json={"bundle": "/etc"}), 400,
                        "outside the adapters folder"),
    "missing bundle": ("post", "/api/adapters", lambda png: dict(json={"bundle": "nothing-here"}), 404,
                       "no adapter bundle"),
    "duplicate name": ("post", "/api/adapters", lambda png: dict(json={"bundle": "lora-text"}), 409,
                       "already registered"),
    "bad name": ("post", "/api/adapters", lambda png: dict(json={"bundle": "lora-text", "name": "a/b"}), 400,
                 "not allowed"),
    "register without bundle": ("post", "/api/adapters", lambda png: dict(json={"name": "x"}), 422,
                                "bundle: Field required"),
    "unknown route": ("get", "/api/nothing", lambda png: {}, 404, "Not Found"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_request_gets_its_status_and_a_json_error(client, setup, kind):
    method, url, arguments, status, message = BAD[kind]
    png = (setup[1] / "0.png").read_bytes()
    response = getattr(client, method)(url, **arguments(png))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert client.get("/api/health").json()["adapters"] == sorted(METHODS)  # nothing changed


def test_size_limit_holds_without_content_length(client):
    """A chunked body (no Content-Length) is cut off at the limit too."""
    def chunks():
        for _ in range(LIMIT // 1024 * 4):
            yield b"x" * 1024
    response = client.post("/api/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]


def test_decompression_bomb_is_refused(client, setup, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the test images have 64x64 pixels
    response = client.post("/api/predict", **_upload(data=(setup[1] / "0.png").read_bytes()))
    assert response.status_code == 413 and "pixels" in response.json()["error"]


def test_a_bad_request_in_a_batch_fails_alone(setup):
    _, images, examples, runtime = setup
    batcher = MicroBatcher(runtime.predict, max_batch=8, wait_ms=200)  # wide window: one batch
    good = [{"adapter": name, "image": str(images / "1.png"), "text": examples[1]["text"]} for name in METHODS]
    futures = [batcher.submit(r) for r in good[:2]] + [batcher.submit({**good[0], "text": " "})] + \
        [batcher.submit(good[2])]
    try:
        results = [f.result(30) for i, f in enumerate(futures) if i != 2]
        with pytest.raises(DataError, match="non-empty question"):
            futures[2].result(30)
    finally:
        batcher.stop()
    assert batcher.stats["fallbacks"] == 1 and batcher.stats["batches"] == 1
    for request, result in zip(good, results):
        assert same(result, runtime.predict([request])[0])


def test_concurrent_requests_on_a_real_server(setup):
    _, images, examples, runtime = setup
    names = sorted(METHODS)
    inputs = [(names[i % 3], images / f"{i % 3}.png", examples[i % 5]["text"]) for i in range(15)]
    expected = {key: _expected(runtime, *key) for key in inputs}
    encoded = {path: base64.b64encode(path.read_bytes()).decode() for _, path, _ in inputs}
    failures, lock = [], threading.Lock()

    def worker(base, offset):
        with httpx.Client(base_url=base, timeout=60) as http:
            for k in range(10):
                adapter, path, question = key = inputs[(offset * 7 + k) % len(inputs)]
                if k % 2:
                    response = http.post("/api/predict", data={"adapter": adapter, "question": question},
                                         files={"image": ("i.png", path.read_bytes(), "image/png")})
                else:
                    response = http.post("/api/predict", json={"adapter": adapter, "question": question,
                                                               "image_base64": encoded[path]})
                if response.status_code != 200 or not same(response.json(), expected[key]):
                    with lock:
                        failures.append((key, response.status_code, response.text))

    app = create_app(runtime, max_batch=16, batch_wait_ms=5)
    with live_server(app) as base:
        threads = [threading.Thread(target=worker, args=(base, t)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        stats = httpx.get(f"{base}/api/health").json()
    assert not failures, failures[:3]
    assert stats["requests"] == 80 and stats["largest_batch"] >= 2, stats  # requests were batched together


def test_cli_serves_every_bundle_and_skips_broken_ones(setup, tmp_path, monkeypatch):
    root = setup[0]
    shutil.copytree(root / "lora-text", tmp_path / "good")
    shutil.copytree(root / "adapter-both", tmp_path / "broken")
    (tmp_path / "broken" / CONFIG).write_text("{not json")
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.txt").write_text("not a bundle")
    served = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    result = CliRunner().invoke(main, ["serve", "--adapters", str(tmp_path), "--port", "8123",
                                       "--device", "cpu", "--max-image-mb", "1"])
    assert result.exit_code == 0, result.output
    assert "serving 1 adapter(s)" in result.stdout and "good" in result.stdout
    assert "skipped broken" in result.stderr and "notes" not in result.stderr
    assert served["port"] == 8123 and served["host"] == "127.0.0.1"
    with TestClient(served["app"]) as client:
        assert [a["name"] for a in client.get("/api/adapters").json()["adapters"]] == ["good"]
        refused = client.post("/api/predict", json={"adapter": "good", "question": "q?", "image_path": "/etc/hosts"})
        assert refused.status_code == 403


def test_a_bug_still_answers_json(setup):
    class Broken:  # a runtime whose predict fails for reasons of its own
        device = "cpu"

        def names(self):
            return ["x"]

        def require(self, name):
            pass

        def predict(self, requests):
            raise RuntimeError("boom")

    png = (setup[1] / "0.png").read_bytes()
    with TestClient(create_app(Broken()), raise_server_exceptions=False) as client:
        response = client.post("/api/predict", **_upload(adapter="x", data=png))
    assert response.status_code == 500 and "RuntimeError: boom" in response.json()["error"]
