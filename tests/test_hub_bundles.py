"""``peftmm push`` and ``hf://OWNER/NAME[@REVISION]`` bundles, against a local HTTP server that
answers the Hub endpoints huggingface_hub calls (tests/fake_hub.py): the real huggingface_hub
client code runs, only the server is ours."""

from __future__ import annotations

import hashlib
import json

import pytest
import tiny
import torch
from click.testing import CliRunner
from fake_hub import TOKEN, FakeHub
from PIL import Image
from safetensors.torch import load, save

from peftmm.bundle import CONFIG, WEIGHTS, read_tensors, resolve_bundle, save_bundle
from peftmm.cli import main
from peftmm.errors import BundleError
from peftmm.predict import Predictor
from peftmm.runtime import Runtime

pytestmark = pytest.mark.usefixtures("keep_torch_rng")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from helpers import build, perturb

    root = tmp_path_factory.mktemp("hub")
    models = {kind: str(tiny.build(kind, root / kind)) for kind in ("vit", "bert")}
    recipe, model, _ = build(tiny.recipe(models["vit"], models["bert"],
                                         text_methods=[{"type": "lora", "r": 2, "alpha": 4}]))
    torch.manual_seed(3)
    perturb(model, 0.2)
    path = save_bundle(model, recipe, root / "tiny-vqa", metrics={"test_accuracy": 0.5})
    image = root / "red.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(image)
    return path, image, models


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake Hub as huggingface_hub's endpoint, with a fresh cache and the write token."""
    from huggingface_hub import constants

    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def push(*args):
    return CliRunner().invoke(main, ["push", *map(str, args)])


def test_push_then_pull_round_trip(bundle, hub):
    path, image, _ = bundle
    result = push(path, "me/tiny-vqa", "--commit-message", "first")
    assert result.exit_code == 0, result.output
    assert "use it as hf://me/tiny-vqa" in result.output
    assert sorted(hub.files("me/tiny-vqa")) == sorted(["README.md", CONFIG, WEIGHTS])
    assert hub.front_matter and hub.front_matter[-1]["library_name"] == "peftmm"
    pulled = resolve_bundle("hf://me/tiny-vqa")
    assert pulled.is_relative_to(hub_cache())
    local, remote = read_tensors(path), read_tensors(pulled)
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    mine = Predictor.load(path).predict(str(image), "what colour is the shape?")
    theirs = Predictor.load("hf://me/tiny-vqa").predict(str(image), "what colour is the shape?")
    assert mine == theirs
    registered = Runtime(device="cpu").register("hf://me/tiny-vqa")
    assert registered["name"] == "tiny-vqa"


def hub_cache():
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def test_revisions(bundle, hub):
    path, _, _ = bundle
    assert push(path, "me/tiny-vqa").exit_code == 0
    result = push(path, "me/tiny-vqa", "--revision", "dev")
    assert result.exit_code == 0, result.output
    assert read_tensors(resolve_bundle("hf://me/tiny-vqa@dev")).keys() == read_tensors(path).keys()
    with pytest.raises(BundleError, match="hf://me/tiny-vqa@nope: the repository has no revision 'nope'"):
        resolve_bundle("hf://me/tiny-vqa@nope")


def test_a_missing_repo_and_a_private_one_without_token(bundle, hub, monkeypatch):
    with pytest.raises(BundleError, match="hf://me/none: no such model repository on the Hugging Face Hub, or it is "
                                          "private and no token with access was given"):
        resolve_bundle("hf://me/none")
    assert push(bundle[0], "me/secret", "--private").exit_code == 0
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(BundleError, match="hf://me/secret: no such model repository .* or it is private"):
        resolve_bundle("hf://me/secret")
    result = push(bundle[0], "me/another")
    assert result.exit_code == 2 and "the Hub refused the token (HTTP 401)" in result.output
    assert "me/another" not in hub.repos


@pytest.mark.parametrize("reference", ["hf://../../etc", "hf://me/../x", "hf://me/x/y", "hf://me", "hf://me/x@../../a",
                                       "hf://me/x@", "hf:///abs/path", "hf://me/x--y"])
def test_references_with_path_tricks_are_refused_before_any_request(reference, hub):
    with pytest.raises(BundleError):
        resolve_bundle(reference)
    assert hub.requests == []


@pytest.mark.parametrize("repo", ["../x", "me/..", "me/x/y", "me", "me/.hidden"])
def test_push_refuses_bad_repo_ids(bundle, hub, repo):
    result = push(bundle[0], repo)
    assert result.exit_code == 2 and "is not a Hugging Face repository id" in result.output
    assert hub.requests == []


def test_a_corrupt_pulled_bundle_is_refused_before_loading(bundle, hub):
    assert push(bundle[0], "me/tiny-vqa").exit_code == 0
    files = hub.files("me/tiny-vqa")
    files[WEIGHTS] = files[WEIGHTS][: len(files[WEIGHTS]) // 2]
    with pytest.raises(BundleError, match=f"{WEIGHTS} is corrupt or truncated"):
        resolve_bundle("hf://me/tiny-vqa")


def test_a_pulled_bundle_for_other_weights_is_refused(bundle, hub):
    assert push(bundle[0], "me/tiny-vqa").exit_code == 0
    files = hub.files("me/tiny-vqa")
    config = json.loads(files[CONFIG])
    config["towers"]["text"]["fingerprint"] = "0" * 64
    files[CONFIG] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    files[WEIGHTS] = save(load(files[WEIGHTS]), metadata={"format": "peftmm", "format_version": "2",
                                             "config_sha256": hashlib.sha256(files[CONFIG]).hexdigest()})
    with pytest.raises(BundleError, match="it belongs to other weights"):
        Predictor.load("hf://me/tiny-vqa")


def test_offline_pulls_come_from_the_cache_only(bundle, hub, monkeypatch):
    assert push(bundle[0], "me/tiny-vqa").exit_code == 0
    first = resolve_bundle("hf://me/tiny-vqa")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    assert resolve_bundle("hf://me/tiny-vqa") == first and hub.requests == []
    with pytest.raises(BundleError, match="not in the local Hugging Face cache and the Hub may not be reached"):
        resolve_bundle("hf://me/never-pulled")
    result = push(bundle[0], "me/tiny-vqa")
    assert result.exit_code == 2 and "pushing needs the Hugging Face Hub, which is off here" in result.output


def test_init_from_a_hub_bundle(bundle, hub, tmp_path):
    from peftmm import recipe_from_dict
    from peftmm.trainer import train

    path, _, models = bundle
    assert push(path, "me/tiny-vqa").exit_code == 0
    recipe = tiny.recipe(models["vit"], models["bert"], text_methods=[{"type": "lora", "r": 2, "alpha": 4}],
                         init_from="hf://me/tiny-vqa", train={"max_steps": 1})
    result = train(recipe_from_dict(recipe), tmp_path / "run", progress=False, log=lambda _: None)
    assert result.metrics["init_from"] == str(resolve_bundle("hf://me/tiny-vqa"))
