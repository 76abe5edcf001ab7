"""TensorFlow Serving's REST API: status, metadata, predict (row and columnar), classify."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from conftest import CIFAR10_LABELS

BASE = "/v1/models/cifar10"


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def solid(color) -> list:
    return np.broadcast_to(np.array(color), (32, 32, 3)).tolist()


def test_status(client):
    for url in (BASE, BASE + "/versions/1"):
        response = client.get(url)
        assert response.status_code == 200
        assert response.get_json() == {"model_version_status": [{
            "version": "1", "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]}


def test_metadata(client):
    response = client.get(BASE + "/metadata")
    assert response.status_code == 200
    body = response.get_json()
    assert body["model_spec"] == {"name": "cifar10", "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    (pixels,) = signature["inputs"].values()
    assert pixels["dtype"] == "DT_UINT8"
    assert [d["size"] for d in pixels["tensor_shape"]["dim"]] == ["-1", "32", "32", "3"]
    output = signature["outputs"]["probabilities"]
    assert [d["size"] for d in output["tensor_shape"]["dim"]] == ["-1", "10"]
    assert client.get(BASE + "/versions/1/metadata").status_code == 200


def test_predict_rows_of_b64_images(client, red_png, green_jpeg):
    response = client.post(BASE + ":predict",
                           json={"instances": [b64(red_png), b64(green_jpeg)]})
    assert response.status_code == 200
    predictions = np.array(response.get_json()["predictions"])
    assert predictions.shape == (2, 10)
    assert np.allclose(predictions.sum(axis=1), 1, atol=1e-5)
    assert list(predictions.argmax(axis=1)) == [0, 1]


def test_predict_rows_of_pixel_arrays_with_version(client):
    payload = {"signature_name": "serving_default",
               "instances": [solid((0, 0, 255)), solid((255, 0, 0))]}
    response = client.post(BASE + "/versions/1:predict", json=payload)
    assert response.status_code == 200
    assert np.argmax(response.get_json()["predictions"], axis=1).tolist() == [2, 0]


def test_predict_named_input_rows(client, red_png):
    response = client.post(BASE + ":predict", json={"instances": [{"pixels": b64(red_png)}]})
    assert response.status_code == 200


def test_predict_columnar(client, red_png):
    for inputs in ([solid((0, 255, 0))], {"pixels": [solid((0, 255, 0))]}, [b64(red_png)]):
        response = client.post(BASE + ":predict", json={"inputs": inputs})
        assert response.status_code == 200
        outputs = response.get_json()["outputs"]
        assert np.array(outputs).shape == (1, 10)


def test_predict_matches_the_json_api(client, red_png):
    tf = client.post(BASE + ":predict", json={"instances": [b64(red_png)]}).get_json()
    api = client.post("/api/v1/predict", data=red_png, content_type="image/png").get_json()
    assert tf["predictions"][0][0] == pytest.approx(api["predictions"][0]["probability"])


def test_curl_default_content_type_is_accepted(client, red_png):
    # `curl -d` (TF Serving's own examples) sends application/x-www-form-urlencoded.
    response = client.post(BASE + ":predict", data=f'{{"instances": [{{"b64": '
                           f'"{b64(red_png)["b64"]}"}}]}}',
                           content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200


def test_classify(client, red_png, green_jpeg):
    payload = {"examples": [{"image": b64(red_png), "caption": "x"},
                            {"image/encoded": [b64(green_jpeg)]}]}
    response = client.post(BASE + ":classify", json=payload)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 2
    for result, expected in zip(results, ["airplane", "automobile"], strict=True):
        assert [label for label, _ in result] == CIFAR10_LABELS
        assert max(result, key=lambda pair: pair[1])[0] == expected
    assert client.post(BASE + "/versions/1:classify", json=payload).status_code == 200


def nan_image():
    image = solid((1, 2, 3))
    image[0][0][0] = float("nan")
    return image


BAD = {
    "unknown model": ("/v1/models/mnist:predict", {"instances": [solid((0, 0, 0))]}, 404,
                      "not found"),
    "unknown version": (BASE + "/versions/7:predict", {"instances": [solid((0, 0, 0))]}, 404,
                        "version 7"),
    "both instances and inputs": (BASE + ":predict", {"instances": [], "inputs": []}, 400,
                                  "not both"),
    "neither": (BASE + ":predict", {"foo": 1}, 400, "instances"),
    "wrong signature": (BASE + ":predict", {"signature_name": "other", "instances": []}, 400,
                        "signature"),
    "wrong shape": (BASE + ":predict", {"instances": [[[1, 2, 3]]]}, 400, "shape [1, 1, 3]"),
    "wrong instance shape in mix": (BASE + ":predict", {"instances": [
        {"b64": "AAAA"}, [[1, 2]]]}, 400, "instances[0]"),
    "out of range": (BASE + ":predict", {"instances": [solid((0, 0, 300))]}, 400, "0..255"),
    "negative": (BASE + ":predict", {"instances": [solid((0, -1, 0))]}, 400, "0..255"),
    "fractional": (BASE + ":predict", {"instances": [solid((0.5, 0, 0))]}, 400, "whole"),
    "NaN": (BASE + ":predict", {"instances": [nan_image()]}, 400, "NaN"),
    "strings as pixels": (BASE + ":predict", {"instances": [[["a"] * 3] * 32] * 1}, 400,
                          "string"),
    "bad base64": (BASE + ":predict", {"instances": [{"b64": "%%%"}]}, 400, "base64"),
    "not an image": (BASE + ":predict", {"instances": [{"b64": "aGVsbG8="}]}, 400,
                     "not a supported image"),
    "two named inputs": (BASE + ":predict", {"instances": [{"a": [], "b": []}]}, 400,
                         "one input"),
    "instances not a list": (BASE + ":predict", {"instances": 3}, 400, "list"),
    "too many": (BASE + ":predict", {"instances": [{"b64": "AAAA"}] * 65}, 400, "too many"),
    "classify without examples": (BASE + ":classify", {"instances": []}, 400, "examples"),
    "classify without image": (BASE + ":classify", {"examples": [{"x": 1.0}]}, 400,
                               "found 0"),
    "classify bad image": (BASE + ":classify", {"examples": [{"image": {"b64": "aGk="}}]}, 400,
                           "examples[0]"),
}


@pytest.mark.parametrize("url,payload,status,words", BAD.values(), ids=BAD.keys())
def test_bad_requests(client, url, payload, status, words):
    response = client.post(url, json=payload)
    assert response.status_code == status
    assert words in response.get_json()["error"]


@pytest.mark.parametrize("body,content_type,status", [
    (b"{", "application/json", 400),
    (b"", "application/json", 400),
    (b'{"instances": []}', "image/png", 415),
])
def test_body_errors(client, body, content_type, status):
    response = client.post(BASE + ":predict", data=body, content_type=content_type)
    assert response.status_code == status
    assert "error" in response.get_json()


def test_unknown_model_status_is_404_json(client):
    response = client.get("/v1/models/mnist")
    assert response.status_code == 404
    assert "mnist" in response.get_json()["error"]
    assert client.get(BASE + "/versions/2").status_code == 404
    assert client.get("/v1/models/mnist/metadata").status_code == 404
