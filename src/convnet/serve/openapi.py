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
    "404": _json(_ref("Error"), "Unknown model name, version or label; the body also lists "
                 "the served `models` (and, for a label, the model's `labels`)"),
    "413": _json(_ref("Error"), "Body over MAX_CONTENT_LENGTH, or an image over MAX_IMAGE_PIXELS"),
    "415": _json(_ref("Error"), "Unsupported content type"),
    "503": {**_json(_ref("Error"), "No model loaded yet, or this worker is decoding as many "
                    "pixels as DECODE_BUDGET_PIXELS allows (then with Retry-After)"),
            "headers": {"Retry-After": {"schema": {"type": "integer"},
                                        "description": "seconds to wait before retrying"}}},
}
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "Model name: as MODEL_CONFIG names it, else the model root folder's name "
                       "(`cifar10` for the bundled one)"}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "Model version (an integer); only loaded versions answer"}
LABEL = {"name": "label", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "A version label of the model's (MODEL_CONFIG), e.g. stable or canary"}
MODEL_QUERY = {"name": "model", "in": "query", "schema": {"type": "string"},
               "description": "Model name (default: the first of MODEL_CONFIG, or the only one)"}
VERSION_QUERY = {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1},
                 "description": "One of the model's loaded versions (default: its newest)"}
LABEL_QUERY = {"name": "label", "in": "query", "schema": {"type": "string"},
               "description": "A version label of the model's, instead of version"}
TOP_K = {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 5},
         "description": "Classes per image, most probable first (at most the number of classes)"}
KEEP = {"name": "keep", "in": "query", "schema": {"type": "boolean", "default": False},
        "description": "1 or true: keep the images (FEEDBACK_KEEP_SECONDS, in the feedback "
                       "database) and give each answer a `prediction_id` for POST "
                       "/api/v1/feedback. Predictions answer even when keeping fails: then "
                       "`kept` is false and `kept_error` says why"}
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


def _versioned(paths: dict, base: str, suffix: str, item_for, labels: bool = False) -> None:
    """Add `base + suffix` and its `/versions/{version}` (and `/labels/{label}`) twins."""
    paths[f"{base}{suffix}"] = item_for([NAME])
    paths[f"{base}/versions/{{version}}{suffix}"] = item_for([NAME, VERSION])
    if labels:
        paths[f"{base}/labels/{{label}}{suffix}"] = item_for([NAME, LABEL])


FILES_FIELD = {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}
IMAGE_BODY = {
    "multipart/form-data": {"schema": {"type": "object", "properties": FILES_FIELD}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    JSON: {"schema": _ref("InstancesB64")},
}

B64_STRING = {"type": "string", "format": "byte",
              "description": "base64 of a JPEG/PNG/GIF/BMP/WebP"}
SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"},
        "models": {"type": "array", "items": {"type": "string"},
                   "description": "with a 404 for a model or label: the served models"},
        "labels": {"type": "object", "additionalProperties": {"type": "integer"},
                   "description": "with a 404 for a label: the model's labels -> versions"}}},
    "B64": {"type": "object", "required": ["b64"], "properties": {"b64": B64_STRING}},
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
            "explanation": _ref("Explanation"),
            "prediction_id": {"type": "string", "description": "with keep=1: names this "
                              "image in POST /api/v1/feedback"}}}},
        "kept": {"type": "boolean", "description": "with keep=1: whether the images were kept"},
        "kept_error": {"type": "string", "description": "with keep=1, when not kept: why"}}},
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
                                  "type": "array", "items": {"type": "number"}}},
                              "model_spec": {"type": "object", "description": "the model and "
                                             "version that answered"}}},
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
        "parameters": {"type": "object", "properties": {"binary_data_output": {
            "type": "boolean", "default": False,
            "description": "answer every output as raw bytes after the JSON (see the "
                           "octet-stream body)"}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": ["probabilities"]},
            "parameters": {"type": "object", "properties": {"binary_data": {
                "type": "boolean", "description": "this output as raw bytes after the JSON; "
                "overrides binary_data_output"}}}}}}}},
    "V2InferResponse": {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"},
        "id": {"type": "string"}, "outputs": {"type": "array", "items": _ref("V2Tensor")}}},
    "FeedbackResponse": {"type": "object", "properties": {
        "id": {"type": "integer", "description": "the item's id in the store"},
        "label": {"type": "string"}, "predicted": {"type": "string", "nullable": True},
        "correct": {"type": "boolean", "nullable": True,
                    "description": "predicted == label; null without `predicted`"},
        "model": {"type": "string"}, "version": {"type": "integer"}}},
    "V2ModelMetadata": {"type": "object", "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}}},
}

V2_HEADER_LENGTH = "Inference-Header-Content-Length"
V2_BINARY = {"schema": {"type": "string", "format": "binary", "description": (
    "KServe V2's binary tensor data extension, what tritonclient sends by default: the JSON "
    "request (V2InferRequest) in the first Inference-Header-Content-Length bytes, then the raw "
    "bytes of each input whose parameters.binary_data_size replaces data, in input order: "
    "row-major, little-endian; BYTES elements each after a 4-byte little-endian length (the "
    "image files themselves, not base64). Sizes that do not match shape x datatype, missing or "
    "trailing bytes get a 400")}}
V2_HEADER = {"name": V2_HEADER_LENGTH, "in": "header", "schema": {"type": "integer", "minimum": 0},
             "description": "bytes of JSON at the start of a binary request body"}


def _v2_infer(params: list) -> dict:
    """V2 inference: JSON, or JSON followed by raw tensor bytes, both ways."""
    item = _post("V2 inference", {JSON: {"schema": _ref("V2InferRequest")},
                                  "application/octet-stream": V2_BINARY},
                 _ref("V2InferResponse"), "v2", [*params, V2_HEADER])
    ok = item["post"]["responses"]["200"]
    ok["content"]["application/octet-stream"] = {"schema": {
        "type": "string", "format": "binary", "description": "when binary output was asked "
        "for: the JSON answer (V2InferResponse, outputs with parameters.binary_data_size "
        "instead of data) in the first Inference-Header-Content-Length bytes, then the "
        "outputs' raw bytes (probabilities: FP32 little-endian, row-major)"}}
    ok["headers"] = {V2_HEADER_LENGTH: {"schema": {"type": "integer"}, "description":
                                        "bytes of JSON at the start of a binary answer"}}
    return item


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
        "V2Tensor": {"type": "object", "required": ["name", "shape", "datatype"],
                     "description": "data, or parameters.binary_data_size when its bytes "
                                    "follow the JSON (binary tensor data extension)",
                     "properties": {
                         "name": {"type": "string"},
                         "shape": {"type": "array", "items": {"type": "integer"},
                                   "description": f"[N, {s}, {s}, 3] for UINT8 and FP32 pixels"
                                                  f"{served}, [N] or [N, 1] for BYTES"},
                         "datatype": {"type": "string", "enum": ["UINT8", "FP32", "BYTES"]},
                         "data": {"type": "array", "items": {}},
                         "parameters": {"type": "object", "properties": {"binary_data_size": {
                             "type": "integer", "minimum": 0,
                             "description": "bytes of this tensor after the JSON"}}}}},
    }


FEEDBACK_FIELDS = {
    "label": {"type": "string", "description": "the class the image really is: one of the "
              "served model's classes (else 400 naming them)"},
    "predicted": {"type": "string", "description": "optional: what the model answered (one of "
                  "its classes); stored, and `correct` in the answer compares it"},
    "note": {"type": "string", "maxLength": 1000, "description": "optional free text"},
}
ONE_OF = "the image: exactly one of `{}` and `prediction_id`"
REFERENCE = {"prediction_id": {"type": "string", "description": "instead of the image: the "
                               "`prediction_id` predict?keep=1 answered (kept for "
                               "FEEDBACK_KEEP_SECONDS, default 3600 s; one feedback each)"}}
FEEDBACK_ERRORS = {
    **ERRORS,
    "404": _json(_ref("Error"), "Unknown, expired or answered prediction_id; or feedback is "
                 "turned off (FEEDBACK_DB empty)"),
    "413": _json(_ref("Error"), "Body over MAX_CONTENT_LENGTH, image over "
                 "FEEDBACK_MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS"),
    "503": {**_json(_ref("Error"), "No model loaded, decode budget full, or the feedback "
                    "database locked or unreachable (nothing was stored); with Retry-After"),
            "headers": ERRORS["503"]["headers"]},
    "507": _json(_ref("Error"), "The store holds FEEDBACK_MAX_ITEMS items; nothing was stored"),
}
FEEDBACK = {"post": {
    "summary": "Say which class an image really is; stored for export and retraining",
    "tags": ["api"], "parameters": [MODEL_QUERY],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["label"], "description": ONE_OF.format("file"),
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "one image"},
                           **REFERENCE, **FEEDBACK_FIELDS}}},
        JSON: {"schema": {
            "type": "object", "required": ["label"], "description": ONE_OF.format("b64"),
            "properties": {"b64": B64_STRING, **REFERENCE, **FEEDBACK_FIELDS}}}}},
    "responses": {"201": _json(_ref("FeedbackResponse"), "Stored (committed)"),
                  **FEEDBACK_ERRORS}}}
FEEDBACK_FORM = {"post": {
    "summary": "A result's feedback form on the web page (no JavaScript needed)",
    "tags": ["web"],
    "requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "verdict"], "properties": {
            "image": {"type": "string", "description": "data:image/png;base64 URL of the "
                      "image the model saw, as the result page embeds it"},
            "verdict": {"type": "string", "enum": ["right", "wrong"], "description":
                        "right: the image is `predicted`; wrong: it is `label`"},
            "model": {"type": "string", "description": "the model that answered"},
            **FEEDBACK_FIELDS}}}}},
    "responses": {status: {"description": "HTML page"} for status in
                  ("200", "400", "404", "413", "503", "507")}}}


# API keys and rate limits (convnet.serve.auth, convnet.serve.ratelimit): required only when the
# server has a keys file (CONVNET_API_KEYS_FILE); these routes are open to all either way.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/v2/health/live",
                        "/v2/health/ready"})
KEYS_ON = " Only when the server has API keys on (CONVNET_API_KEYS_FILE)."
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY, "
               "a key from `convnet keys create`." + KEYS_ON + " Browsers may send it as HTTP "
               "Basic auth instead (any user name, the key as password)."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "The same key in X-API-Key." + KEYS_ON},
}
AUTH_ERRORS = {
    "401": {**_json(_ref("Error"), "No API key, or an unknown, revoked or malformed one"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                             "description": 'Bearer realm="convnet"'}}},
    "429": {**_json(_ref("Error"), "The key's rate limit (RATE_LIMIT, or its own) is spent"),
            "headers": {"Retry-After": ERRORS["503"]["headers"]["Retry-After"],
                        "X-RateLimit-Remaining": {"schema": {"type": "integer"}},
                        "X-RateLimit-Reset": {"schema": {"type": "integer"},
                                              "description": "Unix time the window ends"}}},
}


def _secured(paths: dict) -> dict:
    """Every operation with the answers of keys and limits, or with no security requirement
    for the routes open to all."""
    return {path: {method: {**op, "security": []} if path in OPEN_PATHS
                   else {**op, "responses": {**op["responses"], **AUTH_ERRORS}}
                   for method, op in item.items()}
            for path, item in paths.items()}


def build_spec(model: LoadedModel | None = None) -> dict:
    """The description of this server, with the shapes `model` takes (generic if None)."""
    size = model.input_size if model is not None else None
    side, served = (f"{size}x{size}" if size else None), "the served model's input size"
    html = {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
    obj = {"type": "object"}
    paths: dict = {
        "/": {
            "get": {"summary": "Web page: upload images, see the top-5 classes; model card",
                    "tags": ["web"], "parameters": [MODEL_QUERY],
                    "responses": {"200": html, "404": html}},
            "post": {"summary": "The page's no-JavaScript form: answers the page with results",
                     "tags": ["web"],
                     "requestBody": {"content": {"multipart/form-data": {"schema": {
                         "type": "object", "properties": {
                             **FILES_FIELD,
                             "explain": {"type": "string", "enum": ["1"], "description":
                                         "the page's checkbox: show which pixels drove each "
                                         "answer"},
                             "model": {"type": "string", "description": "the page's model "
                                       "picker (with several models): the model to ask"}}}}}},
                     "responses": {"200": html, "400": html, "404": html, "413": html}},
        },
        "/models/{name}": {"get": {
            "summary": "Model page: test scores per class, confusion matrix, training curves, "
                       "calibration, training facts, most confident mistakes",
            "tags": ["web"], "parameters": [NAME],
            "responses": {"200": html, "404": html, "503": html}}},
        "/api/v1/predict": _post("Classify one or more images (top-k per image, in order)",
                                 IMAGE_BODY, _ref("PredictResponse"), "api",
                                 [MODEL_QUERY, VERSION_QUERY, LABEL_QUERY, TOP_K, EXPLAIN,
                                  KEEP]),
        "/api/v1/feedback": FEEDBACK,
        "/feedback": FEEDBACK_FORM,
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
        "TF Serving model status", _ref("TFModelStatus"), "tfserving", p, ERRORS), True)
    _versioned(paths, tf_base, "/metadata", lambda p: _get(
        "TF Serving model metadata (signature)", _ref("TFMetadata"), "tfserving", p, ERRORS),
        True)
    _versioned(paths, tf_base, ":predict", lambda p: _post(
        "TF Serving predict", {JSON: {"schema": _ref("TFPredictRequest")}},
        _ref("TFPredictResponse"), "tfserving", p), True)
    _versioned(paths, tf_base, ":classify", lambda p: _post(
        "TF Serving classify", {JSON: {"schema": _ref("TFClassifyRequest")}},
        _ref("TFClassifyResponse"), "tfserving", p), True)
    _versioned(paths, v2_base, "", lambda p: _get(
        "V2 model metadata", _ref("V2ModelMetadata"), "v2", p, ERRORS))
    _versioned(paths, v2_base, "/ready", lambda p: _get("V2 model readiness", obj, "v2", p,
                                                        ERRORS))
    _versioned(paths, v2_base, "/infer", _v2_infer)
    return {
        "openapi": "3.0.3",
        "info": {"title": "convnet image classifier", "version": __version__,
                 "description": f"Classify {side + ' ' if side else ''}RGB images (any image "
                                f"is centre-cropped and resized to {side or served}). Errors "
                                "are always {\"error\": \"...\"}."},
        "paths": _secured(paths),
        "security": [{"bearer": []}, {"apiKey": []}],
        "components": {"schemas": {**SCHEMAS, **_sized(size)},
                       "securitySchemes": SECURITY_SCHEMES},
    }
