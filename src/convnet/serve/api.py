"""The project's own JSON API: POST /api/v1/predict.

Accepts one or many images as multipart `file` fields, one image as a raw `image/*` body, or JSON
`{"instances": [{"b64": "..."}, ...]}`, and answers the top-k classes per image in request order:

    curl -F file=@cat.jpg 'http://127.0.0.1:8000/api/v1/predict?top_k=3'

`?model=NAME` picks one of the served models (default: the first of MODEL_CONFIG), `?version=V`
or `?label=L` one of its versions (default: its newest); the answer names the model and version.

`?explain=1` adds to each answer the pixels that drove it (convnet.serve.explain); `?keep=1` keeps
the images for a while and gives each answer a `prediction_id` that feedback can name
(convnet.serve.feedback).
"""

from __future__ import annotations

from flask import Blueprint, request

from convnet.serve.decode import b64_to_bytes, check_count, decode_images
from convnet.serve.errors import ApiError
from convnet.serve.explain import check_explain_count, explanations, parse_explain
from convnet.serve.feedback import keep_predictions, parse_keep
from convnet.serve.pipeline import get_model, infer_scored, max_images, max_parts
from convnet.serve.postprocess import parse_top_k, predictions
from convnet.serve.uploads import UPLOAD_FIELD, form_files, media_type, read_json_body

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def _multipart_blobs() -> list[bytes]:
    blobs = [data for _, data in form_files(UPLOAD_FIELD, max_parts())]
    if not blobs:
        raise ApiError(
            f"no image in the form: send each image as a file field named {UPLOAD_FIELD!r}"
        )
    check_count(len(blobs), max_images())
    return blobs


def _json_blobs() -> list[bytes]:
    instances = read_json_body(("application/json",)).get("instances")
    if not isinstance(instances, list):
        raise ApiError('expected {"instances": [{"b64": "<base64 image>"}, ...]}')
    check_count(len(instances), max_images())
    blobs = []
    for i, item in enumerate(instances):
        if not isinstance(item, dict) or "b64" not in item:
            raise ApiError(f'instances[{i}]: expected an object {{"b64": "<base64 image>"}}')
        blobs.append(b64_to_bytes(item["b64"], f"instances[{i}]"))
    return blobs


def request_blobs() -> list[bytes]:
    """The encoded images in the request body, in order."""
    kind = media_type()
    if kind == "multipart/form-data":
        return _multipart_blobs()
    if kind.startswith("image/"):
        return [request.get_data(cache=False)]
    if kind == "application/json" or kind.endswith("+json"):
        return _json_blobs()
    raise ApiError(
        f"unsupported content type {kind or '(none)'!r}: send multipart/form-data with "
        "'file' fields, a raw image/* body, or application/json with instances",
        415,
    )


def parse_version(value: str | None) -> int | None:
    """The `version` query parameter: a version number, or absent."""
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ApiError(f"version {value[:20]!r} not found: versions are integers from 1", 404)
    return int(value)


def requested_model(args=None):
    """The model ?model=, ?version= and ?label= name (each optional; not version and label).
    args: the query arguments, if the caller has them already."""
    args = request.args if args is None else args
    if args.get("version") and args.get("label"):
        raise ApiError("give version or label, not both")
    return get_model(args.get("model") or None, parse_version(args.get("version")),
                     args.get("label") or None)


@bp.post("/predict")
def predict():
    args = request.args  # once: each lookup through Flask's request proxy costs about 1 us
    model = requested_model(args)
    k = parse_top_k(args.get("top_k"), model.num_classes)
    explain = parse_explain(args.get("explain"))
    keep = parse_keep(args.get("keep"))
    blobs = request_blobs()
    if explain:
        check_explain_count(len(blobs))  # before decoding: the limit bounds the work
    pixels = decode_images(blobs, model.input_size)  # (N, S, S, 3) uint8
    probs, scores = infer_scored(model, pixels)
    answers = predictions(probs, model.labels, k, scores, model.unsure)
    if explain:
        for answer, explanation in zip(answers, explanations(model, pixels, probs), strict=True):
            answer["explanation"] = explanation
    body = {"model": model.name, "version": model.version, "predictions": answers}
    if keep:
        body.update(keep_predictions(model, blobs, answers))
    return body
