"""KServe's Open Inference Protocol (V2), REST/JSON flavour.

    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/NAME[/versions/V], /v2/models/NAME[/versions/V]/ready
    POST /v2/models/NAME[/versions/V]/infer

NAME is one of the served models (MODEL_CONFIG), V one of its loaded versions (without it, the
newest answers); infer answers name both (model_name, model_version).

One input tensor: UINT8 or FP32 [N, S, S, 3] pixels 0..255 (data flat row-major or nested; S is
the served model's input size), or BYTES [N] holding encoded images as base64 strings. One
output: `probabilities` FP32 [N, C]. Inputs and the output may also travel as raw bytes after the
JSON (the binary tensor data extension, `convnet.serve.v2_binary`); BYTES elements are then the
image files themselves, not base64.
"""

from __future__ import annotations

import math

import numpy as np
from flask import Blueprint

from convnet import __version__
from convnet.serve.decode import b64_to_bytes, check_count, decode_images, pixels_from_numbers
from convnet.serve.errors import ApiError
from convnet.serve.model import OUTPUT_NAME, LoadedModel
from convnet.serve.pipeline import find_holder, get_model, holder, infer, max_images
from convnet.serve.v2_binary import binary_answer, bytes_elements, read_infer_body, tensor_array
from convnet.serve.worker import STOPPING

bp = Blueprint("v2", __name__, url_prefix="/v2")

PIXEL_DATATYPES = {"UINT8": True, "FP32": False}  # datatype -> values must be whole numbers


def _version(version: str | None) -> int | None:
    """V2 versions are strings; ours are integers, so anything else names no version we have."""
    if version is None:
        return None
    if not version.isdigit():
        raise ApiError(f"version {version!r} not found: versions are integers", 404)
    return int(version)


@bp.get("")
def server_metadata():
    return {"name": "convnet", "version": __version__, "extensions": ["binary_tensor_data"]}


@bp.get("/health/live")
def live():
    return {"live": True}


@bp.get("/health/ready")
def ready():
    is_ready = holder().current is not None and not STOPPING.is_set()  # see serve/worker.py
    return {"ready": is_ready}, 200 if is_ready else 503


def _model_metadata(model: LoadedModel) -> dict:
    return {
        "name": model.name,
        "versions": [str(v) for v in sorted(find_holder(model.name).loaded)],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.input_name, "datatype": "UINT8",
                    "shape": [-1, *model.input_shape]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, model.num_classes]}],
    }


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None):
    return _model_metadata(get_model(name, _version(version)))


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None):
    model = get_model(name, _version(version))
    return {"name": model.name, "ready": True}


def _shape(tensor: dict) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ApiError("inputs[0].shape must be a list of non-negative integers")
    return shape


def _flatten(data) -> list:
    """BYTES data may come nested ([[s], [s]]) or flat ([s, s])."""
    if isinstance(data, list) and all(isinstance(x, list) for x in data):
        return [x for row in data for x in _flatten(row)]
    return data if isinstance(data, list) else [data]


def _input_pixels(tensor, size: int, raw: memoryview | None = None) -> np.ndarray:
    """One V2 input tensor -> (N, size, size, 3) uint8. raw: its binary data, if it came so."""
    if not isinstance(tensor, dict):
        raise ApiError("inputs[0] must be an object with name, shape, datatype and data")
    datatype = tensor.get("datatype")
    shape = _shape(tensor)
    if raw is None and "data" not in tensor:
        parameters = tensor.get("parameters")
        if isinstance(parameters, dict) and "binary_data_size" in parameters:
            raise ApiError("inputs[0] has parameters.binary_data_size, but the request has no "
                           "Inference-Header-Content-Length header to say where its bytes are")
        raise ApiError("inputs[0] has no data")
    data = tensor.get("data")
    if datatype in PIXEL_DATATYPES:
        if len(shape) != 4 or shape[1:] != [size, size, 3]:
            raise ApiError(f"inputs[0].shape is {shape}, expected [N, {size}, {size}, 3] for "
                           f"{datatype}")
        check_count(shape[0], max_images())
        if raw is not None:
            data = tensor_array(raw, datatype, shape)
        return pixels_from_numbers(data, "inputs[0].data", size,
                                   whole=PIXEL_DATATYPES[datatype], shape=shape)
    if datatype == "BYTES":
        if not shape or math.prod(shape[1:]) != 1:
            raise ApiError(f"inputs[0].shape is {shape}, expected [N] or [N, 1] for BYTES")
        check_count(shape[0], max_images())
        if raw is not None:  # the image files themselves, no base64
            return decode_images(bytes_elements(raw, shape[0], "inputs[0]"), size)
        items = _flatten(data)
        if len(items) != shape[0]:
            raise ApiError(f"inputs[0].data holds {len(items)} elements, shape says {shape[0]}")
        blobs = [b64_to_bytes(item, f"inputs[0].data[{i}]") for i, item in enumerate(items)]
        return decode_images(blobs, size)
    raise ApiError(
        f"inputs[0].datatype {datatype!r} is not supported: use UINT8 or FP32 pixels "
        f"[N, {size}, {size}, 3], or BYTES [N] with base64-encoded images"
    )


def _parameters(entry: dict, where: str) -> dict:
    """The "parameters" object of the request or of one of its outputs ({} if absent)."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ApiError(f"{where}parameters must be an object")
    return parameters


def _flag(entry: dict, key: str, where: str, default: bool) -> bool:
    """A boolean among `entry`'s parameters (binary_data, binary_data_output), or `default`."""
    value = _parameters(entry, where).get(key, default)
    if not isinstance(value, bool):
        raise ApiError(f"{where}parameters.{key} must be true or false")
    return value


def _binary_output(payload: dict) -> bool:
    """Check the requested outputs; whether the answer carries the output as raw bytes: as its
    entry in "outputs" says, else as the request's binary_data_output says (false by default)."""
    binary = _flag(payload, "binary_data_output", "", False)
    outputs = payload.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ApiError('"outputs" must be a list of objects like {"name": "probabilities"}')
    for i, output in enumerate(outputs):
        if output.get("name") != OUTPUT_NAME:
            raise ApiError(f"unknown output {output.get('name')!r}: the only one is "
                           f"{OUTPUT_NAME!r}")
        if "classification" in _parameters(output, f"outputs[{i}]."):
            raise ApiError("the classification extension is not supported: ask for "
                           f"{OUTPUT_NAME!r} and take the largest")
    return _flag(outputs[0], "binary_data", "outputs[0].", binary) if outputs else binary


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer_route(name: str, version: str | None = None):
    model = get_model(name, _version(version))
    payload, raw = read_infer_body()
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ApiError('"id" must be a string')
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ApiError('"inputs" must be a list holding exactly one tensor')
    binary = _binary_output(payload)
    probs = infer(model, _input_pixels(inputs[0], model.input_size, raw[0] if raw else None))
    response: dict[str, object] = {"model_name": model.name, "model_version": str(model.version)}
    if request_id is not None:
        response["id"] = request_id
    output = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(probs.shape)}
    if binary:
        return binary_answer(response, [(output, probs.astype("<f4"))])
    output["data"] = probs.ravel().tolist()  # row-major, as the protocol specifies
    response["outputs"] = [output]
    return response
