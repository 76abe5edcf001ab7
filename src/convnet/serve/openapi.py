"""The OpenAPI 3 description of every route, served at /openapi.json.

Written by hand (a test checks it names exactly the routes the app registers), because the three
prediction protocols are defined by their own specs, not by our function signatures. The pixel
shapes it gives are the served model's ([S, S, 3], S its input size), so it is built per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from convnet import __version__

if TYPE_CHECKING:
    from convnet.serve.model import LoadedModel

JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


ERRORS = {
    "400": _json(_ref("Error"), "Bad input: the message says what was wrong"),
    "404": _json(_ref("Error"), "Unknown model name or version"),
    "413": _json(_ref("Error"), "Body over MAX_CONTENT_LENGTH, or an image over MAX_IMAGE_PIXELS"),
    "415": _json(_ref("Error"), "Unsupported content type"),
    "503": {**_json(_ref("Error"), "No model loaded yet, or this worker is decoding as many "
                    "pixels as DECODE_BUDGET_PIXELS allows (then with Retry-After)"),
            "headers": {"Retry-After": {"schema": {"type": "integer"},
                                        "description": "seconds to wait before retrying"}}},
}
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "Model name: the model root folder's name (`cifar10` for the bundled one)"}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "Model version (an integer); only the served version answers"}
TOP_K = {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 5},
         "description": "Classes per image, most probable first (at most the number of classes)"}
EXPLAIN = {"name": "explain", "in": "query", "schema": {"type": "boolean", "default": False},
           "description": "1 or true: add to each answer an `explanation`, which pixels drove its "
                          "top class (an occlusion map: 49 extra model runs per image). At most "
                          "MAX_EXPLAIN_IMAGES images (default 8) per request; more get a 400"}


def _get(summary: str, schema: dict, tag: str, params=(), extra=None) -> dict:
    responses = {"200": _json(schema), **(extra or {})}
    return {"get": {"summary": summary, "tags": [tag], "parameters": list(params),
                    "responses": responses}}


def _post(summary: str, body: dict, schema: dict, tag: str, params=()) -> dict:
    return {"post": {"summary": summary, "tags": [tag], "parameters": list(params),
                     "requestBody": {"required": True, "content": body},
                     "responses": {"200": _json(schema), **ERRORS}}}


def _versioned(paths: dict, base: str, suffix: str, item_for) -> None:
    """Add `base + suffix` and its `/versions/{version}` twin."""
    paths[f"{base}{suffix}"] = item_for([NAME])
    paths[f"{base}/versions/{{version}}{suffix}"] = item_for([NAME, VERSION])


FILES_FIELD = {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}
IMAGE_BODY = {
    "multipart/form-data": {"schema": {"type": "object", "properties": FILES_FIELD}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    JSON: {"schema": _ref("InstancesB64")},
}

SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "B64": {"type": "object", "required": ["b64"], "properties": {"b64": {
        "type": "string", "format": "byte", "description": "base64 of a JPEG/PNG/GIF/BMP/WebP"}}},
    "InstancesB64": {"type": "object", "required": ["instances"], "properties": {
        "instances": {"type": "array", "items": _ref("B64")}}},
    "TopK": {"type": "object", "properties": {"label": {"type": "string"},
                                              "index": {"type": "integer"},
                                              "probability": {"type": "number"}}},
    "Explanation": {
        "type": "object", "description": "Which pixels drove the top answer (with explain=1)",
        "properties": {
            "method": {"type": "string", "enum": ["occlusion"]},
            "label": {"type": "string", "description": "the class explained: the top answer"},
            "index": {"type": "integer"},
            "grid": {"type": "integer", "description": "G: the heatmap is G x G cells over the "
                     "S x S image the model saw (8)"},
            "heatmap": {"type": "array", "description": "G rows of G numbers, top row first: "
                        "per cell, the mean drop in the label's probability when a square of "
                        "2 x 2 cells covering it is filled with the image's mean colour (> 0: "
                        "the cell supports the answer; < 0: it speaks against it)",
                        "items": {"type": "array", "items": {"type": "number"}}},
            "overlay_png": {"type": "string", "format": "byte", "description": "base64 PNG, "
                            "S x S: the image the model saw, tinted red in proportion to the "
                            "positive heatmap"}}},
    "PredictResponse": {"type": "object", "properties": {
        "model": {"type": "string"}, "version": {"type": "integer"},
        "predictions": {"type": "array", "items": {"type": "object", "properties": {
            "label": {"type": "string"}, "probability": {"type": "number"},
            "unsure": {"type": "boolean", "description":
                       "calibrated models only: the image looks unlike what the model was "
                       "trained on (its energy score is above the rule's threshold); the label "
                       "may be none of the classes"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1, "description":
                           "calibrated models only: 1 minus the share of correctly answered "
                           "validation images that looked more familiar; unsure below the "
                           "rule's flag rate (0.05)"},
            "top_k": {"type": "array", "items": _ref("TopK")},
            "explanation": _ref("Explanation")}}}}},
    "TFPredictRequest": {"type": "object", "description": "`instances` or `inputs`, not both",
                         "properties": {
                             "signature_name": {"type": "string"},
                             "instances": {"type": "array",
                                           "items": {"oneOf": [_ref("B64"), _ref("Pixels")]}},
                             "inputs": {"type": "array",
                                        "items": {"oneOf": [_ref("B64"), _ref("Pixels")]}}}},
    "TFPredictResponse": {"type": "object", "description": "`predictions` for `instances`, "
                          "`outputs` for `inputs`: one probability per class per image",
                          "properties": {
                              "predictions": {"type": "array", "items": {
                                  "type": "array", "items": {"type": "number"}}},
                              "outputs": {"type": "array", "items": {
                                  "type": "array", "items": {"type": "number"}}}}},
    "TFClassifyRequest": {"type": "object", "required": ["examples"], "properties": {
        "signature_name": {"type": "string"},
        "examples": {"type": "array", "items": {
            "type": "object", "description": "features; exactly one is an image {b64}",
            "additionalProperties": True}}}},
    "TFClassifyResponse": {"type": "object", "properties": {"results": {
        "type": "array", "description": "per example, [label, score] for every class",
        "items": {"type": "array", "items": {"type": "array", "items": {}}}}}},
    "TFModelStatus": {"type": "object", "properties": {"model_version_status": {
        "type": "array", "items": {"type": "object", "properties": {
            "version": {"type": "string"}, "state": {"type": "string"},
            "status": {"type": "object"}}}}}},
    "TFMetadata": {"type": "object", "properties": {"model_spec": {"type": "object"},
                                                    "metadata": {"type": "object"}}},
    "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _ref("V2Tensor")},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": ["probabilities"]}}}}}},
    "V2InferResponse": {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"},
        "id": {"type": "string"}, "outputs": {"type": "array", "items": _ref("V2Tensor")}}},
    "V2ModelMetadata": {"type": "object", "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}}},
}


def _sized(size: int | None) -> dict:
    """The schemas that carry the model's input shape: fixed lengths when a model is served."""
    side = {"minItems": size, "maxItems": size} if size else {}
    s = str(size) if size else "S"
    served = "" if size else " (S: the served model's input size)"
    return {
        "Pixels": {"type": "array", "description": f"[{s}, {s}, 3] integers 0..255, RGB{served}",
                   **side, "items": {"type": "array", **side, "items": {
                       "type": "array", "minItems": 3, "maxItems": 3, "items": {
                           "type": "integer", "minimum": 0, "maximum": 255}}}},
        "V2Tensor": {"type": "object", "required": ["name", "shape", "datatype", "data"],
                     "properties": {
                         "name": {"type": "string"},
                         "shape": {"type": "array", "items": {"type": "integer"},
                                   "description": f"[N, {s}, {s}, 3] for UINT8 and FP32 pixels"
                                                  f"{served}, [N] or [N, 1] for BYTES"},
                         "datatype": {"type": "string", "enum": ["UINT8", "FP32", "BYTES"]},
                         "data": {"type": "array", "items": {}}}},
    }


def build_spec(model: LoadedModel | None = None) -> dict:
    """The description of this server, with the shapes `model` takes (generic if None)."""
    size = model.input_size if model is not None else None
    side, served = (f"{size}x{size}" if size else None), "the served model's input size"
    html = {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
    obj = {"type": "object"}
    paths: dict = {
        "/": {
            "get": {"summary": "Web page: upload images, see the top-5 classes; model card",
                    "tags": ["web"], "responses": {"200": html}},
            "post": {"summary": "The page's no-JavaScript form: answers the page with results",
                     "tags": ["web"],
                     "requestBody": {"content": {"multipart/form-data": {"schema": {
                         "type": "object", "properties": {
                             **FILES_FIELD,
                             "explain": {"type": "string", "enum": ["1"], "description":
                                         "the page's checkbox: show which pixels drove each "
                                         "answer"}}}}}},
                     "responses": {"200": html, "400": html, "413": html}},
        },
        "/models/{name}": {"get": {
            "summary": "Model page: test scores per class, confusion matrix, training curves, "
                       "calibration, training facts, most confident mistakes",
            "tags": ["web"], "parameters": [NAME],
            "responses": {"200": html, "404": html, "503": html}}},
        "/api/v1/predict": _post("Classify one or more images (top-k per image, in order)",
                                 IMAGE_BODY, _ref("PredictResponse"), "api", [TOP_K, EXPLAIN]),
        "/healthz": _get("Liveness", obj, "ops"),
        "/readyz": _get("Readiness: served model and refused versions", obj, "ops",
                        extra={"503": _json(obj, "No model loaded")}),
        "/metrics": {"get": {"summary": "Prometheus metrics, summed over workers",
                             "tags": ["ops"], "responses": {"200": {
                                 "description": "Prometheus text format",
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": _get("This document", obj, "ops"),
        "/v2": _get("V2 server metadata", obj, "v2"),
        "/v2/health/live": _get("V2 liveness", obj, "v2"),
        "/v2/health/ready": _get("V2 readiness", obj, "v2",
                                 extra={"503": _json(obj, "No model loaded")}),
    }
    tf_base, v2_base = "/v1/models/{name}", "/v2/models/{name}"
    _versioned(paths, tf_base, "", lambda p: _get(
        "TF Serving model status", _ref("TFModelStatus"), "tfserving", p, ERRORS))
    _versioned(paths, tf_base, "/metadata", lambda p: _get(
        "TF Serving model metadata (signature)", _ref("TFMetadata"), "tfserving", p, ERRORS))
    _versioned(paths, tf_base, ":predict", lambda p: _post(
        "TF Serving predict", {JSON: {"schema": _ref("TFPredictRequest")}},
        _ref("TFPredictResponse"), "tfserving", p))
    _versioned(paths, tf_base, ":classify", lambda p: _post(
        "TF Serving classify", {JSON: {"schema": _ref("TFClassifyRequest")}},
        _ref("TFClassifyResponse"), "tfserving", p))
    _versioned(paths, v2_base, "", lambda p: _get(
        "V2 model metadata", _ref("V2ModelMetadata"), "v2", p, ERRORS))
    _versioned(paths, v2_base, "/ready", lambda p: _get("V2 model readiness", obj, "v2", p,
                                                        ERRORS))
    _versioned(paths, v2_base, "/infer", lambda p: _post(
        "V2 inference", {JSON: {"schema": _ref("V2InferRequest")}}, _ref("V2InferResponse"),
        "v2", p))
    return {
        "openapi": "3.0.3",
        "info": {"title": "convnet image classifier", "version": __version__,
                 "description": f"Classify {side + ' ' if side else ''}RGB images (any image "
                                f"is centre-cropped and resized to {side or served}). Errors "
                                "are always {\"error\": \"...\"}."},
        "paths": paths,
        "components": {"schemas": {**SCHEMAS, **_sized(size)}},
    }
