"""The web page in a real browser (Chromium via Playwright) against the real server: the
JavaScript UI (file picker, several files, drag and drop, paste, inline errors) and the plain
form with JavaScript off."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_LABELS, image_bytes
from synthetic import encode

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TIMEOUT_MS = 15_000

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: `make system-deps`)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    from conftest import LiveServer

    live = LiveServer(model_root, tmp_path_factory.mktemp("browser-server"), workers=1,
                      threads=4)
    live.wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def files(tmp_path):
    paths = {
        "red.jpg": image_bytes((240, 20, 20), size=(64, 48), fmt="JPEG"),
        "green.png": image_bytes((10, 230, 10)),
        "notes.txt": b"this is not an image",
    }
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in paths}


def drop_or_paste(page, kind: str, data: bytes, name: str) -> None:
    """Fire a real drop (on the drop zone) or paste (on the document) event carrying a file."""
    page.evaluate(
        """([kind, b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            if (kind === "drop") {
                const zone = document.getElementById("dropzone");
                zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer,
                                                               bubbles: true, cancelable: true}));
                zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true,
                                                          cancelable: true}));
            } else {
                document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer,
                                                                    bubbles: true,
                                                                    cancelable: true}));
            }
        }""",
        [kind, base64.b64encode(data).decode(), name],
    )


def done(page, count: int) -> None:
    """Wait until `count` result cards have their answer (locators, not page-side eval: the
    page's Content-Security-Policy forbids eval, as it should)."""
    sync_api.expect(page.locator("#results .result:not(.pending)")).to_have_count(
        count, timeout=TIMEOUT_MS)


def test_javascript_ui(browser, server, files):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.set_default_timeout(TIMEOUT_MS)
    assert page.locator("#model-name").inner_text() == "cifar10"

    # Keyboard: the first Tab stop is the labelled file picker.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file-input"
    assert page.get_by_label("Choose one or more images").count() == 1

    # Several files at once, one of them not an image.
    page.set_input_files("#file-input", [str(files["red.jpg"]), str(files["notes.txt"]),
                                         str(files["green.png"])])
    done(page, 3)
    cards = page.locator("#results .result")
    by_name = {cards.nth(i).locator(".filename").inner_text(): cards.nth(i) for i in range(3)}
    red = by_name["red.jpg"]
    assert red.locator(".top-label").inner_text() == "airplane"
    assert red.locator(".topk li").count() == 5
    assert red.locator(".topk-pct").first.inner_text().endswith("%")
    assert by_name["green.png"].locator(".top-label").inner_text() == "automobile"
    error = by_name["notes.txt"].locator(".error")
    assert "not a supported image" in error.inner_text()  # the server's own message
    assert error.get_attribute("role") == "alert"
    assert page.get_attribute("#upload-form", "aria-busy") == "false"
    assert "2 classified, 1 failed" in page.inner_text("#status")

    # Drag and drop, then paste from the clipboard.
    drop_or_paste(page, "drop", image_bytes((20, 20, 240)), "dropped.png")
    done(page, 4)
    assert cards.first.locator(".top-label").inner_text() == "bird"
    drop_or_paste(page, "paste", image_bytes((250, 0, 0)), "pasted.png")
    done(page, 5)
    assert cards.first.locator(".top-label").inner_text() in CIFAR10_LABELS
    assert cards.first.locator("img.preview").count() == 1

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-browser-js.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: still one usable column
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(ARTIFACTS / "serve-browser-phone.png"), full_page=True)

    page.click("#clear-button")
    assert cards.count() == 0
    assert errors == []
    page.close()


def test_form_without_javascript(browser, server, files):
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.set_input_files("#file-input", [str(files["red.jpg"]), str(files["green.png"])])
    with page.expect_navigation():
        page.click("#submit-button")
    labels = page.locator(".result .top-label").all_inner_texts()
    assert labels == ["airplane", "automobile"]
    assert page.locator(".result .topk li").count() == 10
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-browser-nojs.png"), full_page=True)

    page.goto(server.url + "/")
    page.set_input_files("#file-input", str(files["notes.txt"]))
    with page.expect_navigation():
        page.click("#submit-button")
    assert "not a supported image" in page.locator(".result .error").inner_text()
    context.close()


def test_the_browser_is_the_debian_chromium(browser):
    """Playwright drove /usr/bin/chromium, not a browser of its own download."""
    found = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, text=True,
                           timeout=30).stdout
    assert browser.version and f"Chromium {browser.version} " in found, (browser.version, found)


@pytest.fixture(scope="module")
def rich_server(tmp_path_factory):
    """A model with every file the model page reads: log.csv, calibration, mistakes, ..."""
    from conftest import LiveServer
    from test_serve_model_page import rich_version

    root = tmp_path_factory.mktemp("rich-model") / "cifar10"
    rich_version(root)
    live = LiveServer(root, tmp_path_factory.mktemp("rich-server"), workers=1, threads=4)
    live.wait_ready()
    yield live
    live.stop()


@pytest.mark.parametrize("width,height,name", [(1280, 900, "desktop"), (390, 844, "phone")])
def test_model_page(browser, rich_server, width, height, name):
    """Reached from the model card; every section drawn; fits a phone without sideways
    scrolling (the confusion matrix may scroll inside its own box)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(rich_server.url + "/")
    with page.expect_navigation():
        page.click("#model-page-link")
    assert page.url.endswith("/models/cifar10")
    assert page.locator("h1").inner_text().startswith("cifar10")
    assert page.locator("#per-class tbody tr").count() == 10
    assert page.locator("#confusion tbody tr").count() == 10
    assert page.locator("#curves svg polyline").count() == 4  # loss and accuracy, train and val
    assert page.locator("#calibration img").evaluate("img => img.naturalWidth") == 20
    thumbnails = page.locator("#mistakes img")
    assert thumbnails.count() == 5
    assert thumbnails.first.evaluate("img => img.naturalWidth") == 32  # a real, decoded PNG
    assert page.locator("#curves svg").first.bounding_box()["width"] > 250  # legible
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"model-page-{name}.png"), full_page=True)
    assert errors == []
    page.close()


def test_explanations_on_request(browser, server, tmp_path):
    """With the box ticked, each answer shows the image the model saw, tinted where it drove
    the answer; with JavaScript and without."""
    image = np.full((32, 32, 3), 110, np.uint8)
    image[:8, :8] = (250, 20, 20)  # the red the tiny model calls airplane, in one corner
    path = tmp_path / "corner.png"
    path.write_bytes(encode(image))

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.check("#explain-input")
    page.set_input_files("#file-input", str(path))
    done(page, 1)
    figure = page.locator("#results .result .explanation")
    assert "airplane" in figure.locator("figcaption").inner_text()
    overlay = figure.locator("img")
    assert overlay.evaluate("img => img.naturalWidth") == 32
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-browser-explain.png"), full_page=True)
    page.uncheck("#explain-input")
    page.set_input_files("#file-input", str(path))
    done(page, 2)
    assert page.locator("#results .result").first.locator(".explanation").count() == 0
    page.close()

    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.check("#explain-input")
    page.set_input_files("#file-input", str(path))
    with page.expect_navigation():
        page.click("#submit-button")
    assert page.locator(".result .explanation img").count() == 1
    assert page.is_checked("#explain-input")  # the answer page keeps the choice
    context.close()
