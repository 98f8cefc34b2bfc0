"""Shared by the serve tests: tiny bundles in an adapters folder, and a real uvicorn server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import tiny
import torch
from helpers import build, perturb

from peftmm.bundle import save_bundle

METHODS = {  # three bundles on the same two backbones, each with other methods, fusion and head
    "lora-text": dict(text_methods=[{"type": "lora", "r": 4}]),
    "adapter-both": dict(vision_methods=[{"type": "adapter", "reduction_factor": 4}],
                         text_methods=[{"type": "adapter", "reduction_factor": 4, "placement": "houlsby"}]),
    "prefix-lora": dict(vision_methods=[{"type": "lora", "r": 2}],
                        text_methods=[{"type": "prefix", "length": 3, "reparam": False}],
                        fusion={"type": "concat-mlp", "dim": 32}),
}


def make_bundle(tiny_models, root, name, seed, **methods):
    torch.manual_seed(seed)
    fusion = methods.pop("fusion", None)
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], **methods)
    data["name"] = name
    data["fusion"] = fusion or data["fusion"]
    recipe, model, splits = build(data)
    perturb(model)  # non-trivial weights everywhere, so a wrong adapter shows in the output
    return save_bundle(model, recipe, root / name), splits


def make_adapters(tiny_models, root, names=tuple(METHODS)) -> list[dict]:
    """Bundles ``names`` in ``root``; returns a few test examples ({image: path, text})."""
    for seed, name in enumerate(names):
        _, splits = make_bundle(tiny_models, root, name, seed, **dict(METHODS[name]))
    return [{"image": e["image"], "text": e["text"]} for e in splits.test[:12]]


def same(a: dict, b: dict) -> bool:
    """Same answer and (to float noise) the same scores."""
    return a["answer"] == b["answer"] and len(a["scores"]) == len(b["scores"]) and all(
        s["answer"] == t["answer"] and abs(s["score"] - t["score"]) < 1e-4 for s, t in zip(a["scores"], b["scores"]))


@contextlib.contextmanager
def live_server(app):
    """Run ``app`` under uvicorn in a thread on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the port is ours from here on: no race for a free port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
