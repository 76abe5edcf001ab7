"""The decode budget: a worker's threads together hold at most DECODE_BUDGET_PIXELS decoded pixels;
an image that does not fit is refused with 503 and Retry-After, and every path lets go of what it
held. The memory it buys under concurrent load is measured against the real server in
test_serve_hostile.py."""

from __future__ import annotations

import base64

import pytest
from conftest import image_bytes
from hostile_inputs import browser_form, noise_png, png

from convnet.serve import create_app
from convnet.serve.decode import DecodeBudget
from convnet.serve.errors import ApiError

URL = "/api/v1/predict"
SIDE = 100  # the small app's largest image is SIDE x SIDE


@pytest.fixture
def small_app(model_root):
    return create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                       "MAX_IMAGE_PIXELS": SIDE * SIDE, "MAX_IMAGES_PER_REQUEST": 4})


def budget_of(app) -> DecodeBudget:
    return app.extensions["convnet.decode_budget"]


def test_budget_admits_up_to_its_capacity_and_no_further():
    refused = []
    budget = DecodeBudget(100, on_refuse=lambda: refused.append(1))
    with budget.reserve(60), budget.reserve(40):
        assert budget.in_use == 100
        with pytest.raises(ApiError) as err, budget.reserve(1):
            pass
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}
    assert budget.in_use == 0 and refused == [1]
    with budget.reserve(100):  # all of it, once the others are done
        pass


def test_budget_is_let_go_when_the_block_raises():
    budget = DecodeBudget(100)
    with pytest.raises(RuntimeError), budget.reserve(70):
        raise RuntimeError("decoder crashed")
    assert budget.in_use == 0


def test_default_budget_is_one_largest_image_and_never_less(model_root, monkeypatch):
    app = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                      "MAX_IMAGE_PIXELS": 5000})
    assert app.config["DECODE_BUDGET_PIXELS"] == 5000 and budget_of(app).capacity == 5000
    monkeypatch.setenv("CONVNET_DECODE_BUDGET_PIXELS", "12345")
    assert create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                       "MAX_IMAGE_PIXELS": 5000}).config["DECODE_BUDGET_PIXELS"] == 12345
    with pytest.raises(ValueError, match="at least MAX_IMAGE_PIXELS"):
        create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                    "MAX_IMAGE_PIXELS": 5000, "DECODE_BUDGET_PIXELS": 4999})


def test_an_idle_worker_decodes_the_largest_image_allowed(small_app):
    largest = image_bytes(size=(SIDE, SIDE))
    response = small_app.test_client().post(URL, data=largest, content_type="image/png")
    assert response.status_code == 200


def post_kwargs(door: str, data: bytes) -> dict:
    """Test-client arguments sending the image `data` through `door`."""
    b64 = base64.b64encode(data).decode()
    return {
        "raw body": {"data": data, "content_type": "image/png"},
        "multipart": browser_form([(b"a.png", data)]),
        "json b64": {"json": {"instances": [{"b64": b64}]}},
        "tf predict": {"json": {"instances": [{"b64": b64}]}},
        "tf classify": {"json": {"examples": [{"image": {"b64": b64}}]}},
        "v2 bytes": {"json": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                          "data": [b64]}]}},
    }[door]


DOORS = {"raw body": URL, "multipart": URL, "json b64": URL,
         "tf predict": "/v1/models/cifar10:predict", "tf classify": "/v1/models/cifar10:classify",
         "v2 bytes": "/v2/models/cifar10/infer"}


@pytest.mark.parametrize("door", DOORS)
def test_a_full_budget_answers_503_with_retry_after_on_every_door(small_app, door):
    """Another thread holds all but 50 x 50 - 1 pixels: a 50 x 50 image does not fit, a 49 x 49
    one does."""
    client, budget = small_app.test_client(), budget_of(small_app)
    with budget.reserve(budget.capacity - 50 * 50 + 1):
        response = client.post(DOORS[door], **post_kwargs(door, image_bytes(size=(50, 50))))
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "retry" in response.get_json()["error"]
        fits = client.post(DOORS[door], **post_kwargs(door, image_bytes(size=(49, 49))))
        assert fits.status_code == 200, fits.get_json()
    metrics = client.get("/metrics").get_data(as_text=True).splitlines()
    assert "convnet_decode_budget_refusals_total 1.0" in metrics
    assert budget.in_use == 0


def test_the_web_form_answers_503_with_retry_after(small_app):
    client, budget = small_app.test_client(), budget_of(small_app)
    with budget.reserve(budget.capacity):
        response = client.post("/", **browser_form([(b"a.png", image_bytes(size=(50, 50)))]))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.mimetype == "text/html" and b"retry" in response.data


def test_every_failure_lets_go_of_the_budget(small_app, monkeypatch):
    client, budget = small_app.test_client(), budget_of(small_app)
    good = image_bytes(size=(60, 60))
    failing = {
        "truncated pixel data": noise_png(60)[:-200],
        "rows missing": png(60, 60, color_type=2, bit_depth=8, rows=30),
        "over the pixel limit": image_bytes(size=(SIDE + 1, SIDE)),
        "not an image": b"<html></html>",
    }
    for name, data in failing.items():
        response = client.post(URL, data=data, content_type="image/png")
        assert response.status_code in (400, 413), name
        assert budget.in_use == 0, name
    # The second of two images fails after the first was decoded and let go.
    form = browser_form([(b"a.png", good), (b"b.png", failing["rows missing"])])
    assert client.post(URL, **form).status_code == 400 and budget.in_use == 0

    model = small_app.extensions["convnet.registry"].served.default.current
    monkeypatch.setattr(type(model), "predict", lambda self, pixels: 1 / 0)
    assert client.post(URL, data=good, content_type="image/png").status_code == 500
    assert budget.in_use == 0
