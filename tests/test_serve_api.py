"""POST /api/v1/predict: every way in, and every way to get it wrong."""

from __future__ import annotations

import base64
import io

import pytest
from conftest import CIFAR10_LABELS, image_bytes
from hostile_inputs import browser_form, noise_png, png

from convnet.serve import create_app

URL = "/api/v1/predict"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_raw_image_body(client, red_png):
    response = client.post(URL, data=red_png, content_type="image/png")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["model"], body["version"]) == ("cifar10", 1)
    (prediction,) = body["predictions"]
    assert prediction["label"] == "airplane"
    top = prediction["top_k"]
    assert len(top) == 5
    assert top[0] == {"label": "airplane", "index": 0, "probability": prediction["probability"]}
    probabilities = [t["probability"] for t in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(t["label"] == CIFAR10_LABELS[t["index"]] for t in top)


def test_multipart_many_files_keep_request_order(client, red_png, green_jpeg):
    blue = image_bytes((0, 0, 255), fmt="BMP")
    files = [(io.BytesIO(red_png), "a.png"), (io.BytesIO(green_jpeg), "b.jpg"),
             (io.BytesIO(blue), "c.bmp")]
    response = client.post(URL, data={"file": files}, content_type="multipart/form-data")
    assert response.status_code == 200
    labels = [p["label"] for p in response.get_json()["predictions"]]
    assert labels == ["airplane", "automobile", "bird"]


def test_json_instances_and_top_k(client, red_png, green_jpeg):
    payload = {"instances": [{"b64": b64(green_jpeg)}, {"b64": b64(red_png)}]}
    response = client.post(URL + "?top_k=2", json=payload)
    assert response.status_code == 200
    predictions = response.get_json()["predictions"]
    assert [p["label"] for p in predictions] == ["automobile", "airplane"]
    assert all(len(p["top_k"]) == 2 for p in predictions)


def test_url_safe_unpadded_base64_is_accepted(client, red_png):
    text = base64.urlsafe_b64encode(red_png).decode().rstrip("=")
    response = client.post(URL, json={"instances": [{"b64": text}]})
    assert response.status_code == 200


def test_large_photo_is_cropped_and_resized(client):
    photo = image_bytes((250, 10, 10), size=(1200, 800), fmt="JPEG")
    response = client.post(URL, data=photo, content_type="image/jpeg")
    assert response.status_code == 200
    assert response.get_json()["predictions"][0]["label"] == "airplane"


def truncated_png() -> bytes:
    data = noise_png()
    return data[: len(data) // 2]


RED = image_bytes((255, 0, 0))
BAD_REQUESTS = {
    # id: (post kwargs, status, words the message must contain)
    "empty raw body": (dict(data=b"", content_type="image/png"), 400, "empty"),
    "text sent as jpeg": (dict(data=b"hello, world", content_type="image/jpeg"), 400,
                          "not a supported image"),
    "truncated png": (dict(data=truncated_png(), content_type="image/png"), 400, "truncated"),
    # A well-formed PNG whose (complete, valid) zlib stream holds only half the rows: Pillow
    # alone would decode it, zero-filling the rest.
    "png missing rows": (dict(data=png(64, 64, color_type=2, bit_depth=8, rows=32),
                              content_type="image/png"), 400, "pixel data ends early"),
    "svg is not allowed": (dict(data=b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                content_type="image/svg+xml"), 400, "not a supported image"),
    "decompression bomb": (dict(data=png(100_000, 100_000, rows=0), content_type="image/png"),
                           413, "too large"),
    "bad base64": (dict(json={"instances": [{"b64": "not base64!!"}]}), 400, "base64"),
    "b64 not a string": (dict(json={"instances": [{"b64": 42}]}), 400, "string"),
    "instance without b64": (dict(json={"instances": [{"data": "x"}]}), 400, "b64"),
    "instances not a list": (dict(json={"instances": "x"}), 400, "instances"),
    "no instances": (dict(json={"instances": []}), 400, "no images"),
    "json array body": (dict(data=b"[1, 2]", content_type="application/json"), 400, "object"),
    "malformed json": (dict(data=b'{"instances": [', content_type="application/json"), 400,
                       "malformed JSON"),
    "json not utf-8": (dict(data=b'{"a": "\xff"}', content_type="application/json"), 400,
                       "UTF-8"),
    "deeply nested json": (dict(data=b"[" * 100_000 + b"]" * 100_000,
                                content_type="application/json"), 400, "JSON"),
    "unsupported content type": (dict(data=b"<x/>", content_type="application/xml"), 415,
                                 "content type"),
    "no content type": (dict(data=RED), 415, "content type"),
    "multipart without file field": (dict(data={"other": "x"},
                                          content_type="multipart/form-data"), 400, "'file'"),
    "multipart empty file": (browser_form([(b"empty.png", b"")]), 400, "empty"),
    "multipart garbage": (dict(data=b"--xyz\r\ngarbage", content_type="multipart/form-data; "
                               "boundary=xyz"), 400, "malformed multipart body"),
    "multipart without boundary": (dict(data=b"--xyz--\r\n", content_type="multipart/form-data"),
                                   400, "boundary"),
    "multipart with 200 parts": (browser_form([(b"a.png", RED)] * 200), 400, "at most 144 parts"),
    "one bad image among good": (dict(data={"file": [(io.BytesIO(RED), "a.png"),
                                                     (io.BytesIO(b"nope"), "b.png")]},
                                      content_type="multipart/form-data"), 400, "image 2 of 2"),
}


@pytest.mark.parametrize("kwargs,status,words", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_a_clear_4xx(client, kwargs, status, words):
    response = client.post(URL, **kwargs)
    assert response.status_code == status
    assert response.is_json
    assert words in response.get_json()["error"]


@pytest.mark.parametrize("value", ["0", "11", "-1", "abc", "2.5"])
def test_bad_top_k(client, red_png, value):
    response = client.post(f"{URL}?top_k={value}", data=red_png, content_type="image/png")
    assert response.status_code == 400
    assert "top_k" in response.get_json()["error"]


def test_filename_is_never_echoed(client):
    files = {"file": (io.BytesIO(b"junk"), "<script>alert(1)</script>.png")}
    response = client.post(URL, data=files, content_type="multipart/form-data")
    assert response.status_code == 400
    assert b"script" not in response.data


@pytest.fixture
def small_app(model_root):
    return create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                       "MAX_CONTENT_LENGTH": 20_000, "MAX_IMAGES_PER_REQUEST": 3,
                       "MAX_IMAGE_PIXELS": 100 * 100})


def test_body_over_limit_is_413_json(small_app):
    response = small_app.test_client().post(URL, data=b"x" * 30_000, content_type="image/png")
    assert response.status_code == 413
    assert "limit is 20000 bytes" in response.get_json()["error"]


def test_multipart_over_limit_is_413_json(small_app):
    files = {"file": (io.BytesIO(b"x" * 30_000), "big.png")}
    response = small_app.test_client().post(URL, data=files, content_type="multipart/form-data")
    assert response.status_code == 413
    assert response.is_json


def test_pixels_over_limit_is_413(small_app):
    big = image_bytes(size=(101, 100))
    response = small_app.test_client().post(URL, data=big, content_type="image/png")
    assert response.status_code == 413
    assert "10100 pixels" in response.get_json()["error"]


def test_too_many_images_is_400(small_app, red_png):
    payload = {"instances": [{"b64": b64(red_png)}] * 4}
    response = small_app.test_client().post(URL, json=payload)
    assert response.status_code == 400
    assert "too many images: 4" in response.get_json()["error"]


def test_uploads_never_touch_the_disk(client, monkeypatch):
    import tempfile

    import werkzeug.formparser

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    # SpooledTemporaryFile rolls over into tempfile.TemporaryFile; Werkzeug's fallback calls
    # its own imported TemporaryFile.
    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(werkzeug.formparser, "TemporaryFile", no_disk, raising=False)
    noisy = noise_png(600, seed=1)  # ~1 MB: over Werkzeug's 500 kB spool
    # The body is built here: the test client would spool a big one to disk on its own side.
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="noise.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + noisy + b"\r\n--b--\r\n")
    response = client.post(URL, data=body, content_type="multipart/form-data; boundary=b")
    assert response.status_code == 200


def test_unexpected_error_is_json_500_without_traceback(app, client, red_png, monkeypatch):
    model = app.extensions["convnet.registry"].served.default.current

    def explode(pixels):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(type(model), "predict", lambda self, pixels: explode(pixels))
    response = client.post(URL, data=red_png, content_type="image/png")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error"}
    assert b"secret" not in response.data and b"Traceback" not in response.data


def test_unknown_route_and_method_are_json(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.is_json
    response = client.get(URL)
    assert response.status_code == 405 and response.is_json
    assert "POST" in response.headers["Allow"]


class TestCors:
    def test_off_by_default(self, client, red_png):
        response = client.post(URL, data=red_png, content_type="image/png",
                               headers={"Origin": "https://elsewhere.example"})
        assert "Access-Control-Allow-Origin" not in response.headers

    @pytest.fixture
    def cors_client(self, model_root, monkeypatch):
        monkeypatch.setenv("CONVNET_CORS_ORIGINS", "https://a.example, https://b.example")
        app = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0})
        assert app.config["CORS_ORIGINS"] == ["https://a.example", "https://b.example"]
        return app.test_client()

    def test_allowed_origin(self, cors_client, red_png):
        response = cors_client.post(URL, data=red_png, content_type="image/png",
                                    headers={"Origin": "https://b.example"})
        assert response.headers["Access-Control-Allow-Origin"] == "https://b.example"
        assert "Origin" in response.headers["Vary"]

    def test_other_origin(self, cors_client, red_png):
        response = cors_client.post(URL, data=red_png, content_type="image/png",
                                    headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in response.headers

    def test_preflight(self, cors_client):
        response = cors_client.options(URL, headers={
            "Origin": "https://a.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type"})
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://a.example"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["Access-Control-Allow-Headers"] == (
            "Content-Type, Authorization, X-API-Key, X-Request-Id")


def test_the_app_asks_once_whether_a_view_or_hook_is_a_coroutine(app, client, red_png,
                                                                   monkeypatch):
    import inspect

    from flask import Flask

    asked = []
    real = Flask.ensure_sync
    monkeypatch.setattr(Flask, "ensure_sync", lambda self, f: asked.append(f) or real(self, f))
    for _ in range(3):
        assert client.post("/api/v1/predict", data=red_png,
                           content_type="image/png").status_code == 200
    assert asked and len(asked) == len(set(asked))  # each function checked once, then remembered
    assert not any(inspect.iscoroutinefunction(f) for f in asked)
