"""KServe V2's binary tensor data extension: NVIDIA's tritonclient against the real server with
its defaults, the answer's layout byte by byte, and a hand-built request for each malformation."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import LiveServer, http

from convnet.serve.v2_binary import HEADER_LENGTH

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

BASE = "/v2/models/cifar10"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)  # -> classes 0, 1, 2


def pixels(*colors) -> np.ndarray:
    """(N, 32, 32, 3) uint8, one solid colour per image."""
    return np.stack([np.broadcast_to(np.array(c, dtype=np.uint8), (32, 32, 3)) for c in colors])


def length_prefixed(*elements: bytes) -> bytes:
    """A BYTES tensor's binary form: each element after its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_body(header: dict, *tensors: bytes, length: int | str | None = None):
    """(body, headers) of a binary request: `header` as JSON, then the tensors' bytes.
    length: the Inference-Header-Content-Length to claim (the JSON's true length by default)."""
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {HEADER_LENGTH: str(len(head) if length is None else length)}


def binary_input(shape, datatype="UINT8", size=None, name="pixels") -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype,
            "parameters": {"binary_data_size": size}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root):
    live = LiveServer(model_root, tmp_path_factory.mktemp("triton"), workers=1, threads=2)
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.mark.slow
def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("cifar10") and triton.is_model_ready("cifar10", "1")
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    metadata = triton.get_model_metadata("cifar10")
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "UINT8",
                                   "shape": [-1, 32, 32, 3]}]
    assert metadata["outputs"][0]["name"] == "probabilities"


def _infer(triton, datatype: str, array: np.ndarray, **kwargs):
    tensor = httpclient.InferInput("pixels", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)  # binary_data=True: the client's default
    return triton.infer("cifar10", [tensor], **kwargs)


@pytest.mark.slow
def test_tritonclient_binary_inputs_with_its_defaults(triton, red_png, green_jpeg):
    batch = pixels(RED, BLUE, GREEN)
    images = np.array([green_jpeg, red_png], dtype=np.object_)
    cases = [("UINT8", batch, [0, 2, 1]), ("FP32", batch.astype(np.float32), [0, 2, 1]),
             ("BYTES", images, [1, 0])]
    for datatype, array, expected in cases:
        result = _infer(triton, datatype, array, request_id=f"id-{datatype}")
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and probs.shape == (len(expected), 10), datatype
        assert probs.argmax(axis=1).tolist() == expected, datatype
        # No outputs named: the client asked for binary ones, and got them.
        response = result.get_response()
        assert response["id"] == f"id-{datatype}"
        assert response["outputs"][0]["parameters"] == {"binary_data_size": probs.nbytes}
        assert "data" not in response["outputs"][0]


@pytest.mark.slow
def test_tritonclient_binary_and_json_outputs(triton):
    batch = pixels(GREEN, RED)
    for binary in (True, False):
        wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        result = _infer(triton, "UINT8", batch, outputs=wanted, model_version="1")
        assert result.as_numpy("probabilities").argmax(axis=1).tolist() == [1, 0]
        output = result.get_response()["outputs"][0]
        assert ("data" in output) is not binary and ("parameters" in output) is binary
    # JSON in, binary out: what the client sends for binary_data=False.
    tensor = httpclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    tensor.set_data_from_numpy(pixels(BLUE), binary_data=False)
    result = triton.infer("cifar10", [tensor])
    assert result.as_numpy("probabilities").argmax(axis=1).tolist() == [2]


@pytest.mark.slow
def test_tritonclient_sees_our_errors(triton, server):
    with pytest.raises(InferenceServerException) as caught:
        _infer(triton, "UINT8", np.zeros((1, 8, 8, 3), np.uint8))
    assert caught.value.status() == "400" and "[N, 32, 32, 3]" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        _infer(triton, "INT64", np.zeros((1, 32, 32, 3), np.int64))
    assert caught.value.status() == "400" and "INT64" in caught.value.message()
    # A malformed body through gunicorn, too: a JSON 400, not a dropped connection.
    body, headers = binary_body({"inputs": [binary_input([1, 32, 32, 3], size=3072)]},
                                bytes(3000))
    status, _, answer = http("POST", server.url + BASE + "/infer", body, headers)
    assert status == 400 and "only 3000 are left" in json.loads(answer)["error"]


def test_binary_answer_layout(client):
    batch = pixels(RED, GREEN)
    body, headers = binary_body({"id": "x", "inputs": [binary_input(batch.shape, size=batch.size)],
                                 "outputs": [{"name": "probabilities",
                                              "parameters": {"binary_data": True}}]},
                                batch.tobytes())
    response = client.post(BASE + "/infer", data=body, headers=headers,
                           content_type="application/octet-stream")
    assert response.status_code == 200
    assert response.content_type == "application/octet-stream"
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.data[:length])
    assert header == {"id": "x", "model_name": "cifar10", "model_version": "1", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 10],
         "parameters": {"binary_data_size": 80}}]}
    probs = np.frombuffer(response.data[length:], dtype="<f4").reshape(2, 10)
    assert probs.argmax(axis=1).tolist() == [0, 1]
    assert probs.sum(axis=1) == pytest.approx([1, 1], abs=1e-5)


def test_json_requests_are_answered_as_before(client):
    one = pixels(BLUE)
    plain = {"inputs": [{"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                         "data": one.ravel().tolist()}]}
    response = client.post(BASE + "/infer", json=plain)
    assert HEADER_LENGTH not in response.headers and response.is_json
    # A JSON request may ask for the answer in binary; a per-output false wins over it.
    asked = {**plain, "parameters": {"binary_data_output": True}}
    response = client.post(BASE + "/infer", json=asked)
    assert response.status_code == 200 and int(response.headers[HEADER_LENGTH]) > 0
    asked["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": False}}]
    assert client.post(BASE + "/infer", json=asked).is_json


def test_binary_bytes_of_shape_n_1(client, red_png):
    body, headers = binary_body({"inputs": [binary_input([1, 1], "BYTES", 4 + len(red_png),
                                                          name="image")]},
                                length_prefixed(red_png))
    response = client.post(BASE + "/infer", data=body, headers=headers)
    assert response.status_code == 200
    assert np.argmax(response.get_json()["outputs"][0]["data"]) == 0


def test_binary_body_over_the_limit_gets_413(model_root):
    from convnet.serve import create_app

    app = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0, "TESTING": True,
                      "MAX_CONTENT_LENGTH": 4096})
    batch = pixels(RED, GREEN)
    body, headers = binary_body({"inputs": [binary_input(batch.shape, size=batch.size)]},
                                batch.tobytes())
    response = app.test_client().post(BASE + "/infer", data=body, headers=headers)
    assert response.status_code == 413 and "limit is 4096" in response.get_json()["error"]


ONE = pixels(RED).tobytes()  # 3072 bytes
SHAPE = [1, 32, 32, 3]
# name -> (header JSON, bytes after it, claimed JSON length or None, words in the error)
MALFORMED = {
    "length not a number": ({"inputs": []}, b"", "12a", "whole number"),
    "length negative": ({"inputs": []}, b"", "-1", "whole number"),
    "length huge": ({"inputs": []}, b"", "9" * 5000, "whole number"),
    "length beyond body": ({"inputs": [binary_input(SHAPE, size=3072)]}, ONE, 10**6,
                           "body holds only"),
    "length cuts the JSON": ({"inputs": [binary_input(SHAPE, size=3072)]}, ONE, 20,
                             "malformed JSON"),
    "length zero": ({"inputs": []}, b"", 0, "empty JSON header"),
    "size does not match shape": ({"inputs": [binary_input(SHAPE, size=3071)]}, ONE[:-1], None,
                                  "takes 3072"),
    "fp32 size counted as uint8": ({"inputs": [binary_input(SHAPE, "FP32", 3072)]}, ONE, None,
                                   "(4 bytes each) takes 12288"),
    "unknown datatype": ({"inputs": [binary_input(SHAPE, "FLOAT32", 3072)]}, ONE, None,
                         "'FLOAT32' is not a V2 datatype"),
    "known but unsupported datatype": ({"inputs": [binary_input([1, 32, 32, 3], "INT8", 3072)]},
                                       ONE, None, "'INT8' is not supported"),
    "missing bytes": ({"inputs": [binary_input(SHAPE, size=3072)]}, ONE[:100], None,
                      "only 100 are left"),
    "trailing bytes": ({"inputs": [binary_input(SHAPE, size=3072)]}, ONE + b"xyz", None,
                       "3 trailing bytes"),
    "trailing bytes, no binary input": ({"inputs": [{"name": "p", "shape": [1], "datatype":
                                                     "BYTES", "data": ["AAAA"]}]}, b"x", None,
                                        "1 trailing bytes"),
    "size negative": ({"inputs": [binary_input(SHAPE, size=-1)]}, b"", None,
                      "binary_data_size must be a whole number"),
    "size not a number": ({"inputs": [binary_input(SHAPE, size="3072")]}, ONE, None,
                          "binary_data_size must be a whole number"),
    "data and size both": ({"inputs": [{**binary_input(SHAPE, size=3072), "data": [1]}]}, ONE,
                           None, "both data and"),
    "parameters not an object": ({"inputs": [{**binary_input(SHAPE), "parameters": [3072]}]},
                                 ONE, None, "parameters must be an object"),
    "bad shape": ({"inputs": [binary_input("1,32,32,3", size=3072)]}, ONE, None,
                  "shape must be a list"),
    "bytes size too small": ({"inputs": [binary_input([2], "BYTES", 7)]}, bytes(7), None,
                             "too small for shape [2]"),
    "bytes element runs past size": ({"inputs": [binary_input([1], "BYTES", 8)]},
                                     struct.pack("<I", 100) + b"abcd", None,
                                     "element 0 is 100 bytes long, but only 4"),
    "bytes cut inside a length": ({"inputs": [binary_input([2], "BYTES", 9)]},
                                  length_prefixed(b"ab") + b"\0\0\0", None,
                                  "ends before the length of element 1"),
    "bytes trailing inside size": ({"inputs": [binary_input([1], "BYTES", 10)]},
                                   length_prefixed(b"ab") + b"zzzz", None,
                                   "4 trailing bytes after the 1 BYTES elements"),
    "bytes not an image": ({"inputs": [binary_input([1], "BYTES", 9)]}, length_prefixed(b"hello"),
                           None, "not a supported image"),
    "binary_data_output not a flag": ({"inputs": [binary_input(SHAPE, size=3072)],
                                       "parameters": {"binary_data_output": "yes"}}, ONE, None,
                                      "binary_data_output must be true or false"),
    "binary_data not a flag": ({"inputs": [binary_input(SHAPE, size=3072)], "outputs": [
        {"name": "probabilities", "parameters": {"binary_data": 1}}]}, ONE, None,
        "outputs[0].parameters.binary_data must be"),
    "request parameters not an object": ({"inputs": [binary_input(SHAPE, size=3072)],
                                          "parameters": 5}, ONE, None,
                                         "parameters must be an object"),
    "output parameters not an object": ({"inputs": [binary_input(SHAPE, size=3072)], "outputs": [
        {"name": "probabilities", "parameters": 5}]}, ONE, None,
        "outputs[0].parameters must be an object"),
    "classification asked": ({"inputs": [binary_input(SHAPE, size=3072)], "outputs": [
        {"name": "probabilities", "parameters": {"classification": 3}}]}, ONE, None,
        "classification extension is not supported"),
    "nan in fp32": ({"inputs": [binary_input(SHAPE, "FP32", 12288)]},
                    np.full(3072, np.nan, "<f4").tobytes(), None, "NaN or Infinity"),
}


@pytest.mark.parametrize("header,tail,length,words", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_binary_request_gets_400(client, header, tail, length, words):
    body, headers = binary_body(header, tail, length=length)
    response = client.post(BASE + "/infer", data=body, headers=headers)
    assert response.status_code == 400, response.get_json()
    assert words in response.get_json()["error"]


def test_json_input_parameters_are_not_read(client):
    """Inputs with JSON data keep today's answer whatever their parameters hold."""
    tensor = {"name": "pixels", "shape": SHAPE, "datatype": "UINT8", "parameters": 5,
              "data": pixels(GREEN).ravel().tolist()}
    response = client.post(BASE + "/infer", json={"inputs": [tensor]})
    assert response.status_code == 200
    assert np.argmax(response.get_json()["outputs"][0]["data"]) == 1


def test_binary_size_without_the_length_header(client):
    response = client.post(BASE + "/infer", json={"inputs": [binary_input(SHAPE, size=3072)]})
    assert response.status_code == 400
    assert "no Inference-Header-Content-Length" in response.get_json()["error"]


def test_binary_request_with_a_foreign_content_type_gets_415(client):
    body, headers = binary_body({"inputs": [binary_input(SHAPE, size=3072)]}, ONE)
    response = client.post(BASE + "/infer", data=body, headers=headers, content_type="image/png")
    assert response.status_code == 415 and "application/octet-stream" in response.get_json()[
        "error"]


def test_openapi_documents_the_binary_layout(client):
    infer = client.get("/openapi.json").get_json()["paths"]["/v2/models/{name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert HEADER_LENGTH in {p["name"] for p in infer["parameters"]}
    ok = infer["responses"]["200"]
    assert "application/octet-stream" in ok["content"] and HEADER_LENGTH in ok["headers"]
