"""The web page in a real browser (Chromium via Playwright) against the real server: the
JavaScript UI (file picker, several files, drag and drop, paste, inline errors) and the plain
form with JavaScript off."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from conftest import CIFAR10_LABELS, image_bytes

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
