"""The web page: GET / with the model card, and the no-JavaScript form posted to /."""

from __future__ import annotations

import pytest
from conftest import write_version
from hostile_inputs import browser_form

from convnet.serve import create_app


def form(*files):
    return browser_form([(name.encode(), data) for data, name in files])


def test_page_has_form_assets_and_model_card(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert '<form id="upload-form" method="post"' in html
    assert 'enctype="multipart/form-data"' in html
    assert '<label for="file-input"' in html and 'id="file-input" name="file"' in html
    assert "/static/app.js" in html and "/static/style.css" in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing external
    assert '<dd id="model-name">cifar10</dd>' in html
    assert '<dd id="model-version">1</dd>' in html
    assert "43.2%" in html  # metrics.json accuracy 0.4321
    for label in ("airplane", "truck"):
        assert f"<li>{label}</li>" in html
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize("name,mimetype", [("app.js", "text/javascript"),
                                           ("style.css", "text/css")])
def test_static_assets_are_served(client, name, mimetype):
    with client.get(f"/static/{name}") as response:
        assert response.status_code == 200 and response.mimetype == mimetype


def test_model_card_without_accuracy(tmp_path):
    root = tmp_path / "noacc"
    write_version(root, 4, metrics={})
    html = create_app({"MODEL_DIR": str(root), "RELOAD_INTERVAL": 0}).test_client().get("/").text
    assert "not recorded" in html and '<dd id="model-version">4</dd>' in html


def test_form_post_answers_a_result_page(client, red_png, green_jpeg):
    response = client.post("/", **form((red_png, "red.png"), (green_jpeg, "green.jpg")))
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert html.count('class="result"') == 2
    first, second = html.split('class="result"')[1:]
    assert "red.png" in first and '<strong class="top-label">airplane</strong>' in first
    assert "green.jpg" in second and '<strong class="top-label">automobile</strong>' in second
    assert html.count('class="topk-label"') == 10  # top-5 per image
    assert "data:image/png;base64," in html  # the 32x32 input, shown without JavaScript


def test_form_keeps_good_results_next_to_errors(client, red_png):
    response = client.post("/", **form((b"not an image", "notes.txt"), (red_png, "ok.png")))
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "not a supported image" in html and "airplane" in html


@pytest.mark.parametrize("files,status,words", [
    ([], 400, "choose one or more images"),
    ([(b"", "")], 400, "choose one or more images"),
    ([(b"GIF89a broken", "x.gif")], 400, "not a supported image"),
    ([(b"hello", "a.txt"), (b"", "b.png")], 400, "empty file"),
])
def test_form_errors_render_the_page(client, files, status, words):
    response = client.post("/", **form(*files))
    assert response.status_code == status
    assert response.mimetype == "text/html"
    assert words in response.get_data(as_text=True)


def test_form_escapes_file_names(client, red_png):
    name = '<img src=x onerror="alert(1)">.png'
    html = client.post("/", **form((red_png, name))).get_data(as_text=True)
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=" in html


def test_form_over_body_limit_is_an_html_413(model_root, red_png):
    app = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                      "MAX_CONTENT_LENGTH": 5_000})
    response = app.test_client().post("/", **form((red_png + b"x" * 10_000, "big.png")))
    assert response.status_code == 413
    assert response.mimetype == "text/html"
    assert "limit is 5000 bytes" in response.get_data(as_text=True)


def test_page_without_a_model_says_why(tmp_path):
    app = create_app({"MODEL_DIR": str(tmp_path / "empty"), "RELOAD_INTERVAL": 0})
    client = app.test_client()
    response = client.get("/")
    assert response.status_code == 503
    assert "No model is loaded yet" in response.get_data(as_text=True)
    assert client.post("/api/v1/predict", data=b"x", content_type="image/png").status_code == 503
