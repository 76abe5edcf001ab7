"""A model that takes 64x64 images, through every door: each decodes uploads at the served model's
size, checks pixel tensors against it, and reports [-1, 64, 64, 3] wherever it states a shape."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from conftest import image_bytes
from hostile_inputs import browser_form
from PIL import Image

from convnet.serve import create_app, decode
from convnet.serve.openapi import build_spec

S = 64
TF, V2 = "/v1/models/cifar10", "/v2/models/cifar10"
RED_PHOTO = image_bytes((250, 10, 10), size=(300, 200), fmt="JPEG")  # red -> airplane
BLUE_PNG = image_bytes((0, 0, 255), size=(S, S))  # blue -> bird


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def solid(color, size=S) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (size, size, 3))


@pytest.fixture
def client(model_root_64):
    app = create_app({"MODEL_DIR": str(model_root_64), "RELOAD_INTERVAL": 0, "TESTING": True})
    return app.test_client()


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[int]:
    """The `size` of every decode_image call the server makes."""
    sizes: list[int] = []
    real = decode.decode_image

    def spy(data, **kwargs):
        sizes.append(kwargs["size"])
        return real(data, **kwargs)

    monkeypatch.setattr(decode, "decode_image", spy)
    return sizes


def test_our_api_decodes_at_the_models_size(client, decoded_sizes):
    for kwargs in (dict(data=RED_PHOTO, content_type="image/jpeg"),
                   dict(json={"instances": [{"b64": b64(RED_PHOTO)}, {"b64": b64(BLUE_PNG)}]}),
                   dict(data={"file": [(io.BytesIO(BLUE_PNG), "b.png")]},
                        content_type="multipart/form-data")):
        response = client.post("/api/v1/predict", **kwargs)
        assert response.status_code == 200, response.get_json()
    assert [p["label"] for p in response.get_json()["predictions"]] == ["bird"]
    assert decoded_sizes == [S, S, S, S]


def test_web_page_says_the_size_and_shows_what_the_model_saw(client, decoded_sizes):
    page = client.get("/").text
    assert f'<dd id="model-input">{S}&times;{S} RGB pixels</dd>' in page
    assert f"resized to\n            {S}&times;{S} pixels" in page
    response = client.post("/", **browser_form([(b"red.jpg", RED_PHOTO)]))
    assert response.status_code == 200
    html = response.text
    assert '<strong class="top-label">airplane</strong>' in html
    assert f"as the model sees it ({S} by {S} pixels)" in html
    (thumbnail,) = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    seen = Image.open(io.BytesIO(base64.b64decode(thumbnail)))
    assert seen.size == (S, S)
    assert decoded_sizes == [S]


def test_tf_serving_metadata_predict_and_classify(client, decoded_sizes):
    signature = client.get(TF + "/metadata").get_json()["metadata"]["signature_def"][
        "signature_def"]["serving_default"]
    (pixels,) = signature["inputs"].values()
    assert [d["size"] for d in pixels["tensor_shape"]["dim"]] == ["-1", str(S), str(S), "3"]

    rows = {"instances": [solid((0, 0, 255)).tolist(), {"b64": b64(RED_PHOTO)}]}
    response = client.post(TF + ":predict", json=rows)
    assert response.status_code == 200
    assert np.argmax(response.get_json()["predictions"], axis=1).tolist() == [2, 0]
    columns = {"inputs": {"pixels": [solid((255, 0, 0)).tolist()]}}
    assert np.argmax(client.post(TF + ":predict", json=columns).get_json()["outputs"]) == 0
    examples = {"examples": [{"image": {"b64": b64(BLUE_PNG)}}]}
    (result,) = client.post(TF + ":classify", json=examples).get_json()["results"]
    assert max(result, key=lambda pair: pair[1])[0] == "bird"
    assert decoded_sizes == [S, S]


@pytest.mark.parametrize("payload", [
    {"instances": [solid((255, 0, 0), 32).tolist()]},
    {"inputs": [solid((255, 0, 0), 32).tolist()]},
    {"instances": [{"pixels": solid((255, 0, 0), 32).tolist()}, {"b64": b64(RED_PHOTO)}]},
], ids=["rows", "columns", "named rows"])
def test_tf_serving_refuses_32_pixel_arrays_naming_the_shape(client, payload):
    response = client.post(TF + ":predict", json=payload)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert re.search(rf"shape \[(1, )?32, 32, 3\], expected \[(N, )?{S}, {S}, 3\]$", error), error


def test_v2_metadata_and_infer(client, decoded_sizes):
    body = client.get(V2).get_json()
    assert body["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, S, S, 3]}]
    batch = np.stack([solid((0, 255, 0)), solid((0, 0, 255))])
    tensor = {"name": "pixels", "shape": list(batch.shape), "datatype": "UINT8",
              "data": batch.ravel().tolist()}
    response = client.post(V2 + "/infer", json={"inputs": [tensor]})
    assert response.status_code == 200
    output = response.get_json()["outputs"][0]
    assert np.reshape(output["data"], output["shape"]).argmax(axis=1).tolist() == [1, 2]
    encoded = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(RED_PHOTO)]}
    response = client.post(V2 + "/infer", json={"inputs": [encoded]})
    assert np.argmax(response.get_json()["outputs"][0]["data"]) == 0
    assert decoded_sizes == [S]


def test_v2_refuses_a_32_pixel_tensor_naming_the_shape(client):
    tensor = {"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8",
              "data": [0] * (32 * 32 * 3)}
    response = client.post(V2 + "/infer", json={"inputs": [tensor]})
    assert response.status_code == 400
    assert response.get_json()["error"] == (
        f"inputs[0].shape is [1, 32, 32, 3], expected [N, {S}, {S}, 3] for UINT8")


def test_openapi_documents_the_served_shapes(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["info"]["description"].startswith(f"Classify {S}x{S} RGB images")
    schemas = spec["components"]["schemas"]
    pixels = schemas["Pixels"]
    assert pixels["description"].startswith(f"[{S}, {S}, 3]")
    assert (pixels["minItems"], pixels["maxItems"]) == (S, S)
    assert (pixels["items"]["minItems"], pixels["items"]["maxItems"]) == (S, S)
    assert pixels["items"]["items"]["maxItems"] == 3
    assert schemas["V2Tensor"]["properties"]["shape"]["description"].startswith(
        f"[N, {S}, {S}, 3] for UINT8 and FP32")


def test_openapi_without_a_model_names_no_size():
    spec = build_spec(None)
    pixels = spec["components"]["schemas"]["Pixels"]
    assert "minItems" not in pixels and pixels["description"].startswith("[S, S, 3]")
    assert "32" not in str(spec["info"]) and "32" not in str(pixels)
