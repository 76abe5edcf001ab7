"""KServe Open Inference Protocol V2 (REST): health, metadata, infer."""

from __future__ import annotations

import base64

import numpy as np
import pytest

BASE = "/v2/models/cifar10"


def pixels(*colors) -> np.ndarray:
    return np.stack([np.broadcast_to(np.array(c, dtype=np.uint8), (32, 32, 3)) for c in colors])


def tensor(data, shape, datatype="UINT8", name="pixels") -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": data}


def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    body = client.get("/v2").get_json()
    assert body["name"] == "convnet" and "version" in body
    assert body["extensions"] == ["binary_tensor_data"]


def test_model_metadata_and_ready(client):
    body = client.get(BASE).get_json()
    assert body["name"] == "cifar10" and body["versions"] == ["1"]
    assert body["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get(BASE + "/versions/1").status_code == 200
    assert client.get(BASE + "/ready").get_json() == {"name": "cifar10", "ready": True}
    assert client.get(BASE + "/versions/1/ready").status_code == 200


def test_infer_uint8_flat_with_id_and_outputs(client):
    batch = pixels((255, 0, 0), (0, 0, 255))
    payload = {"id": "req-42", "inputs": [tensor(batch.ravel().tolist(), batch.shape)],
               "outputs": [{"name": "probabilities"}]}
    response = client.post(BASE + "/infer", json=payload)
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == "req-42"
    assert (body["model_name"], body["model_version"]) == ("cifar10", "1")
    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32",
                                                                      [2, 10])
    probs = np.array(output["data"]).reshape(output["shape"])
    assert probs.argmax(axis=1).tolist() == [0, 2]


def test_infer_fp32_nested_is_rounded(client):
    batch = pixels((0, 255, 0)).astype(np.float32) - 0.3
    batch = np.clip(batch, 0, 255)
    response = client.post(BASE + "/versions/1/infer",
                           json={"inputs": [tensor(batch.tolist(), batch.shape, "FP32")]})
    assert response.status_code == 200
    assert np.argmax(response.get_json()["outputs"][0]["data"]) == 1


def test_infer_bytes(client, red_png, green_jpeg):
    data = [base64.b64encode(b).decode() for b in (green_jpeg, red_png)]
    for shape, values in (([2], data), ([2, 1], [[d] for d in data])):
        response = client.post(BASE + "/infer", json={"inputs": [tensor(values, shape, "BYTES",
                                                                         "image")]})
        assert response.status_code == 200
        probs = np.array(response.get_json()["outputs"][0]["data"]).reshape(2, 10)
        assert probs.argmax(axis=1).tolist() == [1, 0]


def test_matches_the_json_api(client, red_png):
    v2 = client.post(BASE + "/infer", json={"inputs": [tensor(
        [base64.b64encode(red_png).decode()], [1], "BYTES")]}).get_json()
    api = client.post("/api/v1/predict", data=red_png, content_type="image/png").get_json()
    assert max(v2["outputs"][0]["data"]) == pytest.approx(api["predictions"][0]["probability"])


ONE = pixels((1, 2, 3))
BAD = {
    "unknown model": ("/v2/models/other/infer", {"inputs": []}, 404, "not found"),
    "unknown version": (BASE + "/versions/3/infer", {"inputs": []}, 404, "version 3"),
    "non-integer version": (BASE + "/versions/latest/infer", {"inputs": []}, 404, "integers"),
    "no inputs": (BASE + "/infer", {"id": "x"}, 400, "inputs"),
    "two inputs": (BASE + "/infer", {"inputs": [tensor([], [0]), tensor([], [0])]}, 400,
                   "exactly one"),
    "id not a string": (BASE + "/infer", {"id": 5, "inputs": []}, 400, "id"),
    "wrong shape": (BASE + "/infer", {"inputs": [tensor([0] * 12, [1, 2, 2, 3])]}, 400,
                    "[N, 32, 32, 3]"),
    "data does not fill shape": (BASE + "/infer", {"inputs": [tensor([0] * 10, ONE.shape)]},
                                 400, "do not fill"),
    "bad shape type": (BASE + "/infer", {"inputs": [tensor([], "1,32,32,3")]}, 400, "shape"),
    "unsupported datatype": (BASE + "/infer", {"inputs": [tensor([], ONE.shape, "INT64")]},
                             400, "INT64"),
    "uint8 out of range": (BASE + "/infer", {"inputs": [tensor(
        (ONE.astype(int) + 300).ravel().tolist(), ONE.shape)]}, 400, "0..255"),
    "uint8 fractional": (BASE + "/infer", {"inputs": [tensor(
        (ONE + 0.5).ravel().tolist(), ONE.shape)]}, 400, "whole"),
    "fp32 infinity": (BASE + "/infer", {"inputs": [tensor(
        [float("inf")] + [0.0] * (ONE.size - 1), ONE.shape, "FP32")]}, 400, "NaN or Infinity"),
    "no data": (BASE + "/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]},
                400, "no data"),
    "bytes count mismatch": (BASE + "/infer", {"inputs": [tensor(["AAAA"], [2], "BYTES")]},
                             400, "shape says 2"),
    "bytes bad base64": (BASE + "/infer", {"inputs": [tensor(["!!"], [1], "BYTES")]}, 400,
                         "base64"),
    "bytes not an image": (BASE + "/infer", {"inputs": [tensor(["aGVsbG8="], [1], "BYTES")]},
                           400, "not a supported image"),
    "unknown output": (BASE + "/infer", {"inputs": [tensor(ONE.ravel().tolist(), ONE.shape)],
                                         "outputs": [{"name": "logits"}]}, 400, "logits"),
    "too many": (BASE + "/infer", {"inputs": [tensor([], [65, 32, 32, 3])]}, 400, "too many"),
}


@pytest.mark.parametrize("url,payload,status,words", BAD.values(), ids=BAD.keys())
def test_bad_requests(client, url, payload, status, words):
    response = client.post(url, json=payload)
    assert response.status_code == status
    assert words in response.get_json()["error"]


def test_malformed_json(client):
    response = client.post(BASE + "/infer", data=b"{nope", content_type="application/json")
    assert response.status_code == 400
    assert "malformed JSON" in response.get_json()["error"]
