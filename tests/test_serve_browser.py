"""The page of `peftmm serve` in headless Chromium against a real server: ask, see the answer;
converse with an instruct adapter, its answers streamed.

Chromium is the system's (Debian's ``chromium``, which scripts/test.sh installs when missing),
driven by playwright without any browser download. Without it this test fails, unless
PEFTMM_SKIP_BROWSER=1 says to skip it.
"""

import os
import shutil

import httpx
import pytest
import torch
from helpers import perturb
from serving import METHODS, live_server, make_adapters, make_bundle
from test_instruct import build as build_instruct
from test_instruct import data_file, instruct_recipe, tiny_models  # noqa: F401 (fixtures)

from peftmm.bundle import save_bundle
from peftmm.runtime import Runtime
from peftmm.serve import create_app

CHROMIUM = os.environ.get("PEFTMM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # the closed network makes it misbehave otherwise
NAMES = ("lora-text", "adapter-both")


@pytest.fixture(scope="module")
def browser():
    missing = None
    if not os.path.isfile(CHROMIUM):
        missing = f"Chromium not found ({CHROMIUM}): install it with `apt-get install chromium` (make test does)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "playwright is not installed: pip install -e '.[test]'"
    if missing:
        if os.environ.get("PEFTMM_SKIP_BROWSER") == "1":
            pytest.skip(missing)
        pytest.fail(f"{missing}; or set PEFTMM_SKIP_BROWSER=1 to skip the browser test", pytrace=False)
    with sync_playwright() as playwright:
        # playwright runs it headless, with a fresh temporary --user-data-dir of its own
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    examples = make_adapters(tiny_models, root, NAMES)
    runtime = Runtime(device="cpu", root=root)
    for name in NAMES:
        runtime.register(name)
    with live_server(create_app(runtime)) as base:
        yield base, runtime, examples


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 900, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(served[0] + "/")
    page.wait_for_selector(f"#adapter option[value='{NAMES[1]}']", state="attached", timeout=10_000)
    yield page
    context.close()
    assert not errors, errors  # no script errors in the page


def test_ask_a_question_in_the_page(page, served, tmp_path):
    _, runtime, examples = served
    example = examples[2]
    expected = runtime.predict([{"adapter": NAMES[1], **example}])[0]
    page.select_option("#adapter", NAMES[1])
    assert "adapter" in page.inner_text("#adapter-info")
    page.set_input_files("#image", example["image"])
    page.wait_for_selector("#preview", state="visible")
    page.fill("#question", example["text"])
    page.click("#submit")
    page.wait_for_selector("#result", state="visible", timeout=20_000)
    assert page.inner_text("#answer") == expected["answer"]
    shown = page.locator("#scores li .name").all_inner_texts()
    assert shown == [s["answer"] for s in expected["scores"]]
    assert page.locator("#error").is_hidden()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    shutil.copy(tmp_path / "page.png", "/tmp/peftmm-page.png")  # for a person to look at


DROP = """(bytes) => {
  const files = new DataTransfer();
  files.items.add(new File([new Uint8Array(bytes)], "fake.png", {type: "image/png"}));
  document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
}"""


def test_a_dropped_file_that_is_no_image_shows_the_servers_error(page):
    page.evaluate(DROP, list(b"these bytes are no picture"))
    page.wait_for_selector("#preview", state="visible")
    page.fill("#question", "what color is it?")
    page.keyboard.press("Enter")  # the form submits from the keyboard too
    page.wait_for_selector("#error", state="visible", timeout=20_000)
    assert "not an image" in page.inner_text("#error")
    assert page.locator("#result").is_hidden()


@pytest.fixture(scope="module")
def served_chat(tiny_models, data_file, tmp_path_factory):  # noqa: F811
    """A tiny instruct bundle ("chat") beside a VQA one, served."""
    root = tmp_path_factory.mktemp("chat-adapters")
    torch.manual_seed(31)
    data = instruct_recipe(tiny_models, data_file, max_new_tokens=5)
    data["text"]["max_length"] = 64   # room for a second turn
    recipe, model, splits = build_instruct(data)
    perturb(model, 0.5)
    save_bundle(model, recipe, root / "chat")
    make_bundle(tiny_models, root, NAMES[0], 0, **dict(METHODS[NAMES[0]]))
    runtime = Runtime(device="cpu", root=root)
    for name in ("chat", NAMES[0]):
        runtime.register(name)
    with live_server(create_app(runtime)) as base:
        yield base, [e["image"] for e in splits.test[:2]]


def _answered(page, base, sent: list, turn: int) -> str:
    """The streamed answer of assistant turn ``turn``, checked against the API's non-streamed answer
    to the very request the page sent."""
    page.wait_for_function(f"document.querySelectorAll('.turn.assistant[data-done]').length > {turn} || "
                           "!document.getElementById('error').hidden", timeout=30_000)
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    reply = page.locator(".turn.assistant").nth(turn)
    request = sent[turn]
    assert request["stream"] is True and request["model"] == "chat"
    plain = httpx.post(base + "/v1/chat/completions", json={**request, "stream": False}, timeout=60).json()
    shown = reply.locator(".text").inner_text()
    assert shown == plain["choices"][0]["message"]["content"] != "", plain
    assert int(reply.get_attribute("data-chunks")) >= 1   # it came as server-sent chunks
    return shown


def test_converse_with_an_instruct_adapter_in_the_page(browser, served_chat, tmp_path):
    base, images = served_chat
    context = browser.new_context(viewport={"width": 900, "height": 1000})
    page = context.new_page()
    errors, sent = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(base + "/")
    page.wait_for_selector("#adapter option[value='chat']", state="attached", timeout=10_000)
    page.select_option("#adapter", NAMES[0])
    assert page.locator("#chat").is_hidden() and page.locator("#ask").is_visible()
    page.select_option("#adapter", "chat")
    assert page.locator("#chat").is_visible() and page.locator("#ask").is_hidden()
    assert "instruct" in page.inner_text("#adapter-info")
    page.fill("#chat-text", "what shape is in the image ?")
    page.click("#chat-send")
    assert "Attach an image" in page.inner_text("#error") and not sent   # the first turn needs one
    page.set_input_files("#chat-image", images[0])
    page.wait_for_selector("#chat-preview", state="visible")
    page.click("#chat-send")
    first = _answered(page, base, sent, 0)
    image = sent[0]["messages"][0]["content"][0]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")
    assert page.locator("#error").is_hidden() and page.locator("#chat-preview").is_hidden()
    # a second turn without an image: the whole conversation goes, the first turn's image with it
    page.fill("#chat-text", "what color is the shape ?")
    page.keyboard.press("Enter")
    _answered(page, base, sent, 1)
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == first and sent[1]["messages"][2]["content"][0]["type"] == "text"
    assert page.locator(".turn.user img").count() == 1
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    shutil.copy(tmp_path / "chat.png", "/tmp/peftmm-chat.png")  # for a person to look at
    page.click("#chat-new")
    assert page.locator(".turn").count() == 0
    context.close()
    assert not errors, errors
