"""Feedback from the web page in a real browser, with JavaScript (the feedback API, one card at
a time) and without (the result page's forms)."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import LiveServer, image_bytes
from test_serve_browser import TIMEOUT_MS, browser, done, sync_api  # noqa: F401, F811 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def feedback_server(model_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("feedback-browser")
    live = LiveServer(model_root, logs, workers=1, threads=4,
                      config={"FEEDBACK_DB": str(logs / "feedback.sqlite3")})
    live.wait_ready()
    yield live, logs / "feedback.sqlite3"
    live.stop()



def rows(db) -> list[tuple]:
    return sqlite3.connect(db).execute(
        "SELECT label, predicted, source FROM feedback ORDER BY id").fetchall()


@pytest.mark.parametrize("javascript", [True, False], ids=["javascript", "no-javascript"])
def test_a_correction_from_the_page_is_stored(feedback_server, browser, tmp_path,  # noqa: F811
                                              javascript):
    # The server first, so it is stopped after the browser has closed its connections.
    server, db = feedback_server
    before = len(rows(db)) if db.exists() else 0
    image = tmp_path / "red.png"
    image.write_bytes(image_bytes((240, 20, 20)))
    context = browser.new_context(java_script_enabled=javascript)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.set_input_files("#file-input", str(image))
    if javascript:
        done(page, 1)
    else:
        with page.expect_navigation():
            page.click("#submit-button")
    form = page.locator(".result form.feedback").first
    form.locator("select").select_option("bird")
    if javascript:
        form.get_by_role("button", name="Send correction").click()
        sync_api.expect(form.get_by_role("status")).to_have_text(
            "Thank you: saved as \u201cbird\u201d.")
    else:
        with page.expect_navigation():
            form.get_by_role("button", name="Send correction").click()
        assert "saved as 'bird'" in page.locator("#page-notice").inner_text()
    context.close()
    assert rows(db)[before:] == [("bird", "airplane", "api" if javascript else "page")]
