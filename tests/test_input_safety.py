"""Hostile and unusual input beyond the error corpus (tests/bad_inputs/): images read the same
whatever their mode or transparency, pixels bounded before decoding, the Hub contacted once and
only when allowed, non-finite tensors refused on save, and the bounded loaders themselves."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from peftmm import images
from peftmm.backbones import load_tower, local_only, resolve_source
from peftmm.bundle import CONFIG, load_bundle, read_config
from peftmm.errors import BundleError, ImageTooLarge, PeftmmError
from peftmm.images import load_image, set_pixel_limit
from peftmm.safe_load import load_yaml, short_repr

QUESTION = "what shape is it?"


@pytest.fixture
def limit():
    yield set_pixel_limit
    set_pixel_limit(None)


# -- image modes and transparency ---------------------------------------------------------------

def _grey_pair(tmp_path):
    """An easy-VQA test image as 8-bit greyscale, and a 16-bit copy of it (v -> v * 257, what
    image tools write when they widen 8-bit samples)."""
    import easy_vqa

    grey = Image.open(easy_vqa.get_test_image_paths()[3]).convert("L")
    grey.save(tmp_path / "grey8.png")
    wide = np.asarray(grey).astype(np.uint16) * 257
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    return tmp_path / "grey8.png", tmp_path / "grey16.png"


def test_a_16_bit_greyscale_copy_gets_the_answer_of_the_8_bit_original(cli_run, tmp_path):
    from peftmm.cli import main
    from peftmm.predict import Predictor

    eight, sixteen = _grey_pair(tmp_path)
    # what convert("RGB") made of it before: every sample clipped to white
    assert Image.open(sixteen).convert("RGB").getextrema() == ((255, 255),) * 3
    assert np.array_equal(np.asarray(load_image(sixteen)), np.asarray(load_image(eight).convert("RGB")))
    predictor = Predictor.load(cli_run[1], device="cpu")

    def answer(result: dict) -> dict:
        return {k: v for k, v in result.items() if k != "image"}
    assert answer(predictor.predict(sixteen, QUESTION)) == answer(predictor.predict(eight, QUESTION))
    answers = [json.loads(CliRunner().invoke(main, ["predict", str(cli_run[1]), "--image", str(path), "--question",
                                                    QUESTION, "--json"]).output) for path in (eight, sixteen)]
    assert answer(answers[0]) == answer(answers[1]) and answers[0]["scores"]


def test_float_and_32_bit_samples_are_scaled_not_clipped():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    as_float = images.normalise(Image.fromarray(ramp, "F"))
    as_int = images.normalise(Image.fromarray((ramp * 65535).astype(np.int32), "I"))
    expected = np.rint(ramp * 255).astype(np.uint8)
    for image in (as_float, as_int):
        assert image.mode == "RGB" and np.abs(np.asarray(image)[..., 0].astype(int) - expected).max() <= 1


def _emoji_on_white():
    from peftmm.data import emoji

    font = emoji.font_path()
    return emoji.render("\N{GRINNING FACE}", font)


def _transparent_copy(white: Image.Image) -> Image.Image:
    """The same drawing with a transparent background: pixels that are pure white become
    transparent black (what a cut-out file holds); compositing it on white gives ``white`` back."""
    rgb = np.asarray(white).copy()
    background = (rgb == 255).all(axis=-1)
    rgb[background] = 0
    alpha = np.where(background, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def test_an_emoji_with_a_transparent_background_gets_the_features_of_the_one_on_white(tiny_models, tmp_path):
    white = _emoji_on_white()
    white.save(tmp_path / "white.png")
    clear = _transparent_copy(white)
    clear.save(tmp_path / "clear.png")
    # a palette copy whose background is index 255, marked transparent (the usual icon file)
    quantised = white.convert("P", palette=Image.ADAPTIVE, colors=255)
    indices = np.asarray(quantised).copy()
    indices[np.asarray(clear)[..., 3] == 0] = 255
    palette = quantised.getpalette()[: 255 * 3] + [0, 0, 0]
    for name, colour, transparency in (("palette", [0, 0, 0], 255), ("palette-white", [255, 255, 255], None)):
        image = Image.fromarray(indices, "P")
        image.putpalette(palette[: 255 * 3] + colour)
        image.save(tmp_path / f"{name}.png", **({"transparency": transparency} if transparency is not None else {}))
    tower = load_tower("vision", tiny_models["mobilenet_v2"])

    def features(path):
        """What the tower is fed (the tiny random tower's outputs are ~1e-26: its input tells more)
        and what it gives."""
        pixels = tower.processor(load_image(path))
        with torch.no_grad():
            return pixels, tower(pixel_values=pixels[None])[0]

    on_white = features(tmp_path / "white.png")
    for name, reference in (("clear", on_white), ("palette", features(tmp_path / "palette-white.png"))):
        pixels, tokens = features(tmp_path / f"{name}.png")
        assert torch.equal(pixels, reference[0]) and torch.equal(tokens, reference[1]), name
    # what convert("RGB") read before: the transparent background turned black, another picture
    old = tower.processor(Image.open(tmp_path / "clear.png").convert("RGB"))
    assert (old - on_white[0]).abs().max() > 1


def test_the_background_is_a_recipe_setting_kept_in_the_bundle_and_the_cache_key(tiny_models, tmp_path):
    import tiny
    from helpers import build

    from peftmm.bundle import save_bundle
    from peftmm.feature_store import cache_key

    white = _emoji_on_white()
    _transparent_copy(white).save(tmp_path / "clear.png")
    data = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"], text_methods=[{"type": "lora", "r": 2}])
    data["vision"]["background"] = "#000000"
    recipe, model, _ = build(data)
    black = model.towers["vision"].processor
    assert black.background == (0, 0, 0)
    expected = Image.alpha_composite(Image.new("RGBA", white.size, (0, 0, 0, 255)),
                                     Image.open(tmp_path / "clear.png")).convert("RGB")
    assert torch.equal(black(load_image(tmp_path / "clear.png")), black(expected))
    save_bundle(model, recipe, tmp_path / "bundle")
    assert read_config(tmp_path / "bundle")["recipe"]["vision"]["background"] == "#000000"
    loaded, _, _ = load_bundle(tmp_path / "bundle")
    assert loaded.towers["vision"].processor.background == (0, 0, 0)
    on_white = load_tower("vision", tiny_models["mobilenet_v2"])
    assert cache_key(on_white, None) != cache_key(loaded.towers["vision"], None)


# -- pixels bounded before decoding -------------------------------------------------------------

def test_pixels_are_bounded_before_decoding(tmp_path, limit):
    Image.new("RGB", (400, 300), (10, 200, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (400, 300), (10, 200, 30)).save(tmp_path / "big.jpg", quality=95)
    limit(50_000)
    decoded = []
    original = Image.Image.load
    try:
        Image.Image.load = lambda self: decoded.append(self.size) or original(self)
        with pytest.raises(ImageTooLarge, match=r"big\.png: image of 400x300 pixels \(0\.12 MP\) is over the limit "
                                                r"of 0\.05 MP"):
            load_image(tmp_path / "big.png")
        assert decoded == []   # refused from the header: nothing decoded
        jpeg = load_image(tmp_path / "big.jpg")   # a JPEG is decoded at a DCT scale that fits instead
    finally:
        Image.Image.load = original
    assert jpeg.size == (200, 150) and set(decoded) == {(200, 150)}   # half scale: 30,000 pixels
    limit(None)
    assert load_image(tmp_path / "big.png").size == (400, 300)


def test_the_server_holds_a_bounded_number_of_decoded_pixels():
    from peftmm.serve.app import PixelBudget

    budget, order = PixelBudget(10), []

    async def request(name, pixels, seconds):
        async with budget.hold(pixels):
            order.append(f"{name} in ({budget.used})")
            await asyncio.sleep(seconds)
        order.append(f"{name} out")

    async def run():
        await asyncio.gather(request("a", 6, 0.05), request("b", 6, 0), request("c", 40, 0))
    asyncio.run(run())
    assert order == ["a in (6)", "a out", "b in (6)", "b out", "c in (10)", "c out"]
    assert budget.used == 0


# -- backbones named by bundles: no network unless allowed, once ---------------------------------

def test_a_hub_id_not_cached_is_looked_up_once_and_only_when_allowed(monkeypatch, tmp_path):
    import httpx
    from huggingface_hub import HfApi, constants

    calls = []

    def unreachable(self, repo, **kwargs):
        calls.append(repo)
        raise httpx.ConnectError("Name or service not known")
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(PeftmmError, match=r"backbone 'someone/model' is not in the local Hugging Face cache and the "
                                          r"Hub could not be reached \(ConnectError: .*one attempt was made"):
        resolve_source("someone/model")
    assert calls == ["someone/model"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftmmError, match="may not be contacted"):
        resolve_source("someone/model")
    assert calls == ["someone/model"]
    with pytest.raises(PeftmmError, match="did you mean 'minilm-l6'"):
        resolve_source("minilm-l7")
    assert calls == ["someone/model"]


def test_a_cached_hub_id_loads_from_the_cache_alone(monkeypatch, tmp_path, tiny_models):
    from huggingface_hub import HfApi, constants

    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_models["bert"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("the Hub was contacted"))
    assert resolve_source("someone/tiny") == "someone/tiny" and local_only("someone/tiny")
    assert load_tower("text", "someone/tiny").info.source == "someone/tiny"


# -- bundles ------------------------------------------------------------------------------------

def test_a_run_with_non_finite_weights_is_not_saved(tiny_models, tmp_path):
    import tiny
    from helpers import build

    from peftmm.bundle import save_bundle

    recipe, model, _ = build(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"]))
    name, parameter = next((n, p) for n, p in model.head.named_parameters())
    with torch.no_grad():
        parameter.view(-1)[0] = math.inf
    with pytest.raises(BundleError, match=rf"tensor 'head\.{name}' holds 1 NaN or infinite value"):
        save_bundle(model, recipe, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists() and list(tmp_path.iterdir()) == []


def test_format_version_written_as_a_float_is_read_as_that_version(cli_run, tmp_path):
    import hashlib

    from safetensors.torch import load_file, save_file

    from peftmm.bundle import WEIGHTS

    path = tmp_path / "bundle"
    shutil.copytree(cli_run[1] / "bundle", path)
    (path / CONFIG).write_text((path / CONFIG).read_text().replace('"format_version": 1,', '"format_version": 1.0,'))
    assert '"format_version": 1.0' in (path / CONFIG).read_text()
    digest = hashlib.sha256((path / CONFIG).read_bytes()).hexdigest()
    save_file(load_file(path / WEIGHTS), path / WEIGHTS,
              metadata={"format": "peftmm", "format_version": "1", "config_sha256": digest})
    assert read_config(path)["format_version"] == 1
    load_bundle(path)


def test_list_reports_a_broken_bundle_on_its_line_and_goes_on(cli_run, tmp_path):
    from peftmm.cli import main

    shutil.copytree(cli_run[1] / "bundle", tmp_path / "a-good")
    shutil.copytree(cli_run[1] / "bundle", tmp_path / "b-deep")
    (tmp_path / "b-deep" / CONFIG).write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    shutil.copytree(cli_run[1] / "bundle", tmp_path / "c-good")
    result = CliRunner().invoke(main, ["list", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 3 and lines[1].startswith("b-deep") and all("error" not in lines[i] for i in (0, 2))
    assert "error: adapter_config.json is not valid JSON: nested 100001 levels deep" in lines[1]


# -- the loaders --------------------------------------------------------------------------------

def test_short_repr_is_bounded_whatever_the_value():
    laughs = ["lol"] * 9
    for _ in range(30):          # 9**30 strings once expanded: repr() would never finish
        laughs = [laughs] * 9
    started = time.perf_counter()
    shown = [short_repr(v) for v in (laughs, 10 ** 5000, "x" * 10 ** 7, {i: i for i in range(10 ** 5)})]
    assert time.perf_counter() - started < 1
    assert all(len(text) <= 60 for text in shown) and shown[1] == "<an integer of about 5000 digits>"


def test_yaml_aliases_are_fine_until_they_multiply():
    shared = load_yaml("base: &b {r: 4, alpha: 8}\nmethods: [*b, *b]\n")
    assert shared["methods"] == [{"r": 4, "alpha": 8}] * 2
    with pytest.raises(PeftmmError, match="expand it past 100,000 values"):
        load_yaml("a: &a [" + ",".join(["x"] * 400) + "]\nb: &b [" + ",".join(["*a"] * 400) + "]\n")
