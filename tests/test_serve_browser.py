"""The page of `peftmm serve` in headless Chromium against a real server: ask, see the answer.

Chromium is the system's (Debian's ``chromium``, which scripts/test.sh installs when missing),
driven by playwright without any browser download. Without it this test fails, unless
PEFTMM_SKIP_BROWSER=1 says to skip it.
"""

import os
import shutil

import pytest
from serving import live_server, make_adapters

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
