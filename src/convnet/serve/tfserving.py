"""TensorFlow Serving's REST API, so its clients work unchanged against this server.

    GET  /v1/models/NAME[/versions/V|/labels/L]             model status
    GET  /v1/models/NAME[/versions/V|/labels/L]/metadata    signature: uint8 [-1,S,S,3] -> [-1,C]
    POST /v1/models/NAME[/versions/V|/labels/L]:predict     {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME[/versions/V|/labels/L]:classify    {"examples": [{"image": {"b64": ...}}]}

NAME is one of the served models (MODEL_CONFIG), V one of its loaded versions, L one of its
labels (e.g. stable, canary); without either, its newest version answers. Predict and classify
answers carry `model_spec` (name, version) as TF Serving's gRPC responses do.

An instance is an encoded image `{"b64": "..."}` or an [S, S, 3] array of 0..255 integers, S
being the served model's input size; the named-input form `{"<input name>": <either>}` works too.
Errors are `{"error": "..."}`.
"""

from __future__ import annotations

import numpy as np
from flask import Blueprint

from convnet.imaging import ImageError
from convnet.serve.decode import b64_to_bytes, check_count, decode_upload, pixels_from_numbers
from convnet.serve.errors import ApiError
from convnet.serve.model import OUTPUT_NAME, LoadedModel
from convnet.serve.pipeline import find_holder, get_model, infer, max_images
from convnet.serve.uploads import read_json_body

bp = Blueprint("tfserving", __name__, url_prefix="/v1/models")

SIGNATURE = "serving_default"


def _status(model: LoadedModel, version: int | None) -> dict:
    """GetModelStatusResponse: the loaded versions, plus any refused ones (state END)."""
    found = find_holder(model.name)
    entries = [{"version": str(v), "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""}}
               for v in sorted(found.loaded, reverse=True)]
    for refusal in found.refusals.values():
        entries.append({"version": str(refusal.version), "state": "END",
                        "status": {"error_code": "UNKNOWN", "error_message": refusal.reason}})
    if version is not None:
        entries = [e for e in entries if e["version"] == str(version)]
        if not entries:
            raise ApiError(f"Could not find version {version} of model {model.name!r}", 404)
    return {"model_version_status": entries}


@bp.get("/<name>")
@bp.get("/<name>/versions/<int:version>")
@bp.get("/<name>/labels/<label>")
def status(name: str, version: int | None = None, label: str | None = None):
    model = get_model(name, label=label)
    return _status(model, model.version if label is not None else version)


def _spec(model: LoadedModel) -> dict:
    return {"name": model.name, "signature_name": SIGNATURE, "version": str(model.version)}


def _tensor_info(name: str, dtype: str, dims: list[int]) -> dict:
    return {
        "dtype": dtype,
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                         "unknown_rank": False},
        "name": f"{name}:0",
    }


@bp.get("/<name>/metadata")
@bp.get("/<name>/versions/<int:version>/metadata")
@bp.get("/<name>/labels/<label>/metadata")
def metadata(name: str, version: int | None = None, label: str | None = None):
    model = get_model(name, version, label)
    signature = {
        "inputs": {model.input_name: _tensor_info(model.input_name, "DT_UINT8",
                                                  [-1, *model.input_shape])},
        "outputs": {OUTPUT_NAME: _tensor_info(OUTPUT_NAME, "DT_FLOAT", [-1, model.num_classes])},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
    }


def _check_signature(payload: dict) -> None:
    name = payload.get("signature_name")
    if name not in (None, "", SIGNATURE):
        raise ApiError(f"serving signature {name!r} not found; the only one is {SIGNATURE!r}")


def _instance_pixels(item, where: str, size: int) -> np.ndarray:
    """One instance -> (size, size, 3) uint8."""
    if isinstance(item, dict) and "b64" not in item:
        if len(item) != 1:
            raise ApiError(f"{where}: this model has one input; got keys {sorted(item)}")
        (where_key, item), = item.items()
        where = f"{where}.{where_key}"
    if isinstance(item, dict):
        try:
            return decode_upload(b64_to_bytes(item["b64"], where), size)
        except ImageError as exc:
            raise ImageError(f"{where}: {exc}", exc.status) from None
    if isinstance(item, list):
        return pixels_from_numbers(item, where, size, single=True)[0]
    raise ApiError(
        f'{where}: expected {{"b64": "<base64 image>"}} or a [{size}, {size}, 3] array of '
        f"0..255 integers, not {type(item).__name__}"
    )


def _batch_pixels(rows, where: str, size: int) -> np.ndarray:
    """A list of instances -> (N, size, size, 3) uint8."""
    if not isinstance(rows, list):
        raise ApiError(f"{where} must be a list with one entry per image")
    check_count(len(rows), max_images())
    if not any(isinstance(row, dict) for row in rows):
        return pixels_from_numbers(rows, where, size)  # all arrays: one conversion is faster
    return np.stack([_instance_pixels(row, f"{where}[{i}]", size)
                     for i, row in enumerate(rows)])


@bp.post("/<name>:predict")
@bp.post("/<name>/versions/<int:version>:predict")
@bp.post("/<name>/labels/<label>:predict")
def predict(name: str, version: int | None = None, label: str | None = None):
    model = get_model(name, version, label)
    payload = read_json_body()
    _check_signature(payload)
    if ("instances" in payload) == ("inputs" in payload):
        raise ApiError('the request must have either "instances" (row format) or "inputs" '
                       "(columnar format), not both or neither")
    if "instances" in payload:
        probs = infer(model, _batch_pixels(payload["instances"], "instances", model.input_size))
        return {"predictions": probs.tolist(), "model_spec": _spec(model)}
    inputs, where = payload["inputs"], "inputs"
    if isinstance(inputs, dict) and "b64" not in inputs:
        if len(inputs) != 1:
            raise ApiError(f"this model has one input; got inputs {sorted(inputs)}")
        (key, inputs), = inputs.items()
        where = f"inputs.{key}"
    return {"outputs": infer(model, _batch_pixels(inputs, where, model.input_size)).tolist(),
            "model_spec": _spec(model)}


def _example_image(example, where: str) -> bytes:
    """The one binary feature ({"b64": ...}, or a one-element list of it) of a tf.Example."""
    if not isinstance(example, dict):
        raise ApiError(f"{where}: an example must be an object of features")
    found = []
    for key, value in example.items():
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict) and "b64" in value:
            found.append((key, value["b64"]))
    if len(found) != 1:
        raise ApiError(f'{where}: expected exactly one image feature {{"b64": "<base64 image>"}}, '
                       f"found {len(found)}")
    key, data = found[0]
    return b64_to_bytes(data, f"{where}.{key}")


@bp.post("/<name>:classify")
@bp.post("/<name>/versions/<int:version>:classify")
@bp.post("/<name>/labels/<label>:classify")
def classify(name: str, version: int | None = None, label: str | None = None):
    """ClassificationResponse: per example, [label, score] for every class in class order."""
    model = get_model(name, version, label)
    payload = read_json_body()
    _check_signature(payload)
    examples = payload.get("examples")
    if not isinstance(examples, list):
        raise ApiError('expected {"examples": [{"image": {"b64": "<base64 image>"}}, ...]}')
    check_count(len(examples), max_images())
    pixels = np.empty((len(examples), *model.input_shape), dtype=np.uint8)
    for i, example in enumerate(examples):
        where = f"examples[{i}]"
        try:
            pixels[i] = decode_upload(_example_image(example, where), model.input_size)
        except ImageError as exc:
            raise ImageError(f"{where}: {exc}", exc.status) from None
    probs = infer(model, pixels)
    return {"results": [[[name, float(p)] for name, p in zip(model.labels, row, strict=True)]
                        for row in probs], "model_spec": _spec(model)}
